"""Helpers shared by the service tests (imported by module name; pytest puts this folder on sys.path)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# limits the integration server runs with (small so the limit tests stay fast)
SERVER_ENV = {
    "CLASSIFIER_MAX_IMAGES": "32",
    "CLASSIFIER_MAX_REQUEST_BYTES": str(4 * 1024 * 1024),
    "CLASSIFIER_MAX_IMAGE_PIXELS": str(4_000_000),
    "CLASSIFIER_MAX_BATCH_SIZE": "32",
    "CLASSIFIER_MAX_LATENCY_MS": "2000",
    "CLASSIFIER_TOP_K": "3",
    "CLASSIFIER_MAX_CONCURRENCY": "16",  # per worker
    "CLASSIFIER_WORKERS": "2",  # the same on any machine (default: one per CPU)
    "CLASSIFIER_PROVIDERS": "auto",
    # follow the test store's pointer only: never the registry of the checkout the tests run in
    "CLASSIFIER_REGISTRY_POLL_S": "0",
    # the tests send thousands of bad requests from one address: no penalty box (its own server tests it)
    "CLASSIFIER_REFUSAL_RATE": "0",
}



def cuda_usable() -> bool:
    """CUDAExecutionProvider installed and an NVIDIA GPU visible (nvidia-smi runs)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    if "CUDAExecutionProvider" not in ort.get_available_providers() or shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


requires_gpu = pytest.mark.skipif(not cuda_usable(), reason="no CUDA GPU / CUDAExecutionProvider on this machine")


def run_in_bento_home(home: Path, code: str, timeout: float = 120) -> str:
    """Run python ``code`` with BENTOML_HOME=home in a subprocess; returns its stdout."""
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    tag: str
    startup_s: float

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def serve(home: Path, log_path: Path, tag: str = "", env: dict | None = None, timeout: float = 120,
          target: str = "service.service:Classifier"):
    """Run `bentoml serve <target>` (the source tree's service, or a built Bento's tag) on a free port
    until the block exits."""
    import httpx

    port = free_port()
    full_env = {
        **os.environ, **SERVER_ENV, **(env or {}),
        "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": str(REPO),
    }
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", target,
             "--host", "127.0.0.1", "--port", str(port), "--working-dir", str(REPO)],
            cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    srv = Server(url, proc, log_path, tag, 0.0)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{srv.log()[-5000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve not ready after {timeout} s:\n{srv.log()[-5000:]}")
            time.sleep(0.2)
        srv.startup_s = time.monotonic() - started
        yield srv
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started in a new session: SIGTERM to its process group (nothing else), SIGKILL after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def workers(proc: subprocess.Popen) -> dict[str, list]:
    """The serve process' worker children (psutil.Process) by service name."""
    import psutil

    out: dict[str, list] = {"image-classifier": []}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "--service-name" in cmd:
            out.setdefault(cmd[cmd.index("--service-name") + 1], []).append(child)
    return out
