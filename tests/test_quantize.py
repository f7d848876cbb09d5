"""bench/quantize.py on a tiny real model: the zoo's `cnn` fitted briefly on a real MNIST subset and
exported by the export stage's own function (pipeline.export.export_onnx). ~15 s on 2 CPU cores."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime.quantization")

from bench import quantize as q  # noqa: E402
from service.contract import write_metadata  # noqa: E402
from tests.harness import MissingData, load_mnist  # noqa: E402

N_TRAIN, N_TEST = 6000, 1000
MEAN, STD = 0.1307, 0.3081


@pytest.fixture(scope="module")
def mnist() -> dict[str, np.ndarray]:
    try:
        data = load_mnist()
    except MissingData as err:
        pytest.skip(str(err))
    return {
        "train_images": data.train_images[:N_TRAIN, None].copy(), "train_labels": data.train_labels[:N_TRAIN],
        "test_images": data.test_images[:N_TEST, None].copy(), "test_labels": data.test_labels[:N_TEST],
    }


@pytest.fixture(scope="module")
def fp32_model(mnist) -> bytes:
    """The zoo's cnn, two passes of Adam over 3000 real MNIST images, exported with the contract's metadata."""
    from models import create_model
    from pipeline.export import export_onnx
    from pipeline.modelfile import normalize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared small machine: OpenMP threads contending with other jobs crawl
    try:
        torch.manual_seed(0)
        model = create_model("cnn", 1, 10, 28)
        x = normalize(torch.from_numpy(mnist["train_images"]), [MEAN], [STD])
        y = torch.from_numpy(mnist["train_labels"])
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(2):
            for idx in torch.randperm(N_TRAIN).split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        meta = {"classes": [str(i) for i in range(10)], "in_channels": 1, "image_size": 28, "mean": [MEAN],
                "std": [STD], "arch": "cnn", "dataset": "mnist", "mlflow_run_id": "test-quantize-run",
                "num_params": sum(p.numel() for p in model.parameters())}
        return export_onnx(model.eval(), meta, opset=17).SerializeToString()
    finally:
        torch.set_num_threads(threads)


def variants(fp32: bytes, mnist, kinds=("int8", "fp16"), **kwargs) -> q.Outcome:
    return q.make_variants(fp32, mnist["train_images"], mnist["test_images"], mnist["test_labels"], list(kinds),
                           q.Int8Recipe(calibration_images=200), **kwargs)


def tamper_int8_weights(model: bytes) -> bytes:
    """Flip the sign of every quantized weight tensor: still a valid QDQ model, but a useless one."""
    from onnx import numpy_helper

    proto = onnx.load_from_string(model)
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.int8 and arr.size > 16:
            init.CopyFrom(numpy_helper.from_array((-arr.astype(np.int16)).clip(-127, 127).astype(np.int8), init.name))
    return proto.SerializeToString()


def project(tmp_path: Path, fp32: bytes, mnist) -> Path:
    (tmp_path / "exports" / "cnn").mkdir(parents=True)
    (tmp_path / "exports" / "cnn" / "model.onnx").write_bytes(fp32)
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    for split in ("train", "test"):
        np.savez(prepared / f"{split}.npz", images=mnist[f"{split}_images"], labels=mnist[f"{split}_labels"])
    return tmp_path


def test_both_variants_pass_their_gates_and_keep_the_contract(fp32_model, mnist):
    outcome = variants(fp32_model, mnist)
    fp32_meta = q.read_metadata(onnx.load_from_string(fp32_model))
    assert outcome.failures == {}, outcome.reports
    int8, fp16 = outcome.reports["int8"], outcome.reports["fp16"]
    assert int8["fp32_test_acc"] > 0.9  # a real (if briefly trained) model
    assert int8["acc_drop"] <= 0.005 and fp16["top1_agreement"] >= 0.999
    assert int8["size_bytes"] < len(fp32_model) and fp16["size_bytes"] < len(fp32_model)
    for kind, model in outcome.variants.items():
        proto = onnx.load_from_string(model)
        meta = q.read_metadata(proto)
        assert meta["precision"] == kind
        assert {k: v for k, v in meta.items() if k not in q.VARIANT_KEYS} == fp32_meta
        assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 in, as served
        assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert proto.graph.output[0].name == "logits"
    ops = {n.op_type for n in onnx.load_from_string(outcome.variants["int8"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert json.loads(q.read_metadata(onnx.load_from_string(outcome.variants["int8"]))["quantization"])["per_channel"]
    fp16_types = {i.data_type for i in onnx.load_from_string(outcome.variants["fp16"]).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in fp16_types
    # the service's own engine accepts each variant (contract check in service.engine.OnnxClassifier)
    for kind in ("int8", "fp16"):
        assert q.verify_contract(outcome.variants[kind], fp32_meta, kind) == []


def test_cli_writes_gated_variants_outside_the_export(fp32_model, mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project(tmp_path, fp32_model, mnist))
    assert q.main(["--arch", "cnn", "--calibration-images", "200"]) == 0
    out = tmp_path / "variants" / "cnn"
    assert sorted(p.name for p in (tmp_path / "exports" / "cnn").iterdir()) == ["model.onnx"]  # the export stage's own
    assert (tmp_path / "exports" / "cnn" / "model.onnx").read_bytes() == fp32_model
    for kind in ("int8", "fp16"):
        meta = q.read_metadata(onnx.load(str(out / f"model.{kind}.onnx")))
        assert meta["precision"] == kind and meta["arch"] == "cnn"
    summary = json.loads((out / "quantize.json").read_text())
    assert summary["int8_passed"] == 1 and summary["fp16_passed"] == 1
    assert all(isinstance(v, (int, float)) for v in summary.values())  # a DVC metrics file
    report = json.loads((out / "quantize-report.json").read_text())["reports"]
    assert report["int8"]["recipe"]["format"] == "QDQ" and report["int8"]["passed"] is True
    assert summary["fp32_test_acc"] - summary["int8_test_acc"] <= 0.005
    assert "PASS" in capsys.readouterr().out


def test_only_the_requested_variant_is_made(fp32_model, mnist, tmp_path, monkeypatch):
    monkeypatch.chdir(project(tmp_path, fp32_model, mnist))
    assert q.main(["--arch", "cnn", "--fp16"]) == 0
    assert (tmp_path / "variants/cnn/model.fp16.onnx").is_file()
    assert not (tmp_path / "variants/cnn/model.int8.onnx").exists()


def test_a_variant_that_fails_its_gate_is_not_written_and_the_stage_fails(fp32_model, mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project(tmp_path, fp32_model, mnist))
    stale = tmp_path / "variants/cnn/model.int8.onnx"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older variant")  # must not survive a failed run
    real = q.quantize_int8
    monkeypatch.setattr(q, "quantize_int8", lambda *a, **k: tamper_int8_weights(real(*a, **k)))
    assert q.main(["--arch", "cnn", "--calibration-images", "200"]) == 1
    assert not stale.exists()
    assert (tmp_path / "variants/cnn/model.fp16.onnx").is_file()  # the other variant is unaffected
    err = capsys.readouterr().err
    assert "int8 failed its gate" in err and "points below FP32" in err
    summary = json.loads((tmp_path / "variants/cnn/quantize.json").read_text())
    assert summary["int8_passed"] == 0 and summary["fp16_passed"] == 1


def test_an_impossible_gate_refuses_a_good_variant(fp32_model, mnist):
    outcome = variants(fp32_model, mnist, kinds=("fp16",), min_fp16_agreement=1.01)
    assert outcome.variants == {} and "agreement" in outcome.failures["fp16"]


def test_variants_that_break_the_service_contract_are_refused(fp32_model, mnist):
    try:
        from onnxconverter_common import float16
    except ImportError:
        from onnxruntime.transformers import float16

    fp32_meta = q.read_metadata(onnx.load_from_string(fp32_model))
    good = variants(fp32_model, mnist, kinds=("fp16",)).variants["fp16"]
    relabelled = onnx.load_from_string(good)
    write_metadata(relabelled, {**q.read_metadata(relabelled), "classes": json.dumps(list("abcdefghij"))})
    assert "metadata differs" in " ".join(q.verify_contract(relabelled.SerializeToString(), fp32_meta, "fp16"))
    assert "precision" in " ".join(q.verify_contract(good, fp32_meta, "int8"))
    fp16_io = float16.convert_float_to_float16(onnx.load_from_string(fp32_model), keep_io_types=False)
    write_metadata(fp16_io, {**fp32_meta, "precision": "fp16"})
    problems = q.verify_contract(fp16_io.SerializeToString(), fp32_meta, "fp16")
    assert problems and "float32" in problems[0]  # float16 input: the service would refuse it


def test_missing_inputs_are_clear_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert q.main(["--arch", "cnn"]) == 2
    assert "run the export stage first" in capsys.readouterr().err
