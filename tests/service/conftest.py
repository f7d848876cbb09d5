"""Fixtures for the service tests.

- ``mnist`` (tests/conftest.py, for every test): the MNIST IDX files as numpy arrays.
- ``tiny_onnx_model``: a small real ONNX classifier honouring docs/model-contract.md, made by fitting a
  tiny torch CNN for two passes over 6000 MNIST training images (~4 s on 2 CPU cores, >90 % accurate)
  and exporting it with the export stage's ``pipeline.export.export_onnx``
  (tests.harness.build_tiny_onnx_model).
- ``bento_home``: a temporary BentoML home holding that model (stored via ``pipeline/bento_store.py``
  in a subprocess, so this process' BentoML configuration and the user's store are untouched).
- ``server``: ONE real ``bentoml serve service.service:Classifier`` per session on a free port.
- ``browser``: Debian's headless Chromium through Playwright (tests.harness.launch_chromium), per
  module; the tests that need it skip, saying why, where Chromium or playwright is missing.
- ``digit_onnx_model`` / ``digit_server``: the same tiny CNN trained on digits as the download stage
  prepares them and declaring ``input_transform: digit`` (MNIST's recipe for photos of digits), and
  one server of it per session (the ``server`` above keeps a model from before the key).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from svc_support import serve, store_test_model  # helpers live there so test modules can import them too
from tests.harness import (Mnist, build_tiny_onnx_model, chromium_unavailable, export_with_contract,
                           launch_chromium)


def build_slow_onnx_model(path: Path) -> Path:
    """An untrained stack of 64-channel 3x3 convolutions at 28x28: ~0.5 GFLOP, about a millisecond or
    more per image, so that concurrent requests queue up behind the model (the overload tests)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from torch import nn

    torch.manual_seed(0)
    convs = [layer for _ in range(6) for layer in (nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())]
    model = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), *convs,
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    return export_with_contract(model, path, "slowcnn")


def build_stuck_onnx_model(source: Path, path: Path) -> Path:
    """``source`` with a trap: an input whose mean is above 2 (an all-white MNIST image normalizes
    to 2.82) runs an ONNX ``Loop`` of ~10^12 empty iterations, a model call that never returns;
    the warm-up's zeros and real digits (mean ~0) run it zero times. For the stuck-call tests.
    The graph is hand-built; the metadata stays `source`'s (made by the export stage's function,
    tests.harness.export_with_contract)."""
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


@pytest.fixture(scope="session")
def tiny_onnx_model(mnist: Mnist, tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    return build_tiny_onnx_model(mnist, tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="session")
def bento_home(tiny_onnx_model: Path, tmp_path_factory) -> tuple[Path, str]:
    """A BentoML home with the tiny model stored as ``image-classifier``; returns (home, tag)."""
    home = tmp_path_factory.mktemp("bentoml_home")
    tag = store_test_model(tiny_onnx_model, home)
    return home, tag


@pytest.fixture(scope="module")
def browser():
    if reason := chromium_unavailable():
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def digit_onnx_model(mnist: Mnist, tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    return build_tiny_onnx_model(mnist, tmp_path_factory.mktemp("digit-model") / "digit.onnx", input_transform="digit")


@pytest.fixture(scope="session")
def digit_server(digit_onnx_model, tmp_path_factory):
    pytest.importorskip("httpx")
    folder = tmp_path_factory.mktemp("digit-server")
    tag = store_test_model(digit_onnx_model, folder / "bentoml")
    with serve(folder / "bentoml", folder / "bentoml-serve.log", tag) as srv:
        yield srv


@pytest.fixture(scope="session")
def server(tiny_onnx_model, tmp_path_factory):
    """The session's server, with SERVER_ENV limits, in a BentoML home of its own: a server started
    on the same home (the fault tests start several on `bento_home`) would reset this one's metrics
    folder, and the batching tests read /metrics."""
    pytest.importorskip("httpx")
    folder = tmp_path_factory.mktemp("server")
    tag = store_test_model(tiny_onnx_model, folder / "bentoml")
    with serve(folder / "bentoml", folder / "bentoml-serve.log", tag) as srv:
        yield srv
