"""ONNX Runtime engine tests on the tiny real model (needs torch to build it: marked slow)."""
from __future__ import annotations

import numpy as np
import pytest

from service.engine import OnnxClassifier, ProviderError
from service.preprocessing import normalize
from svc_support import cuda_usable, requires_gpu

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_onnx_model):
    return OnnxClassifier(tiny_onnx_model, providers="cpu", intra_op_threads=1)


def test_reads_the_contract_from_metadata(engine):
    assert engine.active_providers == ["CPUExecutionProvider"]
    assert engine.spec.input_shape == (1, 28, 28)
    assert engine.classes == tuple(str(i) for i in range(10))
    assert (engine.spec.mean, engine.spec.std, engine.spec.resize) == ((0.1307,), (0.3081,), "bilinear")
    info = engine.describe()
    assert info["input_shape"] == [None, 1, 28, 28] and info["active_providers"] == ["CPUExecutionProvider"]
    assert info["num_params"] > 0 and info["arch"] == "tinycnn"


def test_logits_shapes_and_errors(engine):
    assert engine.logits(np.zeros((3, 1, 28, 28), np.float32)).shape == (3, 10)
    assert engine.logits(np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 10)
    assert engine.logits(np.zeros((2, 1, 28, 28), np.float64)).dtype == np.float32
    with pytest.raises(ValueError):
        engine.logits(np.zeros((2, 3, 28, 28), np.float32))
    assert engine.warmup((1, 8)) >= 0


def test_offline_accuracy_is_high(engine, mnist):
    x = normalize(mnist.test_images[:2000, None], engine.spec.mean, engine.spec.std)
    accuracy = (engine.logits(x).argmax(1) == mnist.test_labels[:2000]).mean()
    assert accuracy > 0.9


def test_batch_results_equal_single_results(engine, mnist):
    x = normalize(mnist.test_images[:16, None], engine.spec.mean, engine.spec.std)
    batched = engine.logits(x)
    single = np.concatenate([engine.logits(x[i:i + 1]) for i in range(16)])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4)


def test_contract_violations_are_refused(tiny_onnx_model, tmp_path):
    import onnx

    proto = onnx.load(str(tiny_onnx_model))
    kept = [(p.key, p.value) for p in proto.metadata_props]
    del proto.metadata_props[:]
    for key, value in kept:
        if key != "mean":
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.save(proto, str(tmp_path / "no_mean.onnx"))
    with pytest.raises(ValueError, match="mean"):
        OnnxClassifier(tmp_path / "no_mean.onnx", providers="cpu")

    for p in proto.metadata_props:
        if p.key == "classes":
            p.value = '["a", "b"]'
    entry = proto.metadata_props.add()
    entry.key, entry.value = "mean", "[0.1307]"
    onnx.save(proto, str(tmp_path / "bad_classes.onnx"))
    with pytest.raises(ValueError, match="classes"):
        OnnxClassifier(tmp_path / "bad_classes.onnx", providers="cpu")


@pytest.mark.skipif(cuda_usable(), reason="this machine has a usable GPU")
def test_strict_cuda_without_gpu_refuses_to_start(tiny_onnx_model):
    """ONNX Runtime would silently run on CPU; `cuda-only` must not."""
    with pytest.raises(ProviderError, match="strict"):
        OnnxClassifier(tiny_onnx_model, providers="cuda-only")


@pytest.mark.skipif(cuda_usable(), reason="this machine has a usable GPU")
@pytest.mark.parametrize("available", [None, ["CPUExecutionProvider"]], ids=["cuda-build", "cpu-only-build"])
def test_cuda_without_gpu_falls_back_to_cpu_and_says_so(tiny_onnx_model, available):
    engine = OnnxClassifier(tiny_onnx_model, providers="cuda", available_providers=available)
    assert engine.active_providers == ["CPUExecutionProvider"]
    info = engine.describe()
    assert info["requested_providers"][0] == "CUDAExecutionProvider" and info["provider_fallback"] is True
    assert "FALLING BACK TO CPU" in info["provider_warning"]


def test_auto_without_gpu_runs_on_cpu(tiny_onnx_model):
    if cuda_usable():
        pytest.skip("this machine has a usable GPU")
    assert OnnxClassifier(tiny_onnx_model, providers="auto").active_providers == ["CPUExecutionProvider"]


@pytest.mark.gpu
@requires_gpu
def test_cuda_provider_is_active_and_agrees_with_cpu(tiny_onnx_model, engine, mnist):
    gpu = OnnxClassifier(tiny_onnx_model, providers="cuda")
    assert gpu.active_providers[0] == "CUDAExecutionProvider"
    x = normalize(mnist.test_images[:64, None], engine.spec.mean, engine.spec.std)
    np.testing.assert_allclose(gpu.logits(x), engine.logits(x), rtol=1e-3, atol=1e-3)
