"""bench/serve.py's models and request images, and raw ONNX Runtime on them (the ceiling).

``cnn``: the trained MNIST export (``exports/cnn/model.onnx`` + ``outputs/cnn/model.pt``), 1x28x28;
``resnet18``: the CIFAR-style ResNet-18 on 3x32x32, randomly initialised (BatchNorm statistics from a
few real CIFAR images) and exported with ``pipeline.export.export_onnx`` (speed only).
"""
from __future__ import annotations

import functools
import io
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.harness import REPO, mirror_path

CIFAR_TAR = Path(os.environ.get("CIFAR_JPG_TAR") or mirror_path() / "cifar10" / "cifar10-train-jpg.tar.gz")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


@dataclass
class BenchModel:
    name: str
    onnx: Path
    pt: Path
    pngs: list[bytes]
    note: str
    facts: dict = field(default_factory=dict)


def png_bytes(chw: np.ndarray) -> bytes:
    from PIL import Image

    arr = chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def prepare(name: str, workdir: Path) -> BenchModel:
    return prepare_cnn() if name == "cnn" else prepare_resnet18(workdir)


def prepare_cnn(n_images: int = 256) -> BenchModel:
    onnx_path, pt_path = REPO / "exports/cnn/model.onnx", REPO / "outputs/cnn/model.pt"
    test = REPO / "data/prepared/test.npz"
    for path in (onnx_path, pt_path, test):
        if not path.is_file():
            raise SystemExit(f"serve bench: {path} is missing: run the pipeline (dvc repro) first")
    with np.load(test) as npz:
        images = npz["images"][:n_images]
    return BenchModel("cnn", onnx_path, pt_path, [png_bytes(a) for a in images],
                      "trained MNIST cnn (exports/cnn/model.onnx, outputs/cnn/model.pt), 1x28x28")


def cifar_images(n: int) -> tuple[np.ndarray, str]:
    """n real CIFAR-10 images uint8 [n, 3, 32, 32] from the shared JPEG tarball, else a synthetic pattern."""
    from PIL import Image

    out = []
    if CIFAR_TAR.is_file():
        with tarfile.open(CIFAR_TAR, "r|gz") as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32))).transpose(2, 0, 1))
                    if len(out) == n:
                        return np.stack(out), f"{CIFAR_TAR} (first {n} JPEGs, re-encoded as PNG)"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), "synthetic random pixels (CIFAR tarball not found)"


def untrained_resnet18(images: np.ndarray):
    """The CIFAR-style ResNet-18 (image_size 32), BatchNorm running statistics from `images`, and its
    model-file metadata."""
    import torch

    from models import create_model
    from pipeline.modelfile import normalize

    torch.manual_seed(0)
    model = create_model("resnet", 3, 10, 32)  # image_size 32 -> the CIFAR-style ResNet-18
    x = normalize(torch.as_tensor(images[:128]), CIFAR_MEAN, CIFAR_STD)
    model.train()
    with torch.no_grad():  # "brief initialisation": BatchNorm running statistics from real images
        for _ in range(3):
            model(x)
    model.eval()
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meta = {"arch": "resnet", "kwargs": {}, "in_channels": 3, "image_size": 32, "num_classes": 10,
            "classes": CIFAR_CLASSES, "mean": CIFAR_MEAN, "std": CIFAR_STD, "dataset": "cifar10",
            "mlflow_run_id": "bench-untrained-resnet18", "num_params": num_params}
    return model, meta


def parity_max_diff(pt_path: Path, onnx_bytes: bytes, images: np.ndarray) -> float:
    """max |logit difference| between the saved .pt (PyTorch) and the ONNX model (ONNX Runtime)."""
    from pipeline.modelfile import load_model_file, predict_logits
    from service.contract import normalize, run_logits

    reloaded, _ = load_model_file(pt_path)
    onnx_out = run_logits(onnx_bytes, normalize(images, CIFAR_MEAN, CIFAR_STD))
    return float(np.abs(predict_logits(reloaded, images, CIFAR_MEAN, CIFAR_STD).numpy() - onnx_out).max())


def prepare_resnet18(workdir: Path, n_images: int = 256) -> BenchModel:
    import torch

    from pipeline.export import export_onnx

    images, source = cifar_images(n_images)
    model, meta = untrained_resnet18(images)
    proto = export_onnx(model, meta, opset=17)
    onnx_path, pt_path = workdir / "resnet18.onnx", workdir / "resnet18.pt"
    onnx_path.write_bytes(proto.SerializeToString())
    torch.save({**meta, "state_dict": model.state_dict()}, pt_path)
    diff = parity_max_diff(pt_path, proto.SerializeToString(), images[:64])
    num_params = meta["num_params"]
    return BenchModel("resnet18", onnx_path, pt_path, [png_bytes(a) for a in images],
                      f"CIFAR-style ResNet-18 (create_model('resnet', 3, 10, 32)), 3x32x32, {num_params} params, "
                      f"random init + BatchNorm stats from real images (speed only); request images: {source}",
                      {"num_params": num_params, "parity_max_abs_logit_diff_64_images": diff})


# --- raw ONNX Runtime (the ceiling) -------------------------------------------------------------------

def time_calls(call, seconds: float, min_calls: int = 5) -> tuple[list[float], float]:
    """Run `call` (after 3 unrecorded calls) for `seconds` and at least `min_calls` times: each call's
    seconds, and the total."""
    for _ in range(3):
        call()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < min_calls:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times, time.perf_counter() - start


def bench_raw_ort(bm: BenchModel, batch_sizes: list[int], threads: list[int], seconds: float) -> list[dict]:
    from service.engine import OnnxClassifier
    from service.preprocessing import preprocess_batch

    rows = []
    for n_threads in threads:
        engine = OnnxClassifier(bm.onnx, providers="cpu", intra_op_threads=n_threads)
        pool = preprocess_batch(bm.pngs, engine.spec)
        for bs in batch_sizes:
            x = np.ascontiguousarray(np.resize(pool, (bs, *pool.shape[1:])))
            times, total = time_calls(functools.partial(engine.logits, x), seconds)
            rows.append({"model": bm.name, "threads": n_threads, "batch": bs, "calls": len(times),
                         "images_per_s": round(bs * len(times) / total, 1),
                         "ms_per_call_p50": round(1000 * float(np.median(times)), 3),
                         "images_per_s_at_p50": round(bs / float(np.median(times)), 1),
                         "ms_per_call_p99": round(1000 * float(np.percentile(times, 99)), 3)})
            print(f"  raw ORT {bm.name} threads={n_threads} batch={bs:3d}: {rows[-1]['images_per_s']:9.1f} images/s "
                  f"({rows[-1]['ms_per_call_p50']:.3f} ms/call)", flush=True)
        del engine
    return rows
