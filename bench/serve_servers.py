"""The servers the serving benches measure: ``bentoml serve`` of the service and the naive FastAPI
baseline, started with tests.harness.running, and their process tree (CPU per role, peak RSS)."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests import harness
from tests.harness import REPO, bentoml_command, bentoml_env, free_port, store_in_bento_home

READY_POLL_S = 0.02  # the start-up time is a result: poll readiness finely


def role_of(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if "--service-name image-classifier" in text:
        return "api"
    if "bentoml serve" in text or "bentoml.__main__" in text or " -m bentoml " in f" {text} ":
        return "arbiter"
    if "uvicorn" in text:
        return "naive"
    return "other"


class ProcessTree:
    """The server's process group: per-role CPU seconds, and a sampler of total and per-role peak RSS."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_total = 0
        self.peak_by_role: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def processes(self) -> list:
        import psutil

        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total, by_role = 0, Counter()
            for p in self.processes():
                try:
                    rss = p.memory_info().rss
                    by_role[role_of(p.cmdline())] += rss
                    total += rss
                except psutil.Error:
                    pass
            self.peak_total = max(self.peak_total, total)
            for role, rss in by_role.items():
                self.peak_by_role[role] = max(self.peak_by_role[role], rss)
            self._stop.wait(self.interval)

    def cpu_seconds(self) -> dict[str, float]:
        import psutil

        out: Counter = Counter()
        for p in self.processes():
            try:
                t = p.cpu_times()
                out[role_of(p.cmdline())] += t.user + t.system
            except psutil.Error:
                pass
        return dict(out)

    def pids(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for p in self.processes():
            with contextlib.suppress(Exception):
                out.setdefault(role_of(p.cmdline()), []).append(p.pid)
        return out

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=5)
        mib = 1024 * 1024
        return {"peak_rss_total_mib": round(self.peak_total / mib, 1),
                "peak_rss_by_role_mib": {k: round(v / mib, 1) for k, v in sorted(self.peak_by_role.items())}}


@dataclass
class Server(harness.Server):
    kind: str = ""  # bentoml | naive
    tree: ProcessTree | None = None


@contextlib.contextmanager
def running(kind: str, cmd: list[str], env: dict, ready_path: str, port: int, log_path: Path):
    """`cmd` on `port` until the block exits, ready once `ready_path` answers; its process tree sampled."""
    with harness.running(cmd, port, env, log_path, ready_path, poll_s=READY_POLL_S, server_type=Server) as server:
        server.kind, server.tree = kind, ProcessTree(server.proc.pid)
        yield server


def bentoml_serving(home: Path, env: dict, log_path: Path, service_dir: Path = REPO, port: int | None = None):
    """`bentoml serve` of the service package in `service_dir` (default: this checkout) on the store
    `home` as it is, + `env`, until the block exits."""
    port = port or free_port()
    full_env = {**bentoml_env(home), **env}
    if service_dir != REPO:
        full_env["PYTHONPATH"] = f"{service_dir}{os.pathsep}{REPO}"
    return running("bentoml", bentoml_command(port, working_dir=service_dir), full_env, "/readyz", port, log_path)


def bentoml_server(bm, workdir: Path, service_env: dict, service_dir: Path = REPO):
    """bentoml_serving on a store of its own holding `bm`'s model."""
    home = workdir / f"bentoml_home_{bm.name}"
    tag = store_in_bento_home(bm.onnx, home)
    port = free_port()
    print(f"  starting bentoml serve ({tag}) on port {port} {service_env or ''}", flush=True)
    return bentoml_serving(home, service_env, workdir / f"bentoml-{bm.name}.log", service_dir, port)


def naive_server(bm, workdir: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bench.serve_naive:app", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    print(f"  starting naive FastAPI + PyTorch server on port {port}", flush=True)
    return running("naive", cmd, {"NAIVE_MODEL": str(bm.pt)}, "/healthz", port, workdir / f"naive-{bm.name}.log")
