"""Fixtures for the service tests.

- ``mnist``: the MNIST IDX files from ``/work/shared/data/mnist`` (or ``$MNIST_DIR``) as numpy arrays.
- ``tiny_onnx_model``: a small real ONNX classifier honouring docs/model-contract.md, made by fitting a
  tiny torch CNN for two passes over 6000 MNIST training images (~4 s on 2 CPU cores, >90 % accurate).
  Until the pipeline's export stage exists this stands in for it; swap ``build_tiny_onnx_model`` for
  the real export function later.
- ``bento_home``: a temporary BentoML home holding that model (stored via ``pipeline/bento_store.py``
  in a subprocess, so this process' BentoML configuration and the user's store are untouched).
- ``server``: ONE real ``bentoml serve service.service:Classifier`` per session on a free port.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from svc_support import run_in_bento_home, serve  # helpers live there so test modules can import them too

MNIST_DIR = Path(os.environ.get("MNIST_DIR", "/work/shared/data/mnist"))
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


@dataclass(frozen=True)
class Mnist:
    train_images: np.ndarray  # uint8 [N, 28, 28]
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_mnist(directory: Path = MNIST_DIR) -> Mnist:
    files = {
        "train_images": "train-images-idx3-ubyte.gz",
        "train_labels": "train-labels-idx1-ubyte.gz",
        "test_images": "t10k-images-idx3-ubyte.gz",
        "test_labels": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [name for name in files.values() if not (directory / name).is_file()]
    if missing:
        pytest.skip(f"MNIST IDX files {missing} not found in {directory} (set MNIST_DIR)")
    out = {}
    for key, name in files.items():
        if key.endswith("images"):
            out[key] = _read_idx(directory / name, 16).reshape(-1, 28, 28)
        else:
            out[key] = _read_idx(directory / name, 8).astype(np.int64)
    return Mnist(**out)


@pytest.fixture(scope="session")
def mnist() -> Mnist:
    return load_mnist()


def build_tiny_onnx_model(mnist: Mnist, path: Path, *, n_train: int = 6000, seed: int = 0) -> Path:
    """Fit a tiny CNN on 6000 MNIST images (two passes) and export it per docs/model-contract.md."""
    torch = pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")

    torch.manual_seed(seed)
    # one thread: on a small shared machine OpenMP threads contending with another job (e.g. a
    # training run) slow this down ten-fold; restored below
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_and_export(torch, onnx, mnist, path, n_train)
    finally:
        torch.set_num_threads(threads)


def _fit_and_export(torch, onnx, mnist: Mnist, path: Path, n_train: int) -> Path:
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )
    x = torch.from_numpy(mnist.train_images[:n_train].copy()).float().div(255.0)
    x = ((x - MNIST_MEAN) / MNIST_STD).unsqueeze(1)
    y = torch.from_numpy(mnist.train_labels[:n_train].copy())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(2):
        perm = torch.randperm(n_train)
        for i in range(0, n_train, 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return export_with_contract(torch, onnx, model, path, "tinycnn")


def export_with_contract(torch, onnx, model, path: Path, arch: str) -> Path:
    """Export a 1x28x28 -> 10-class torch model to ONNX with the metadata of docs/model-contract.md."""
    # torch 2.14: the dynamo exporter needs onnxscript (not installed); the TorchScript exporter works
    torch.onnx.export(
        model, torch.zeros(1, 1, 28, 28), str(path), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
    )
    proto = onnx.load(str(path))
    props = {
        "classes": json.dumps([str(i) for i in range(10)]),
        "in_channels": "1",
        "image_size": "28",
        "mean": json.dumps([MNIST_MEAN]),
        "std": json.dumps([MNIST_STD]),
        "arch": arch,
        "dataset": "mnist",
        "mlflow_run_id": "test-run-0000",
        "num_params": str(sum(p.numel() for p in model.parameters())),
        "resize": "bilinear",
    }
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def build_slow_onnx_model(path: Path) -> Path:
    """An untrained stack of 64-channel 3x3 convolutions at 28x28: ~0.5 GFLOP, about a millisecond or
    more per image, so that concurrent requests queue up behind the model (the overload tests)."""
    torch = pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    from torch import nn

    torch.manual_seed(0)
    convs = [layer for _ in range(6) for layer in (nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())]
    model = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), *convs,
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    return export_with_contract(torch, onnx, model, path, "slowcnn")


def build_stuck_onnx_model(source: Path, path: Path) -> Path:
    """``source`` with a trap: an input whose mean is above 2 (an all-white MNIST image normalizes
    to 2.82) runs an ONNX ``Loop`` of ~10^12 empty iterations, a model call that never returns;
    the warm-up's zeros and real digits (mean ~0) run it zero times. For the stuck-call tests."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    proto = onnx.load(str(source))
    graph = proto.graph
    (logits,) = [o for o in graph.output if o.name == "logits"]
    for node in graph.node:  # the original graph now ends in "logits_raw"
        node.output[:] = ["logits_raw" if out == "logits" else out for out in node.output]
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["acc_in"], ["acc_out"])],
        "spin", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [])])
    const = [helper.make_tensor(name, TensorProto.FLOAT if name != "yes" else TensorProto.BOOL, [], [value])
             for name, value in (("two", 2.0), ("trip_scale", 1e12), ("zero", 0.0), ("yes", True))]
    graph.initializer.extend(const)
    graph.node.extend([
        helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
        helper.make_node("Sub", ["mean", "two"], ["excess"]),
        helper.make_node("Relu", ["excess"], ["over"]),
        helper.make_node("Mul", ["over", "trip_scale"], ["trips_f"]),
        helper.make_node("Cast", ["trips_f"], ["trips"], to=TensorProto.INT64),
        helper.make_node("Loop", ["trips", "yes", "zero"], ["spun"], body=body),
        helper.make_node("Mul", ["spun", "zero"], ["nothing"]),
        helper.make_node("Add", ["logits_raw", "nothing"], ["logits"]),
    ])
    del graph.output[:]
    graph.output.append(logits)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def store_in_bento_home(onnx_path: Path, home: Path, alias: str = "champion", version: str = "7") -> str:
    """``onnx_path`` as ``image-classifier`` (registry version 7) in ``home``, with the store's
    ``alias`` pointing at it (as the package stage leaves it); its tag."""
    code = ("from pipeline.bento_store import store_serving\n"
            f"print(store_serving({str(onnx_path)!r}, alias={alias!r}, registry_version={version!r}, "
            "mlflow_run_id='test-run-0000'))")
    return run_in_bento_home(home, code).strip().splitlines()[-1]


@pytest.fixture(scope="session")
def tiny_onnx_model(mnist: Mnist, tmp_path_factory) -> Path:
    return build_tiny_onnx_model(mnist, tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="session")
def bento_home(tiny_onnx_model: Path, tmp_path_factory) -> tuple[Path, str]:
    """A BentoML home with the tiny model stored as ``image-classifier``; returns (home, tag)."""
    home = tmp_path_factory.mktemp("bentoml_home")
    tag = store_in_bento_home(tiny_onnx_model, home)
    return home, tag


@pytest.fixture(scope="session")
def server(tiny_onnx_model, tmp_path_factory):
    """The session's server, with SERVER_ENV limits, in a BentoML home of its own: a server started
    on the same home (the fault tests start several on `bento_home`) would reset this one's metrics
    folder, and the batching tests read /metrics."""
    pytest.importorskip("httpx")
    folder = tmp_path_factory.mktemp("server")
    tag = store_in_bento_home(tiny_onnx_model, folder / "bentoml")
    with serve(folder / "bentoml", folder / "bentoml-serve.log", tag) as srv:
        yield srv
