"""The model contract (service/contract.py) has one owner: the pipeline's torch code computes the
same numbers, the service never imports torch, and the metadata round-trips through ONNX."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from service import contract

REPO = Path(__file__).resolve().parents[1]


def imported_by(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_contract_imports_numpy_only():
    assert not imported_by("service.contract") & {"torch", "onnx", "onnxruntime", "PIL", "bentoml"}


@pytest.mark.slow
def test_the_service_imports_no_torch():
    """The whole BentoML service module (BentoML, ONNX Runtime and all) without torch."""
    assert "torch" not in imported_by("service.service")


def test_resize_names_match_the_pillow_filters():
    from service.preprocessing import RESAMPLE_FILTERS

    assert tuple(RESAMPLE_FILTERS) == contract.RESIZE_FILTERS


def test_training_and_export_normalize_like_the_contract():
    from pipeline.modelfile import normalize as modelfile_normalize
    from pipeline.train import BatchMaker

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 3, 32, 32), dtype=np.uint8)
    mean, std = [0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616]
    want = contract.normalize(images, mean, std)
    batch = BatchMaker(mean, std, torch.device("cpu"), channels_last=False)(torch.from_numpy(images))
    np.testing.assert_array_equal(batch.numpy(), want)  # bit for bit: the parity gate relies on it
    np.testing.assert_array_equal(modelfile_normalize(torch.from_numpy(images), mean, std).numpy(), want)


def test_metadata_round_trips_through_onnx_and_validates():
    import onnx

    meta = {"classes": list("0123456789"), "in_channels": 1, "image_size": 28, "mean": [0.1307], "std": [0.3081],
            "arch": "cnn", "dataset": "mnist", "mlflow_run_id": "abc", "num_params": 1234}
    proto = contract.write_metadata(onnx.ModelProto(), contract.metadata_props(meta))
    props = contract.read_metadata(proto.SerializeToString())
    assert contract.missing_keys(props) == []
    assert contract.parse_metadata(props)["mean"] == [0.1307] and props["mlflow_run_id"] == "abc"
    spec = contract.PreprocessSpec.from_metadata(props)
    assert (spec.input_shape, spec.resize, spec.classes[-1]) == ((1, 28, 28), "bilinear", "9")
    assert spec == contract.PreprocessSpec.from_metadata(contract.parse_metadata(props))  # a store entry's mirror
    del props["std"]
    assert contract.missing_keys(props) == ["std"]
    with pytest.raises(ValueError, match="std"):
        contract.PreprocessSpec.from_metadata(props)


def test_softmax_and_logits_in_batches():
    logits = np.array([[1000.0, 1000.0, -1000.0]], dtype=np.float32)
    np.testing.assert_allclose(contract.softmax(logits), [[0.5, 0.5, 0.0]], atol=1e-7)
    with pytest.raises(ValueError):
        contract.softmax(np.zeros(3))
