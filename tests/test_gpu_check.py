"""bench/gpu_check.py: the one-line skip without a GPU, the dry run (every step tiny, on the CPU: ~30 s
on 2 cores) and, on a machine with CUDA, a short real run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from bench.gpu_check import SPLIT_NOTE, time_to_target  # noqa: E402
from tests.harness import REPO, mirror_path  # noqa: E402

CIFAR = mirror_path() / "cifar10" / "cifar10-train-jpg.tar.gz"
needs_cifar = pytest.mark.skipif(not CIFAR.is_file(), reason=f"{CIFAR} not found (set DATA_MIRROR)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def gpu_check(*args: str | Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def result_of(out: Path, pattern: str) -> tuple[dict, str]:
    (path,) = out.glob(pattern)
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_time_to_target_is_the_first_epoch_at_the_target():
    history = [{"epoch": 1, "val_acc": 0.90, "elapsed_s": 2.0, "epoch_seconds": 1.5},
               {"epoch": 2, "val_acc": 0.941, "elapsed_s": 4.0, "epoch_seconds": 1.5},
               {"epoch": 3, "val_acc": 0.95, "elapsed_s": 6.0, "epoch_seconds": 1.5}]
    assert time_to_target(history, 0.94) == {"epoch": 2, "seconds": 4.0, "train_seconds": 3.0}
    assert time_to_target(history, 0.96) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_gpu_it_skips_in_one_line(tmp_path):
    proc = gpu_check("--out", tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [proc.stdout.strip()]
    assert proc.stdout.startswith("gpu_check: skipped: no CUDA device")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.integration
@needs_cifar
def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    proc = gpu_check("--dry-run", "--cifar", CIFAR, "--out", tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result, md = result_of(tmp_path, "gpu-check-*-dry-run.json")
    steps = result["steps"]
    assert {name: s["status"] for name, s in steps.items()} == dict.fromkeys(("train", "export", "ort", "serve"), "ok")
    assert (result["data"]["train_images"], result["data"]["test_images"]) == (300, 100)
    assert result["data"]["split"] == SPLIT_NOTE and SPLIT_NOTE in md and "airbench" in md
    assert len(steps["train"]["history"]) == 1 and steps["train"]["device"] == "cpu"
    assert steps["export"]["metadata"]["input_transform"] == "crop"
    assert steps["ort"]["providers"] == {"fp32": ["CPUExecutionProvider"], "fp16": ["CPUExecutionProvider"]}
    assert len(steps["ort"]["speed"]) == 6 and 0 <= steps["ort"]["accuracy"]["fp16_top1_agreement"] <= 1
    cells = steps["serve"]["cells"]
    assert [c["load"] for c in cells] == ["single", "batch64"]
    assert all(c["ok_requests"] > 0 and not c["errors"] and c["share_of_raw_ort"] > 0 for c in cells)
    assert steps["serve"]["metadata"]["active_providers"] == ["CPUExecutionProvider"]


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
@needs_cifar
def test_short_run_on_cuda(tmp_path):
    """Two epochs on 5,000 images; ORT and the service where this machine has onnxruntime-gpu and bentoml."""
    proc = gpu_check("--cifar", CIFAR, "--out", tmp_path, "--per-class", "500", "--test-per-class", "100",
                     "--epochs", "2", "--ort-seconds", "0.5", "--serve-seconds", "2", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result, md = result_of(tmp_path, "gpu-check-*.json")
    steps = result["steps"]
    assert result["gpu"]["name"] and steps["train"]["device"].startswith("cuda")
    assert steps["train"]["amp"] in ("bfloat16", "float16")
    if steps["ort"]["status"] == "ok":
        assert steps["ort"]["providers"]["fp32"][0] == "CUDAExecutionProvider"
        assert steps["ort"]["accuracy"]["fp16_top1_agreement"] > 0.95
    else:
        assert steps["ort"]["status"] == "skipped", steps["ort"]
    assert steps["serve"]["status"] in ("ok", "skipped"), steps["serve"]
