"""The registry decides what is served: real MLflow registry, real stages, real `bentoml serve`.

A module fixture registers two real exports (`cnn` v1 = champion, `mlp` v2 = challenger, by the
real gate) and packages the champion; each test clones that project (MLflow store included) and
its BentoML home, then promotes, rolls back, packages, kills and serves for real.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import svc_images
from svc_support import SERVER_ENV, serve
from tests.conftest import Project, clone_project

pytestmark = [pytest.mark.slow, pytest.mark.integration]
NAME = "image-classifier"
PNG = svc_images.stroke_png()


@dataclass
class Lifecycle:
    project: Project
    home: Path  # BENTOML_HOME

    def env(self, **extra: str) -> dict[str, str]:
        return self.project.env(BENTOML_HOME=str(self.home), BENTOML_DO_NOT_TRACK="true", **extra)

    def stage(self, module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.project.run(module, *args, check=check, env=self.env())

    def popen(self, module: str, *args: str) -> subprocess.Popen:
        return self.project.popen(module, *args, env=self.env())

    def serve(self, log: Path, target: str = "service.service:Classifier", **env: str):
        return serve(self.home, log, "", env={"MLFLOW_TRACKING_URI": self.project.tracking_uri, **env}, target=target)

    def pointers(self) -> dict:
        path = self.home / "aliases" / f"{NAME}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def history(self) -> list[dict]:
        code = "import json; from pipeline.promote import history; print(json.dumps(history('image-classifier')))"
        out = subprocess.run([sys.executable, "-c", code], cwd=self.project.path,
                             env=self.env(), capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def alias_version(self, alias: str = "champion") -> str | None:
        import sqlite3

        with sqlite3.connect(self.project.path / "mlflow.db") as con:
            row = con.execute("SELECT version FROM registered_model_aliases WHERE name=? AND alias=?",
                              (NAME, alias)).fetchone()
        return str(row[0]) if row else None


@pytest.fixture(scope="module")
def base(tmp_path_factory, exported_models) -> Lifecycle:
    lc = Lifecycle(clone_project(exported_models, tmp_path_factory.mktemp("lifecycle") / "project"),
                   tmp_path_factory.mktemp("lifecycle-bentoml"))
    gate = lc.stage("pipeline.promote")
    assert "champion is v1 (cnn)" in gate.stdout, gate.stdout
    lc.stage("pipeline.package", "--no-build")
    assert lc.pointers()["champion"]["registry_version"] == "1"
    return lc


@pytest.fixture
def lc(base, tmp_path) -> Lifecycle:
    """A private copy of the promoted, packaged project and its BentoML home."""
    home = tmp_path / "bentoml"
    shutil.copytree(base.home, home)
    return Lifecycle(clone_project(base.project.path, tmp_path / "project"), home)


def classify(url: str):
    import httpx

    return httpx.post(f"{url}/classify", files=[("images", ("zero.png", PNG, "image/png"))], timeout=30)


def metadata(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/metadata", timeout=30).json()


class Load:
    """A client sending requests the whole time; every answer: (time, status, X-Model-Version)."""

    def __init__(self, url: str) -> None:
        self.url, self.answers, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(f"{self.url}/classify", files=[("images", ("zero.png", PNG, "image/png"))])
                    self.answers.append((time.monotonic(), r.status_code, r.headers.get("x-model-version")))
                except Exception as err:  # noqa: BLE001  (a transport error is a failed request too)
                    self.answers.append((time.monotonic(), repr(err), None))
                time.sleep(0.01)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def wait_for_version(self, version: str, since: float, timeout: float) -> float:
        """Seconds from `since` until every answer of the last second came from `version`."""
        deadline = since + timeout
        while time.monotonic() < deadline:
            recent = [a for a in self.answers if a[0] > time.monotonic() - 1.0 and a[0] > since]
            if len(recent) >= 3 and all(a[2] == version for a in recent):
                first = next(a[0] for a in self.answers if a[0] > since and a[2] == version)
                return first - since
            time.sleep(0.2)
        raise AssertionError(f"still not serving v{version} after {timeout} s: {self.answers[-5:]}")

    def failures(self) -> list:
        return [a for a in self.answers if a[1] != 200]


def register_broken_version(lc: Lifecycle, monkeypatch, tmp_path: Path) -> str:
    """A version that passes every registry check (parity tag, SHA-256) but breaks the model contract
    (9 classes for 10 logits): what a buggy export would register."""
    import onnx

    monkeypatch.setenv("MLFLOW_TRACKING_URI", lc.project.tracking_uri)
    from pipeline import tracking

    proto = onnx.load(str(lc.project.path / "exports" / "mlp" / "model.onnx"))
    for prop in proto.metadata_props:
        if prop.key == "classes":
            prop.value = json.dumps([str(i) for i in range(9)])
    path = tmp_path / "broken.onnx"
    onnx.save(proto, str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    uri, model_id = tracking.log_onnx_model(meta["mlflow_run_id"], path, np.zeros((1, 1, 28, 28), np.float32), meta)
    tags = {"arch": "mlp", "parity_passed": "true", "onnx_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return tracking.register_version(NAME, uri, meta["mlflow_run_id"], tags, model_id)


# --- 1. the exact sequence ---------------------------------------------------------------------

def test_set_package_rollback_package_then_serve_serves_the_rolled_back_version(lc, tmp_path):
    lc.stage("pipeline.promote", "set", "2")
    assert "champion v2" in lc.stage("pipeline.package", "--no-build").stdout
    lc.stage("pipeline.promote", "rollback")
    out = lc.stage("pipeline.package", "--no-build").stdout
    assert "champion v1" in out and "already stored" in out, out
    assert lc.pointers()["champion"]["registry_version"] == "1"
    with lc.serve(tmp_path / "serve.log", CLASSIFIER_REGISTRY_POLL_S="0") as srv:
        meta = metadata(srv.url)
        resp = classify(srv.url)
    assert (meta["registry_version"], meta["registry_alias"], meta["arch"]) == ("1", "champion", "cnn")
    assert meta["serving"]["model_tag"] == lc.pointers()["champion"]["tag"] == meta["model_tag"]
    assert resp.status_code == 200 and resp.headers["x-model-version"] == "1"
    assert resp.headers["x-model-tag"] == meta["model_tag"]


# --- 2. live following under load, a broken version refused, the registry down ----------------------------

def test_service_follows_promotion_and_rollback_under_load_and_refuses_a_broken_version(lc, tmp_path, monkeypatch):
    import httpx

    poll = 1.0
    lc.stage("pipeline.promote", "set", "2", "--alias", "challenger")  # the gate named no challenger: mlp lost by far
    with lc.serve(tmp_path / "serve.log", CLASSIFIER_REGISTRY_POLL_S=str(poll), CLASSIFIER_ADMIN_TOKEN="s3cret",
                  CLASSIFIER_SHADOW_ALIAS="challenger", CLASSIFIER_SHADOW_RATE="0.5") as srv, Load(srv.url) as load:
        load.wait_for_version("1", time.monotonic() - 1, 10)
        switch = {}
        for action, version in ((("set", "2"), "2"), (("rollback",), "1")):
            started = time.monotonic()
            lc.stage("pipeline.promote", *action)
            switch[action[0]] = load.wait_for_version(version, started, 60)
        broken = register_broken_version(lc, monkeypatch, tmp_path)
        lc.stage("pipeline.promote", "set", broken)
        deadline = time.monotonic() + 60

        def refused_by_every_worker() -> bool:
            """Each worker logs its own refusal (a keep-alive /metadata poll may only ever reach one of
            them; a worker still syncing when the store moves away below would see a store error)."""
            workers = set(re.findall(rf"\[entry_service:image-classifier:(\d+)\] alias 'champion': REFUSED "
                                     rf"registry v{broken}\b", srv.log()))
            return len(workers) == int(SERVER_ENV["CLASSIFIER_WORKERS"]) and all(
                (metadata(srv.url)["serving"].get("refused") or {}).get("registry_version") == broken for _ in range(6))

        while not refused_by_every_worker():
            assert time.monotonic() < deadline, metadata(srv.url)
            time.sleep(0.5)
        time.sleep(2 * poll)
        after_refusal = [a for a in load.answers if a[0] > deadline - 60]
        db = lc.project.path / "mlflow.db"
        db.rename(db.with_name("moved.db"))  # the registry goes away: the service keeps serving
        deadline = time.monotonic() + 60
        while not all(metadata(srv.url)["serving"]["last_registry_check"]["ok"] is False for _ in range(4)):
            assert time.monotonic() < deadline, metadata(srv.url)["serving"]  # every worker (any answers)
            time.sleep(0.5)
        meta_down = metadata(srv.url)
        denied = httpx.post(f"{srv.url}/admin/reload", timeout=30)
        allowed = httpx.post(f"{srv.url}/admin/reload", headers={"Authorization": "Bearer s3cret"}, timeout=30)
        metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
        final_meta = metadata(srv.url)
    assert load.failures() == [], load.failures()[:5]
    assert len(load.answers) > 100
    assert all(a[2] == "1" for a in after_refusal), "the broken version must never answer"
    assert max(switch.values()) < poll + 20, switch
    refused = meta_down["serving"]["refused"]
    assert refused["registry_version"] == broken and "cannot" in refused["reason"], refused
    assert meta_down["registry_version"] == "1" and meta_down["serving"]["last_registry_check"]["ok"] is False
    assert "no such file" in meta_down["serving"]["last_registry_check"]["error"]
    assert denied.status_code == 401 and denied.json()["reason"] == "unauthorized"
    assert allowed.status_code == 200 and allowed.json()["registry_version"] == "1"
    assert 'event="refused"' in metrics and 'event="loaded"' in metrics
    shadow = final_meta["shadow"]
    assert "classifier_shadow_images_total" in metrics and 'model="shadow"' in metrics, (shadow, srv.log()[-3000:])
    assert shadow["active"] and shadow["registry_version"] == "2" and shadow["agreement"] is not None, shadow
    log = srv.log()
    assert "REFUSED" in log and "Traceback" not in log


# --- 3. a built Bento is pinned ------------------------------------------------------------------------

def test_a_bento_built_by_package_serves_its_version_after_the_store_moves_on(lc, tmp_path):
    built = lc.stage("pipeline.package").stdout
    bento_tag = json.loads((lc.project.path / "release" / "bento.json").read_text())["bento_tag"]
    v1_tag = lc.pointers()["champion"]["tag"]
    assert bento_tag and f"Bento {bento_tag}" in built
    lc.stage("pipeline.promote", "set", "2")
    lc.stage("pipeline.package", "--no-build")  # the store now holds v2, newest, and champion points to it
    assert lc.pointers()["champion"]["registry_version"] == "2"
    info = subprocess.run([str(Path(sys.executable).with_name("bentoml")), "get", bento_tag, "-o", "json"],
                          env=lc.env(), capture_output=True, text=True, timeout=120, check=True)
    labels = json.loads(info.stdout)["labels"]
    assert (labels["model_tag"], labels["registry_version"]) == (v1_tag, "1")
    with lc.serve(tmp_path / "bento.log", target=bento_tag, CLASSIFIER_REGISTRY_POLL_S="1") as srv:
        time.sleep(2.5)  # a follower, were there one, would have moved by now
        meta = metadata(srv.url)
        resp = classify(srv.url)
    assert (meta["model_tag"], meta["registry_version"], meta["pinned_by"]) == (v1_tag, "1", "bento")
    assert resp.headers["x-model-version"] == "1"


# --- 4. concurrency and kill -9 ------------------------------------------------------------------------

def assert_consistent(lc: Lifecycle) -> list[dict]:
    history = lc.history()
    assert all(h["state"] in ("done", "aborted") for h in history if "state" in h), history
    champion_changes = [h for h in history if h["alias"] == "champion" and h.get("state", "done") == "done"]
    assert champion_changes[-1]["version"] == lc.alias_version("champion"), champion_changes[-1]
    return history


def test_parallel_promotes_serialize_and_lose_no_audit_entry(lc):
    before = len(lc.history())
    procs = [lc.popen("pipeline.promote", "set", str(1 + i % 2), "--reason", f"parallel {i}") for i in range(6)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outputs
    assert not any("Traceback" in o or "locked" in o for o in outputs), outputs
    history = assert_consistent(lc)
    assert sorted(h["reason"] for h in history[before:]) == sorted(f"parallel {i}" for i in range(6))


def test_kill_9_during_promote_leaves_a_consistent_registry(lc):
    rng = random.Random(11)
    for i in range(4):
        proc = lc.popen("pipeline.promote", "set", str(2 - i % 2))
        time.sleep(rng.uniform(2.0, 6.0))  # mlflow's import is ~3 s: kills land before and inside the change
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    after = lc.stage("pipeline.promote", "rollback", check=False)  # settles what the kills left pending
    assert after.returncode in (0, 2) and "Traceback" not in after.stderr, after.stderr
    assert_consistent(lc)
    lc.stage("pipeline.promote", "set", "2")
    assert lc.alias_version() == "2"
    assert_consistent(lc)


def test_kill_9_during_package_keeps_the_previous_pointer(lc):
    v1_tag = lc.pointers()["champion"]["tag"]
    lc.stage("pipeline.promote", "set", "2")
    rng = random.Random(5)
    for _ in range(3):
        proc = lc.popen("pipeline.package", "--no-build")
        time.sleep(rng.uniform(2.0, 7.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        entry = lc.pointers()["champion"]
        assert entry["tag"] == v1_tag or entry["registry_version"] == "2", entry
    out = lc.stage("pipeline.package", "--no-build").stdout
    assert "champion v2" in out
    code = ("import json; from pipeline import bento_store as bs; "
            "print(json.dumps([bs.bento_model_info(t)['registry']['registry_version'] for t in bs.list_model_tags()]))")
    stored = json.loads(subprocess.run([sys.executable, "-c", code], cwd=lc.project.path, env=lc.env(),
                                       capture_output=True, text=True, timeout=120, check=True).stdout)
    assert sorted(stored) == ["1", "2"], stored  # nothing half-written, v2 stored once


# --- 5. team mode: the alias on a tracking server backed by PostgreSQL -------------------------------------

from tests.test_team_mode import mlflow_server, postgres  # noqa: E402,F401  (module fixtures: a PG cluster + server)


def test_team_mode_service_follows_the_alias_on_the_tracking_server(mlflow_server, prepared_mnist, tmp_path):  # noqa: F811
    from tests.harness import mirror_path

    project = Project(tmp_path / "team", mirror_path())
    project.path.mkdir()
    project.write_params({"cnn": {"epochs": 1}, "mlp": {"epochs": 1, "lr": 0.0002}})
    project.copy_prepared(prepared_mnist)
    lc = Lifecycle(project, tmp_path / "bentoml")
    env = lc.env(MLFLOW_TRACKING_URI=mlflow_server)
    for arch in ("cnn", "mlp"):
        for module in ("pipeline.train", "pipeline.evaluate", "pipeline.export"):
            project.run(module, "--arch", arch, env=env)
    assert "champion is v1 (cnn)" in project.run("pipeline.promote", env=env).stdout
    project.run("pipeline.package", "--no-build", env=env)
    assert not (project.path / "mlflow.db").exists()
    with serve(lc.home, tmp_path / "serve.log", "", env={"MLFLOW_TRACKING_URI": mlflow_server,
                                                        "CLASSIFIER_REGISTRY_POLL_S": "1"}) as srv, Load(srv.url) as load:
        load.wait_for_version("1", time.monotonic() - 1, 10)
        started = time.monotonic()
        project.run("pipeline.promote", "set", "2", env=env)
        load.wait_for_version("2", started, 60)
        meta = metadata(srv.url)
    assert load.failures() == [], load.failures()[:5]
    check = meta["serving"]["last_registry_check"]
    assert check["ok"] is True and check["version"] == "2" and meta["arch"] == "mlp"
