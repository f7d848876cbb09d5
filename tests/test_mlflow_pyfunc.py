"""The registered model is servable by MLflow itself, its version carries a model card, and training
records its datasets (issue "MLflow conventions").

- ``service.mlflow_model`` (the pyfunc's loader module) answers as ``service.predictor.Predictor``
  does, one row per image, a bad image being its own row (reason + error), never the batch's failure;
- ``pipeline.model_card.model_card`` (pure) holds data, metrics, parity, intended use and limits, and
  fits MLflow's 5000-character description;
- ``pipeline.tracking.dataset_inputs``/``log_datasets``: metadata-only dataset inputs, idempotent;
- end to end, on a project where the real train, evaluate and export stages ran (``exported_models``)
  and then the real promote stage (``register_export``): each version is a pyfunc model holding the
  exact ONNX bytes with the card as description; the training runs list their datasets;
  ``mlflow.pyfunc.load_model("models:/...@champion").predict`` in process, and ``mlflow models serve``
  in a subprocess (offline, outside the checkout: the model brings its own code) answering real POSTs.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import clone_project
from tests.harness import REPO, build_tiny_onnx_model, free_port, start, stop, wait_ready

NAME = "image-classifier"


def png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W] or [1, H, W] -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8).reshape(pixels.shape[-2:])).save(buf, format="PNG")
    return buf.getvalue()


def bad_images() -> dict[str, object]:
    """A cell per failure the pyfunc must turn into its own row: reason -> value."""
    noise = png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    truncated = noise[:len(noise) // 2]
    return {"not_an_image": b"these bytes are no image file", "empty": b"", "truncated": truncated}


# --- the loader module, on a tiny real model ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, mnist) -> Path:
    return build_tiny_onnx_model(mnist, tmp_path_factory.mktemp("tiny") / "model.onnx", input_transform="digit")


@pytest.mark.slow
def test_loader_module_answers_as_the_predictor_and_a_bad_image_is_its_own_row(tiny_onnx, mnist):
    import pandas as pd

    from service import mlflow_model
    from service.predictor import Predictor

    digits = [png(image) for image in mnist.test_images[:12]]
    bad = bad_images()
    model = mlflow_model._load_pyfunc(str(tiny_onnx), {"providers": "cpu", "threads": 1})
    cells = digits[:6] + list(bad.values()) + [None, "aGVsbG8="] + digits[6:]
    out = model.predict(pd.DataFrame({"image": cells}), params={"top_k": 3})

    assert list(out.columns) == list(mlflow_model.OUTPUT_COLUMNS) and len(out) == len(cells)
    expected = Predictor(tiny_onnx, providers="cpu").classify(digits, top_k=3)
    good = out[out["reason"].isna()]
    assert good["label"].tolist() == [e["label"] for e in expected]
    assert good["index"].tolist() == [e["index"] for e in expected]
    assert np.allclose(good["score"].astype(float), [e["score"] for e in expected], rtol=0, atol=1e-6)
    assert [len(k) for k in good["top_k"]] == [3] * len(digits)
    assert [[t["label"] for t in k] for k in good["top_k"]] == [[t["label"] for t in e["top_k"]] for e in expected]
    assert np.mean(good["label"].astype(int).to_numpy() == mnist.test_labels[:12]) >= 0.75  # a real classifier

    rows = out.iloc[6:6 + len(bad) + 2]
    assert rows["reason"].tolist() == [*bad, "empty", "not_an_image"]
    assert rows["label"].isna().all() and rows["top_k"].isna().all() and rows["error"].map(bool).all()
    assert Predictor(tiny_onnx, providers="cpu").classify([bad["truncated"]])[0].reason == "truncated"

    # what MLflow's scoring server writes: strict JSON, no NaN, no pandas NA
    json.dumps(out.to_dict(orient="records"), allow_nan=False)
    with pytest.raises(Exception, match="top_k must be a positive integer"):
        model.predict(pd.DataFrame({"image": digits[:1]}), params={"top_k": 0})
    assert model.predict(pd.DataFrame({"image": []})).empty


@pytest.mark.slow
def test_the_input_example_is_answered_by_a_digit_model(tiny_onnx):
    from service import mlflow_model

    model = mlflow_model._load_pyfunc(str(tiny_onnx), {"providers": "cpu", "threads": 1})
    out = model.predict({"image": [mlflow_model.example_image(model.spec)]})
    assert out["reason"][0] is None and out["label"][0] == "1", out.to_dict(orient="records")


def test_the_loader_module_imports_neither_mlflow_nor_pandas():
    code = ("import sys, service.mlflow_model; "
            "print(sorted(m for m in ('mlflow', 'pandas', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# --- the model card (pure) -----------------------------------------------------------------------------

def export_report(classes: list[str], transform: str = "digit") -> dict:
    """An export report as pipeline/export.py writes it (keys and value types)."""
    return {
        "max_abs_logit_diff": 3.1e-06, "parity_atol": 0.0001, "top1_agreement": 1.0, "top1_disagreements": 0,
        "onnx_test_acc": 0.9871, "torch_test_acc": 0.9871, "images": 3000, "passed": True, "opset": 17,
        "onnx_sha256": "ab" * 32, "evaluate_test_acc": 0.9871, "test_set_sha256": "cd" * 32, "arch": "cnn",
        "evaluation": {"test_acc": 0.9871, "test_top5_acc": 0.9993, "macro_f1": 0.987, "ece": 0.0123,
                       "latency_ms_batch1": 0.4321, "latency_ms_batch256": 12.5, "test_count": 3000},
        "metadata": {"classes": json.dumps(classes), "in_channels": "1", "image_size": "28", "mean": "[0.1307]",
                     "std": "[0.3081]", "arch": "cnn", "dataset": "mnist", "mlflow_run_id": "run0123",
                     "num_params": "21840", "resize": "bilinear", "input_transform": transform},
    }


def dataset_card(classes: list[str]) -> dict:
    return {"dataset": "mnist", "source": "https://example.org/mnist/", "classes": classes, "num_classes": len(classes),
            "channels": 1, "image_size": 28, "mean": [0.1307], "std": [0.3081], "input_transform": "digit",
            "splits": {"train": {"count": 3000, "per_class": {c: 1 for c in classes}, "sha256": "ef" * 32},
                       "test": {"count": 3000, "per_class": {c: 1 for c in classes}, "sha256": "cd" * 32}}}


def test_model_card_states_data_metrics_parity_use_and_limits():
    from pipeline.model_card import MAX_CHARS, model_card

    classes = [str(i) for i in range(10)]
    text = model_card(export_report(classes), dataset_card(classes), training={"final_val_acc": 0.9811},
                      registered_model="digits")
    for heading in ("# cnn on mnist", "## Intended use", "## Limits", "## Data", "## Metrics", "## Parity", "## Serving"):
        assert heading in text, heading
    for fact in ("run0123", "ab" * 32, "ef" * 32, "cd" * 32, "https://example.org/mnist/", "| train | 3000 |",
                 "| test_acc | 0.9871 |", "| test_top5_acc | 0.9993 |", "| ece | 0.0123 |",
                 "| final_val_acc (training run) | 0.9811 |", "3.10e-06", "limit 1.00e-04", "100.00 %",
                 "0 disagreements over 3000 images", "opset 17", "passed", "no_ink", "~60 %", "read as 7",
                 "**digit**", 'models:/digits@champion', "--env-manager local"):
        assert fact in text, fact
    assert len(text) <= MAX_CHARS and "prepared again" not in text
    assert "no_ink" not in model_card(export_report(classes, "crop"), dataset_card(classes))
    changed = dataset_card(classes)
    changed["splits"]["test"]["sha256"] = "99" * 32  # data/prepared made again after the export
    assert f"prepared again since this export (test split SHA-256 `{'cd' * 32}`" in model_card(export_report(classes), changed)

    many = [f"class_{i:04d}_" + "x" * 300 for i in range(2000)]  # 20 of them would not fit: 5 are named
    big = model_card(export_report(many, "crop"), dataset_card(many))
    assert len(big) <= MAX_CHARS and "## Parity" in big and "and 1995 more" in big
    cut = model_card(export_report(classes), dataset_card(classes), max_chars=1000)
    assert len(cut) <= 1000 and cut.endswith("in the run's artifacts)")


# --- dataset inputs --------------------------------------------------------------------------------------

def test_dataset_inputs_are_metadata_with_the_cards_digests_and_logging_them_twice_adds_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from pipeline import tracking

    classes = [str(i) for i in range(10)]
    card = dataset_card(classes)
    validation = {"count": 300, "per_class": {c: 30 for c in classes}, "sha256": "12" * 32}
    inputs = tracking.dataset_inputs(card, "data/prepared", validation)
    contexts = [next(t.value for t in i.tags if t.key == "mlflow.data.context") for i in inputs]
    assert contexts == ["training", "validation", "test"]
    for item, sha in zip(inputs, ("ef" * 32, "12" * 32, "cd" * 32)):
        assert item.dataset.name == "mnist" and item.dataset.digest == sha[:tracking.DATASET_DIGEST_CHARS]
        assert len(item.dataset.digest) <= 36 and json.loads(item.dataset.profile)["sha256"] == sha
        assert "mlflow_tensorspec" in json.loads(item.dataset.schema)
    assert json.loads(inputs[0].dataset.source)["uri"] == "data/prepared/train.npz"
    assert json.loads(inputs[2].dataset.source)["uri"] == "data/prepared/test.npz"
    assert json.loads(inputs[0].dataset.profile)["validation_carved_out"] == 300

    run = tracking.start_run("tests", "datasets")
    run.log_datasets(card, "data/prepared", validation)
    run.log_datasets(card, "data/prepared", validation)  # a resumed training logs them again
    logged = tracking.client().get_run(run.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.digest for i in logged) == sorted(i.dataset.digest for i in inputs)


# --- end to end: the real stages, the registry, MLflow's own loading and serving ------------------------

@pytest.fixture(scope="module")
def promoted(tmp_path_factory, exported_models):
    """`exported_models` (real train, evaluate, export of cnn and mlp) cloned, then the real promote
    stage: both exports registered through `register_export`, cnn the champion."""
    project = clone_project(exported_models, tmp_path_factory.mktemp("pyfunc") / "project")
    started = time.monotonic()
    out = project.run("pipeline.promote")
    print(f"promote (two pyfunc models logged and registered): {time.monotonic() - started:.1f} s")
    assert "champion" in out.stdout, out.stdout
    return project


@pytest.fixture
def registry(promoted, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", promoted.tracking_uri)
    from pipeline import tracking

    return tracking


def reports(project) -> dict[str, dict]:
    return {arch: json.loads((project.path / "exports" / arch / "export.json").read_text()) for arch in ("cnn", "mlp")}


def sample_images(project, n: int = 16) -> tuple[list[bytes], np.ndarray]:
    """The first `n` images of the prepared test split as PNG files, and their labels."""
    with np.load(project.path / "data" / "prepared" / "test.npz") as npz:
        return [png(image) for image in npz["images"][:n]], npz["labels"][:n]


@pytest.mark.slow
@pytest.mark.integration
def test_promote_registers_each_export_as_a_pyfunc_with_its_onnx_bytes_and_its_model_card(promoted, registry, tmp_path):
    card = json.loads((promoted.path / "data" / "prepared" / "card.json").read_text())
    versions = {v["tags"]["arch"]: v for v in registry.list_versions(NAME)}
    assert set(versions) == {"cnn", "mlp"}
    for arch, report in reports(promoted).items():
        version = versions[arch]
        description = version["description"]
        assert len(description) <= registry.MAX_DESCRIPTION_CHARS
        for fact in (f"# {arch} on mnist", "## Intended use", "## Limits", "## Data", "## Metrics", "## Parity",
                     report["onnx_sha256"], report["metadata"]["mlflow_run_id"], card["splits"]["train"]["sha256"],
                     f"| test_acc | {report['evaluation']['test_acc']:.4f} |", f"opset {report['opset']}",
                     "no_ink", f"models:/{NAME}@champion"):
            assert fact in description, (arch, fact)

        folder = registry.download_version(NAME, version["version"], tmp_path / arch)
        onnx_bytes = (folder / "model.onnx").read_bytes()
        assert hashlib.sha256(onnx_bytes).hexdigest() == version["tags"]["onnx_sha256"] == report["onnx_sha256"]
        assert onnx_bytes == (promoted.path / "exports" / arch / "model.onnx").read_bytes()
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
        pyfunc = mlmodel["flavors"]["python_function"]
        assert (pyfunc["loader_module"], pyfunc["data"], pyfunc["code"]) == ("service.mlflow_model", "model.onnx", "code")
        assert mlmodel["flavors"]["onnx"]["data"] == "model.onnx"
        assert (folder / "code" / "service" / "predictor.py").read_bytes() == (REPO / "service" / "predictor.py").read_bytes()
        assert json.loads(mlmodel["signature"]["inputs"]) == [{"type": "binary", "name": "image", "required": True}]
        assert [p["name"] for p in json.loads(mlmodel["signature"]["params"])] == ["top_k"]
        assert {c["name"] for c in json.loads(mlmodel["signature"]["outputs"])} >= {"label", "score", "reason", "error"}
        serving = json.loads((folder / "serving_input_example.json").read_text())
        assert serving["dataframe_split"]["columns"] == ["image"] and serving["params"] == {"top_k": 3}
        assert "onnxruntime" in (folder / "requirements.txt").read_text()


@pytest.mark.slow
@pytest.mark.integration
def test_training_runs_record_their_training_validation_and_test_data(promoted, registry):
    card = json.loads((promoted.path / "data" / "prepared" / "card.json").read_text())
    for arch, report in reports(promoted).items():
        run = registry.client().get_run(report["metadata"]["mlflow_run_id"])
        inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
                  for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"training", "validation", "test"}, arch
        for context, split in (("training", "train"), ("test", "test")):
            assert inputs[context].name == card["dataset"]
            assert inputs[context].digest == card["splits"][split]["sha256"][:registry.DATASET_DIGEST_CHARS]
            assert json.loads(inputs[context].profile)["count"] == card["splits"][split]["count"]
        validation = json.loads(inputs["validation"].profile)
        assert 0 < validation["count"] < card["splits"]["train"]["count"]
        assert json.loads(inputs["training"].profile)["validation_carved_out"] == validation["count"]


@pytest.mark.slow
@pytest.mark.integration
def test_pyfunc_load_model_of_the_champion_predicts_what_the_service_predictor_predicts(promoted, registry):
    import mlflow
    import pandas as pd

    from service.predictor import Predictor

    champion = registry.version_by_alias(NAME, "champion")
    images, labels = sample_images(promoted)
    bad = bad_images()
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict(pd.DataFrame({"image": images + list(bad.values())}), params={"top_k": 2})
    expected = Predictor(promoted.path / "exports" / champion["tags"]["arch"] / "model.onnx").classify(images, 2)
    assert out["label"].tolist()[:len(images)] == [e["label"] for e in expected]
    assert np.allclose(out["score"][:len(images)].astype(float), [e["score"] for e in expected], rtol=0, atol=1e-5)
    assert out["reason"].tolist() == [None] * len(images) + list(bad)
    assert np.mean(out["label"][:len(images)].astype(int).to_numpy() == labels) >= 0.75


@pytest.mark.slow
@pytest.mark.integration
def test_the_model_folder_brings_its_own_code(promoted, registry, tmp_path):
    """A clean interpreter (no site: neither this checkout nor its editable install on the path, only
    the venv's packages) loads the downloaded champion folder and answers from its code/ copy."""
    folder = registry.download_version(NAME, registry.version_by_alias(NAME, "champion")["version"], tmp_path / "dl")
    import sysconfig

    code = (f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r}); import mlflow; "
            f"m = mlflow.pyfunc.load_model({str(folder)!r}); "
            "out = m.predict(m.input_example, params={'top_k': 2}); "
            "print(sys.modules['service'].__file__); print(out['label'][0], len(out['top_k'][0]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    service_file, answer = out.stdout.strip().splitlines()[-2:]
    assert Path(service_file).resolve() == (folder / "code" / "service" / "__init__.py").resolve()
    assert answer == "1 2"


def serve_env(promoted, tmp_path: Path) -> dict[str, str]:
    """`mlflow models serve`'s environment: this store, no network, no checkout on the path (the
    model's own code/ must do), temporaries under tmp_path."""
    return {"MLFLOW_TRACKING_URI": promoted.tracking_uri, "PYTHONPATH": "", "TMPDIR": str(tmp_path),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_models_serve_answers_a_real_request(promoted, registry, tmp_path):
    import httpx

    from service.predictor import Predictor

    champion = registry.version_by_alias(NAME, "champion")
    port = free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow_cli), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    log_path = tmp_path / "serve.log"
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    started = time.monotonic()
    proc = start(cmd, serve_env(promoted, tmp_path), log_path, cwd=workdir)
    try:
        url = f"http://127.0.0.1:{port}"
        ready_s = wait_ready(f"{url}/ping", proc, log_path, started, timeout=180)
        images, labels = sample_images(promoted)
        bad = bad_images()
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(b).decode()] for b in images + list(bad.values())]},
                "params": {"top_k": 3}}
        resp = httpx.post(f"{url}/invocations", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        rows = resp.json()["predictions"]
        expected = Predictor(promoted.path / "exports" / champion["tags"]["arch"] / "model.onnx").classify(images, 3)
        assert [r["label"] for r in rows[:len(images)]] == [e["label"] for e in expected]
        assert np.allclose([r["score"] for r in rows[:len(images)]], [e["score"] for e in expected], rtol=0, atol=1e-5)
        assert all(len(r["top_k"]) == 3 and r["reason"] is None for r in rows[:len(images)])
        assert [(r["label"], r["reason"]) for r in rows[len(images):]] == [(None, reason) for reason in bad]
        assert all(r["error"] for r in rows[len(images):])
        assert np.mean(np.array([int(r["label"]) for r in rows[:len(images)]]) == labels) >= 0.75

        # the version's own serving example, as MLflow wrote it
        folder = registry.download_version(NAME, champion["version"], tmp_path / "champion")
        example = httpx.post(f"{url}/invocations", content=(folder / "serving_input_example.json").read_bytes(),
                             headers={"Content-Type": "application/json"}, timeout=60)
        assert example.status_code == 200 and example.json()["predictions"][0]["label"] == "1", example.text
        records = httpx.post(f"{url}/invocations", json={"dataframe_records": [{"image": base64.b64encode(images[0]).decode()}]},
                             timeout=60)
        assert records.status_code == 200 and records.json()["predictions"][0]["label"] == expected[0]["label"]
        refused = httpx.post(f"{url}/invocations", json={**body, "params": {"top_k": 0}}, timeout=60)
        assert refused.status_code == 400 and "top_k must be a positive integer" in refused.text
        print(f"mlflow models serve: ready in {ready_s:.1f} s")
    finally:
        stop(proc)
