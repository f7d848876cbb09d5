"""Faults around a real `bentoml serve`: broken or missing models, an unusable CUDA provider, and
worker processes killed under load.

What BentoML 1.4.39 does, and so what these tests pin down:

- a model a worker cannot load (garbage ONNX bytes, contract keys missing, no model.onnx): the
  worker logs ``cannot serve model ...`` and exits; circus (``respawn=True`` outside a
  container, see ``bentoml.serving.create_watcher``) restarts it every ``check_delay`` (10 s) for
  ever, so the server process stays up but ``/readyz`` never answers 200;
- a pinned version missing from the store: ``bentoml serve`` itself fails at import (exit 1, "could
  not be found"); no store pointer for the followed alias: the worker says so and never becomes ready;
- ``CLASSIFIER_PROVIDERS=cuda`` without a usable GPU: runs on CPU, says so in the log and in GET
  /metadata; ``cuda-only`` refuses like a broken model;
- SIGKILLed workers are restarted by circus (within its 10 s check_delay); only
  requests in flight at the kill fail: connections wait in the listening socket's backlog, which
  circus holds, while a replacement starts. Inside a container (BENTOML_CONTAINERIZED, set by
  `bentoml containerize` images) nothing is restarted: the server exits once a service has no worker.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import svc_images
from svc_support import SERVER_ENV, cuda_usable, serve, workers
from tests.harness import bentoml_command, bentoml_env, free_port, run_in_bento_home, stop
from tests.harness import start as start_process

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

PNG = svc_images.encode(Image.fromarray(np.full((28, 28), 200, np.uint8)), "PNG")

BROKEN_MODELS = r'''
import bentoml, json, onnx
src = {src!r}
meta = {{"classes": [str(i) for i in range(10)], "in_channels": 1, "image_size": 28, "mean": [0.1307], "std": [0.3081]}}
with bentoml.models.create("garbage", metadata=meta) as m:           # not ONNX at all
    open(m.path_of("model.onnx"), "wb").write(b"\x00\xffthis is not an ONNX protobuf" * 64)
with bentoml.models.create("no-mean-std", metadata=meta) as m:       # valid ONNX, contract keys missing
    proto = onnx.load(src)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in ("mean", "std")]
    del proto.metadata_props[:]
    for key, value in kept:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, m.path_of("model.onnx"))
with bentoml.models.create("no-onnx-file", metadata=meta) as m:      # the store entry lacks model.onnx
    open(m.path_of("README"), "w").write("no model here")
from pipeline.bento_store import point_alias, store_lock
for name in ("garbage", "no-mean-std", "no-onnx-file"):                # as if packaged: champion points there
    with store_lock(name):
        point_alias(name, "champion", {{"tag": str(bentoml.models.get(name).tag)}})
print("ok")
'''


@pytest.fixture(scope="module")
def broken_home(tiny_onnx_model, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("broken_home")
    run_in_bento_home(home, BROKEN_MODELS.format(src=str(tiny_onnx_model)))
    return home


def start(home: Path, log_path: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """`bentoml serve` without waiting for readiness (svc_support.serve raises when it never comes)."""
    port = free_port()
    proc = start_process(bentoml_command(port), {**SERVER_ENV, **env, **bentoml_env(home)}, log_path)
    return proc, f"http://127.0.0.1:{port}"


def readyz(url: str) -> int | str:
    try:
        return httpx.get(f"{url}/readyz", timeout=8).status_code
    except httpx.HTTPError as err:
        return type(err).__name__


def assert_refuses(home: Path, log_path: Path, env: dict, expected: list[str], timeout: float = 90,
                   expect_exit: bool = False) -> dict:
    """The server exits non-zero, or stays up without ever being ready; the log says why."""
    proc, url = start(home, log_path, env)
    codes: list = []
    try:
        if expect_exit:
            proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            logged = all(text in log_path.read_text(errors="replace") for text in expected)
            codes.append(readyz(url))
            assert codes[-1] != 200, f"became ready:\n{log_path.read_text(errors='replace')[-3000:]}"
            if logged:  # the failure was logged before this probe, which still found the server not ready
                break
            time.sleep(0.5)
        log = log_path.read_text(errors="replace")
        for text in expected:
            assert text in log, f"{text!r} not in the log:\n{log[-4000:]}"
        exited = proc.poll()
        assert exited is None or exited != 0
        return {"exit_code": exited, "readyz": sorted(set(map(str, codes)))}
    finally:
        stop(proc)


REFUSALS = {
    # case: (model name, extra env, strings the log must contain)
    "garbage_onnx": ("garbage", {}, ["cannot serve model garbage:", "INVALID_PROTOBUF"]),
    "missing_contract_keys": ("no-mean-std", {}, ["cannot serve model no-mean-std:",
                                                  "model metadata lacks required key(s) ['mean', 'std']"]),
    "no_model_file": ("no-onnx-file", {}, ["cannot serve model no-onnx-file:", "model.onnx"]),
    "model_not_in_store": ("image-classifier", {}, ["no model serving alias 'champion' of 'image-classifier'",
                                                    "run `python -m pipeline.package`"]),
    "unknown_version": ("no-mean-std", {"CLASSIFIER_MODEL_VERSION": "doesnotexist"},
                        ["no-mean-std:doesnotexist could not be found"]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_broken_or_missing_model_never_becomes_ready(case, broken_home, tmp_path):
    name, env, expected = REFUSALS[case]
    fails_at_import = case == "unknown_version"  # before any worker starts
    outcome = assert_refuses(broken_home, tmp_path / "serve.log", {"CLASSIFIER_MODEL_NAME": name, **env}, expected,
                             expect_exit=fails_at_import)
    assert outcome["exit_code"] == (1 if fails_at_import else None), outcome


# --- CUDA requested without a usable GPU -------------------------------------------------------------

@pytest.mark.skipif(cuda_usable(), reason="this machine has a usable GPU")
def test_cuda_without_gpu_falls_back_to_cpu_and_reports_it(bento_home, tmp_path):
    home, tag = bento_home
    with serve(home, tmp_path / "cuda.log", tag, {"CLASSIFIER_PROVIDERS": "cuda"}) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            meta = client.get("/metadata").json()
            resp = client.post("/classify", files=[("images", ("a.png", PNG, "image/png"))])
        log = srv.log()
    assert meta["execution_providers"] == meta["active_providers"] == ["CPUExecutionProvider"]
    assert meta["requested_providers"][0] == "CUDAExecutionProvider"
    assert meta["provider_fallback"] is True and "FALLING BACK TO CPU" in meta["provider_warning"]
    assert resp.status_code == 200 and resp.json()[0]["label"]
    assert "EXECUTION PROVIDER FALLBACK" in log and "FALLING BACK TO CPU" in log
    assert "ACTIVE ['CPUExecutionProvider']" in log


@pytest.mark.skipif(cuda_usable(), reason="this machine has a usable GPU")
def test_cuda_only_without_gpu_refuses_to_start(bento_home, tmp_path):
    home, _ = bento_home
    assert_refuses(home, tmp_path / "cuda-only.log", {"CLASSIFIER_PROVIDERS": "cuda-only"},
                   ["cannot serve model image-classifier:", "ProviderError", "refusing to start (strict)"])


# --- workers killed under load -------------------------------------------------------------------------

@dataclass
class Call:
    started: float
    ended: float = 0.0
    status: int | None = None
    error: str | None = None  # transport-level failure
    reason: str | None = None  # the JSON error reason of a non-200


@dataclass
class Load:
    """`threads` clients posting one image each, in a loop, until stopped; a new connection per request
    (no keep-alive), so a request can only fail if it was in flight when its worker died."""

    url: str
    threads: int = 8
    calls: list[Call] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self.url, timeout=30, limits=limits) as client:
            while not self.stop.is_set():
                call = Call(time.monotonic())
                try:
                    resp = client.post("/classify", files=[("images", ("a.png", PNG, "image/png"))])
                    call.status = resp.status_code
                    if resp.status_code != 200:
                        try:
                            call.reason = resp.json().get("reason")
                        except ValueError:
                            call.reason = resp.text[:100]
                except httpx.HTTPError as err:
                    call.error = type(err).__name__
                call.ended = time.monotonic()
                with self.lock:
                    self.calls.append(call)

    def ok_after(self, t: float) -> bool:
        with self.lock:
            return any(c.status == 200 and c.started > t for c in self.calls)

    def failures(self) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.status != 200]


def kill_one_under_load(srv, load: Load, service: str, probes: list) -> dict:
    before = workers(srv.proc)[service]
    assert before, workers(srv.proc)
    victim = before[0]
    deadline = time.monotonic() + 30
    while not load.ok_after(time.monotonic() - 1) and time.monotonic() < deadline:
        time.sleep(0.1)  # steady load first
    t_kill = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)  # a worker pid of the server started by this test
    recovered = None
    while time.monotonic() < t_kill + 30:
        probes.append(readyz(srv.url))
        now = [p.pid for p in workers(srv.proc)[service]]
        if load.ok_after(t_kill + 0.2) and len(now) == len(before) and victim.pid not in now:
            recovered = time.monotonic() - t_kill
            break
        time.sleep(0.2)
    assert recovered is not None, f"no 200 within 30 s of killing the {service} worker:\n{srv.log()[-3000:]}"
    # let the restarted worker settle, then it must keep serving
    time.sleep(1)
    assert readyz(srv.url) == 200
    after = workers(srv.proc)[service]
    return {"service": service, "t_kill": t_kill, "recovered_s": round(recovered, 2), "victim": victim.pid,
            "new_workers": sorted(p.pid for p in after if p.pid not in {q.pid for q in before})}


def test_killed_workers_are_restarted_and_only_in_flight_requests_fail(bento_home, tmp_path):
    home, tag = bento_home
    env = {"CLASSIFIER_WORKERS": "2", "CLASSIFIER_MAX_CONCURRENCY": "64"}
    with serve(home, tmp_path / "kill.log", tag, env) as srv:
        assert len(workers(srv.proc)["image-classifier"]) == 2
        load = Load(srv.url)
        threads = [threading.Thread(target=load.run, daemon=True) for _ in range(load.threads)]
        for t in threads:
            t.start()
        probes: list = []
        try:
            kills = [kill_one_under_load(srv, load, "image-classifier", probes) for _ in range(2)]
            time.sleep(2)
        finally:
            load.stop.set()
            for t in threads:
                t.join(timeout=40)  # every request has a 30 s timeout: no hang
        assert not any(t.is_alive() for t in threads), "a client request hung"
        log = srv.log()

    calls, failures = load.calls, load.failures()
    summary = {"calls": len(calls), "failures": [(round(c.started, 2), c.status, c.error, c.reason) for c in failures],
               "kills": kills, "readyz_during_recovery": sorted(set(map(str, probes)))}
    print("\nworker-kill figures:", summary)
    assert len(calls) > 50, summary
    for kill in kills:
        assert kill["new_workers"], summary  # circus started a replacement process
    t_kills = [k["t_kill"] for k in kills]
    for c in failures:
        # failed only if in flight at a kill: started before it, ended after it
        assert any(c.started <= t <= c.ended for t in t_kills), summary
        # transport errors: the worker holding the connection died
        assert c.error is not None, summary
    for t in t_kills:
        assert sum(1 for c in failures if c.started <= t <= c.ended) <= load.threads, summary
    # /readyz never answers 500 while a worker is being replaced (503 or a connection error at most)
    assert all(p in (200, 503) or isinstance(p, str) for p in probes), summary
    assert "status=500" not in log


def test_in_a_container_a_dead_worker_is_not_restarted_the_server_exits(bento_home, tmp_path):
    """Images built by `bentoml containerize` set BENTOML_CONTAINERIZED=true: circus then does not respawn
    (bentoml.serving.create_watcher: respawn=not running_inside_container()), and once a service has no
    worker left the arbiter quits (circus Arbiter.manage_watchers: "No active process found for
    watcher"), so the container exits and its orchestrator must restart it (restart policy / k8s)."""
    home, tag = bento_home
    with serve(home, tmp_path / "container.log", tag, {"BENTOML_CONTAINERIZED": "true", "CLASSIFIER_WORKERS": "1"}) as srv:
        assert len(workers(srv.proc)["image-classifier"]) == 1
        victim = workers(srv.proc)["image-classifier"][0]
        os.kill(victim.pid, signal.SIGKILL)  # the only worker of the server started here
        try:
            srv.proc.wait(timeout=40)  # circus notices within its check_delay (10 s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server outlived its only worker:\n{srv.log()[-3000:]}")
        assert srv.proc.returncode not in (0, None)
        assert "No active process found for watcher" in srv.log()
