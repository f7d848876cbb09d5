"""params.yaml: strict loading into frozen dataclasses; a bad value stops a stage at once, naming it."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import yaml

from models import list_models
from pipeline.params import (AugmentParams, DataParams, ModelSpec, Params, ParamsError, TrainParams, from_mapping,
                             load_params)
from tests.conftest import REPO_ROOT, deep_update, repo_params


def write_params(tmp_path, changes: dict | None = None, mutate=None):
    """The repo's params.yaml with `changes` merged in (or `mutate(dict)` applied)."""
    params = repo_params()
    deep_update(params, changes or {})
    if mutate is not None:
        mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


# --- the repository's params.yaml ------------------------------------------------------------------

def test_the_repository_params_yaml_loads():
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert isinstance(params.data, DataParams) and isinstance(params.train, TrainParams)
    raw = repo_params()
    assert params.data.dataset == raw["data"]["dataset"]
    assert params.train.epochs == raw["train"]["epochs"] and params.train.lr == raw["train"]["lr"]
    assert set(params.models) == set(raw["models"]) and set(params.models) <= set(list_models())
    assert all(isinstance(spec, ModelSpec) for spec in params.models.values())
    assert set(params.train.augment) == set(raw["train"]["augment"])
    assert all(isinstance(a, AugmentParams) for a in params.train.augment.values())
    assert isinstance(params.train.lr, float)


def test_a_minimal_file_gets_the_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("models:\n  cnn: {}\n")
    params = load_params(path)
    assert params.train == TrainParams() and params.data == DataParams()
    assert params.models == {"cnn": ModelSpec()}


def test_a_missing_file_is_a_params_error(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_invalid_yaml_is_a_params_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


# --- bad values name the key -----------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"trian": {"epochs": 1}}, "unknown key trian"),
    ({"train": {"lrr": 0.1}}, "unknown key train.lrr"),
    ({"data": {"limt": 5}}, "unknown key data.limt"),
    ({"train": {"augment": {"mnist": {"flip": True}}}}, "unknown key train.augment.mnist.flip"),
    ({"models": {"cnn": {"epoch": 3}}}, "unknown key models.cnn.epoch"),
    ({"train": {"epochs": "five"}}, "train.epochs = 'five'"),
    ({"train": {"epochs": 2.5}}, "train.epochs = 2.5"),
    ({"train": {"epochs": True}}, "train.epochs = True"),
    ({"train": {"epochs": 0}}, "train.epochs = 0"),
    ({"train": {"lr": -1}}, "train.lr = -1.0"),
    ({"train": {"lr": "fast"}}, "train.lr = 'fast'"),
    ({"train": {"nesterov": "yes"}}, "train.nesterov = 'yes'"),
    ({"train": {"optimizer": "adam"}}, "train.optimizer = 'adam'"),
    ({"train": {"schedule": "step"}}, "train.schedule = 'step'"),
    ({"train": {"val_fraction": 1.5}}, "train.val_fraction = 1.5"),
    ({"train": {"augment": {"imagenet": {}}}}, "train.augment.imagenet"),
    ({"train": {"augment": {"mnist": {"translate": -2}}}}, "augment.translate = -2"),
    ({"data": {"dataset": "imagenet"}}, "data.dataset = 'imagenet'"),
    ({"data": {"limit": -1}}, "data.limit = -1"),
    ({"data": {"channels": 2}}, "data.channels = 2"),
    ({"data": {"dataset": "imagefolder", "source": ""}}, "data.source"),
    ({"models": {"transformer": {}}}, "models.transformer = 'transformer'"),
    ({"models": {"cnn": {"lr": -1}}}, "train.lr = -1.0"),  # overrides are validated too (at train_for)
    ({"models": {"cnn": {"kwargs": []}}}, "models.cnn.kwargs = []"),
    ({"export": {"parity_atol": 0}}, "export.parity_atol = 0.0"),
    ({"evaluate": {"top_k": 0}}, "evaluate.top_k = 0"),
    ({"promote": {"registered_model": "Bad Name"}}, "promote.registered_model = 'Bad Name'"),
])
def test_bad_values_raise_params_error_naming_the_key(tmp_path, changes, message):
    path = write_params(tmp_path, changes)
    with pytest.raises(ParamsError, match=re.escape(message)):
        params = load_params(path)
        for arch in params.models:
            params.train_for(arch)


def test_an_empty_models_section_is_an_error(tmp_path):
    path = write_params(tmp_path, mutate=lambda p: p.update(models={}))
    with pytest.raises(ParamsError, match="models"):
        load_params(path)


def test_a_section_that_is_not_a_mapping_is_an_error(tmp_path):
    path = write_params(tmp_path, mutate=lambda p: p.update(train=[1, 2]))
    with pytest.raises(ParamsError, match=re.escape("train = [1, 2]")):
        load_params(path)


def test_params_error_is_a_value_error():
    assert issubclass(ParamsError, ValueError)
    with pytest.raises(ParamsError, match="unknown key x.bogus"):
        from_mapping(EvaluateLike, {"bogus": 1}, "x")


@dataclasses.dataclass(frozen=True)
class EvaluateLike:
    top_k: int = 5


# --- per-model overrides ---------------------------------------------------------------------------

def test_train_for_applies_per_model_overrides(tmp_path):
    path = write_params(tmp_path, mutate=lambda p: p.update(models={
        "cnn": {"epochs": 7, "lr": 0.2, "batch_size": 32, "weight_decay": 0.0},
        "vgg": {"kwargs": {"depth": 11, "width": 8}},
    }))
    params = load_params(path)
    cnn = params.train_for("cnn")
    assert (cnn.epochs, cnn.lr, cnn.batch_size, cnn.weight_decay) == (7, 0.2, 32, 0.0)
    assert cnn.momentum == params.train.momentum and cnn.schedule == params.train.schedule  # the rest is shared
    assert params.train_for("vgg") == params.train  # no overrides: the train section as is
    assert params.models["vgg"].kwargs == {"depth": 11, "width": 8}
    assert params.train.epochs == repo_params()["train"]["epochs"]  # the shared section is untouched
    with pytest.raises(ParamsError, match="'lenet5' is not listed under models"):
        params.train_for("lenet5")


def test_the_repository_overrides_apply():
    params = load_params(REPO_ROOT / "params.yaml")
    for arch, spec in repo_params()["models"].items():
        p = params.train_for(arch)
        for key in ("epochs", "lr", "batch_size", "weight_decay"):
            assert getattr(p, key) == (spec or {}).get(key, getattr(params.train, key)), (arch, key)


# --- frozen ----------------------------------------------------------------------------------------

def test_dataclasses_are_frozen():
    params = load_params(REPO_ROOT / "params.yaml")
    for obj, field in ((params, "train"), (params.train, "lr"), (params.data, "limit"),
                       (params.evaluate, "top_k"), (params.export, "opset"), (params.promote, "margin"),
                       (next(iter(params.models.values())), "epochs"),
                       (next(iter(params.train.augment.values())), "hflip")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, getattr(obj, field))
    with pytest.raises(ParamsError, match=re.escape("train.lr = -1")):
        dataclasses.replace(params.train, lr=-1)  # a modified copy is validated again


# --- the train stage's command line fails fast, leaving nothing behind -----------------------------

def synthetic_prepared(project_dir):
    """A tiny valid prepared dataset, so that only the bad params can stop the stage."""
    from pipeline.download import Dataset, Split, save_prepared

    rng = np.random.default_rng(0)

    def split(n):
        return Split(rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.int64) % 10)

    save_prepared(Dataset("mnist", [str(i) for i in range(10)], split(200), split(50), "synthetic"),
                  project_dir / "data" / "prepared")


@pytest.mark.parametrize("arch, changes, message", [
    ("nosuchmodel", {}, "'nosuchmodel'"),
    ("cnn", {"train": {"lr": -1}}, "train.lr = -1.0"),
    ("cnn", {"models": {"cnn": {"lr": -1}}}, "train.lr = -1.0"),
    ("cnn", {"models": {"cnn": {"kwargs": {"wings": 2}}}}, "wings"),
    ("cnn", {"train": {"epochs": "five"}}, "train.epochs = 'five'"),
    ("cnn", {"models": {"cnn": {"batch_size": 4096}}}, "train.batch_size = 4096"),
])
def test_train_cli_fails_fast_and_leaves_no_outputs(project, arch, changes, message):
    changes = dict(changes)
    project.write_params(deep_update({"cnn": {"epochs": 1}}, changes.pop("models", {})), **changes)
    synthetic_prepared(project.path)
    out = project.run("pipeline.train", "--arch", arch, check=False, timeout=120)
    assert out.returncode != 0, out.stdout
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr  # a one-line error, not a crash
    assert not (project.path / "outputs").exists()
    assert not (project.path / "checkpoints").exists()
    assert not (project.path / "mlflow.db").exists()
