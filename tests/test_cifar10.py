"""CIFAR-10 beside MNIST: the `cifar10/` pipeline (the root's dvc.yaml, linked, with CIFAR-10's
params.yaml) trains into the same MLflow store under a registered model of its own; the gate never
compares a CIFAR-10 candidate with an MNIST champion; the service is told which model to serve.

The end-to-end test makes a git + DVC repo of the project's code, runs `dvc repro` (MNIST, tiny) and
`dvc repro cifar10/dvc.yaml` (CIFAR-10's training JPEGs from the data mirror, a small stratified
subset, a narrow airbench for one epoch), then serves each model over real HTTP.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from pipeline.params import load_params
from pipeline.promote import dataset_conflict
from tests.conftest import REPO_ROOT, repo_params
from tests.harness import mirror_path

CIFAR_DIR = REPO_ROOT / "cifar10"
CIFAR_TARBALL = "cifar10/cifar10-train-jpg.tar.gz"
LINKED = ("dvc.yaml", "bentofile.yaml", "models", "pipeline", "service")


def test_the_cifar10_folder_runs_the_roots_pipeline_with_its_own_params():
    for name in LINKED:  # one dvc.yaml and one copy of the code: the folder links to the root's
        link = CIFAR_DIR / name
        assert link.is_symlink() and link.resolve() == (REPO_ROOT / name).resolve(), name
    cifar, mnist = load_params(CIFAR_DIR / "params.yaml"), load_params(REPO_ROOT / "params.yaml")
    assert cifar.data.dataset == "cifar10" and cifar.data.transform == "crop" and cifar.data.test_fraction > 0
    assert cifar.promote.registered_model != mnist.promote.registered_model
    assert cifar.train.experiment != mnist.train.experiment
    assert cifar.train.augment_for("cifar10").hflip and cifar.train.augment_for("cifar10").translate == 4


def versions(*datasets: str) -> list[dict]:
    return [{"version": str(i + 1), "tags": {"dataset": d} if d else {}} for i, d in enumerate(datasets)]


def test_a_registered_model_takes_one_dataset():
    assert dataset_conflict("m", versions(), "cifar10") is None
    assert dataset_conflict("m", versions("cifar10", "cifar10"), "cifar10") is None
    assert dataset_conflict("m", versions(""), "cifar10") is None  # untagged versions do not block
    message = dataset_conflict("image-classifier", versions("mnist", "cifar10"), "cifar10")
    assert "'image-classifier' holds mnist models" in message and "promote.registered_model" in message


# --- end to end -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from tests.test_experiments import Repo, copy_code

    if not (mirror_path() / CIFAR_TARBALL).is_file():
        pytest.skip(f"the data mirror {mirror_path()} has no {CIFAR_TARBALL}")
    path = tmp_path_factory.mktemp("cifar-repo")
    copy_code(path)
    shutil.copytree(CIFAR_DIR, path / "cifar10", symlinks=True,
                    ignore=shutil.ignore_patterns("data", "outputs", "exports", "release", "checkpoints", "dvc.lock"))
    mnist = repo_params()
    mnist["data"].update(dataset="mnist", limit=400)
    mnist["train"].update(batch_size=64, device="cpu")
    mnist["models"] = {"mlp": {"epochs": 1, "lr": 0.01}}
    (path / "params.yaml").write_text(yaml.safe_dump(mnist, sort_keys=False))
    cifar = yaml.safe_load((CIFAR_DIR / "params.yaml").read_text())
    cifar["data"]["limit"] = 600
    cifar["train"].update(epochs=1, batch_size=64, device="cpu")
    cifar["models"] = {"airbench": {"kwargs": {"widths": [8, 16, 16]}}}
    (path / "cifar10" / "params.yaml").write_text(yaml.safe_dump(cifar, sort_keys=False))
    repo = Repo(path, tmp_path_factory.mktemp("cifar-bentoml"))
    repo.init_and_commit()
    repo.dvc("repro")
    repo.dvc("repro", "cifar10/dvc.yaml")
    return repo


def registered(repo) -> dict[str, str]:
    """registered model -> its champion's version (as MLflow's client spells it, a string), from the
    repo's one MLflow store"""
    with sqlite3.connect(repo.path / "mlflow.db") as con:
        rows = con.execute("SELECT name, version FROM registered_model_aliases WHERE alias = 'champion'")
        return {name: str(version) for name, version in rows}


def one_cifar_jpeg() -> tuple[str, bytes]:
    with tarfile.open(mirror_path() / CIFAR_TARBALL) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg") and "/ship/" in member.name:
                return member.name, tar.extractfile(member).read()
    raise AssertionError("no ship in the tarball")


@pytest.mark.slow
@pytest.mark.integration
def test_cifar10_trains_beside_mnist_in_one_registry(repo):
    assert registered(repo) == {"image-classifier": "1", "image-classifier-cifar10": "1"}
    promotion = json.loads((repo.path / "cifar10" / "release" / "promotion.json").read_text())
    assert promotion["registered_model"] == "image-classifier-cifar10" and promotion["decision"] == "champion"
    card = json.loads((repo.path / "cifar10" / "data" / "prepared" / "card.json").read_text())
    assert card["dataset"] == "cifar10" and card["image_size"] == 32 and card["channels"] == 3
    assert "carved out as test" in card["notes"]
    bento = json.loads((repo.path / "cifar10" / "release" / "bento.json").read_text())
    assert bento["model_tag"].startswith("image-classifier-cifar10:") and bento["bento_tag"]
    assert not (repo.path / "outputs" / "airbench").exists()  # each pipeline's outputs stay in its folder
    again = repo.dvc("repro", "cifar10/dvc.yaml").stdout
    assert "Running stage 'cifar10/dvc.yaml:train@airbench'" not in again


@pytest.mark.slow
@pytest.mark.integration
def test_a_cifar10_candidate_never_meets_the_mnist_champion(repo, tmp_path):
    params = yaml.safe_load((repo.path / "cifar10" / "params.yaml").read_text())
    params["promote"]["registered_model"] = "image-classifier"  # MNIST's
    mixed = repo.path / "cifar10" / "mixed-params.yaml"
    mixed.write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([shutil.which("python", path=repo.env()["PATH"]), "-m", "pipeline.promote", "--params",
                          mixed.name], cwd=repo.path / "cifar10", env=repo.env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "'image-classifier' holds mnist models" in out.stderr, out.stderr
    assert registered(repo) == {"image-classifier": "1", "image-classifier-cifar10": "1"}
    with sqlite3.connect(repo.path / "mlflow.db") as con:
        assert con.execute("SELECT COUNT(*) FROM model_versions WHERE name = 'image-classifier'").fetchone() == (1,)


@pytest.mark.slow
@pytest.mark.integration
def test_the_service_serves_the_model_it_is_told_to(repo, tmp_path):
    import httpx

    from tests.harness import bentoml_command, free_port, running

    name, jpeg = one_cifar_jpeg()
    files = [("images", (Path(name).name, jpeg, "image/jpeg"))]
    bento_tag = json.loads((repo.path / "cifar10" / "release" / "bento.json").read_text())["bento_tag"]
    for target, extra in (("service.service:Classifier", {"CLASSIFIER_MODEL_NAME": "image-classifier-cifar10"}),
                          ("service.service:Classifier", {}),
                          (bento_tag, {})):  # a CIFAR-10 Bento serves its own model, whatever the name says
        port = free_port()
        env = {**repo.env(), **extra, "CLASSIFIER_WORKERS": "1"}
        with running(bentoml_command(port, target, working_dir=repo.path), port, env, tmp_path / f"{port}.log"):
            meta = httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=30).json()
            answer = httpx.post(f"http://127.0.0.1:{port}/classify", files=files, timeout=60)
        want = "mnist" if target.startswith("service.") and not extra else "cifar10"
        assert (meta["dataset"], meta["model_name"]) == (want, "image-classifier" + ("-cifar10" if want == "cifar10" else "")), \
            (target, extra, meta)
        if want == "cifar10":
            assert answer.status_code == 200, answer.text
            assert "airplane" in meta["classes"] and answer.json()[0]["label"] in meta["classes"]
