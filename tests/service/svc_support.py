"""Helpers shared by the service tests (imported by module name; pytest puts this folder on sys.path).

What the benchmarks use too (ports, servers, BentoML homes, MNIST) is in tests/harness.py."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import (SERVICE_TARGET, TEST_RUN_ID, bentoml_command, bentoml_env, free_port, running,
                           store_in_bento_home)

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


@contextlib.contextmanager
def serve(home: Path, log_path: Path, tag: str = "", env: dict | None = None, timeout: float = 120,
          target: str = SERVICE_TARGET):
    """Run `bentoml serve <target>` (the source tree's service, or a built Bento's tag) with SERVER_ENV
    (+ `env`) on `home`, on a free port, until the block exits (tests.harness.running)."""
    port = free_port()
    full_env = {**SERVER_ENV, **(env or {}), **bentoml_env(home)}
    with running(bentoml_command(port, target), port, full_env, log_path, timeout=timeout) as srv:
        srv.tag = tag
        yield srv


def store_test_model(onnx_path: Path, home: Path, alias: str = "champion") -> str:
    """``onnx_path`` as ``image-classifier`` registry version 7 of the tests' run in `home`, with the
    store's `alias` pointing at it (as the package stage leaves it); its tag."""
    return store_in_bento_home(onnx_path, home, alias, version="7", run_id=TEST_RUN_ID)


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


def per_model(meta: dict) -> dict:
    """/metadata less what each of the service's workers measures or stamps for itself (two requests
    may meet two workers): the warm-up cost per image and the second the model was loaded."""
    batching = {k: v for k, v in meta["batching"].items() if k != "warmup_ms_per_image"}
    serving = {k: v for k, v in meta["serving"].items() if k != "loaded_at"}
    return {**meta, "batching": batching, "serving": serving}
