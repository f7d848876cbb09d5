"""Top-level fixtures: run the real pipeline stages as subprocesses in throwaway project folders.

The stages use paths relative to the working directory (params.yaml, data/prepared, outputs/,
checkpoints/), so an end-to-end test gets its own folder (`make_project()` / `project`) and runs
`python -m pipeline.<stage>` there with:

- PYTHONPATH at this checkout (computed from this file, so a fresh clone anywhere works),
- DATA_MIRROR at the offline data (tests.harness.mirror_path: the DATA_MIRROR env var when set, else
  <repo>/../shared/data),
- MLFLOW_TRACKING_URI at a SQLite file inside the project folder (the repo's store is never touched).

`prepared_mnist` downloads a small stratified MNIST subset once per session; `Project.copy_prepared`
puts a copy of it into a project so training tests skip the download.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.harness import MNIST_FILES, Mnist, MissingData, load_mnist, mirror_path
from tests.harness import REPO as REPO_ROOT

# Variables a stage must not inherit from the test runner (a torchrun launch, a user's MLflow server).
_STRIP_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "TORCHELASTIC_RUN_ID", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")


def deep_update(base: dict, changes: dict) -> dict:
    """Recursively merge `changes` into `base` (mappings merge; anything else replaces)."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def repo_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


@dataclass
class Project:
    """A throwaway project folder: params.yaml, the stages' relative outputs, an MLflow SQLite store."""

    path: Path
    mirror: Path

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.path / 'mlflow.db'}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _STRIP_ENV}
        pythonpath = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env.update({"PYTHONPATH": os.pathsep.join(pythonpath), "DATA_MIRROR": str(self.mirror),
                    "MLFLOW_TRACKING_URI": self.tracking_uri, "PYTHONUNBUFFERED": "1",
                    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
        env.update(extra)
        return env

    def write_params(self, models: dict | None = None, *, limit: int = 3000, **sections: dict) -> Path:
        """The repo's params.yaml (so the schema stays real) with a small data subset, an `tests`
        experiment, the given `models:` and any section overrides (merged recursively)."""
        params = repo_params()
        params["data"].update({"dataset": "mnist", "limit": limit})
        params["train"].update({"experiment": "tests", "batch_size": 64, "device": "cpu"})
        if models is not None:
            params["models"] = copy.deepcopy(models)
        deep_update(params, sections)
        path = self.path / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    def command(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    def run(self, module: str, *args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        out = subprocess.run(self.command(module, *args), cwd=self.path, env=env or self.env(),
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"`python -m {module} {' '.join(args)}` exited {out.returncode}\n"
                                 f"--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}")
        return out

    def popen(self, module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(self.command(module, *args), cwd=self.path, env=env or self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def copy_prepared(self, prepared: Path) -> Path:
        target = self.path / "data" / "prepared"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(prepared, target)
        return target


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_mirror() -> Path:
    """The offline MNIST mirror; the tests that need it skip (saying why) when it is absent."""
    mirror = mirror_path()
    missing = [f for f in MNIST_FILES.values() if not (mirror / "mnist" / f).is_file()]
    if missing:
        pytest.skip(f"offline data mirror {mirror}/mnist lacks {missing}: set DATA_MIRROR to a folder laid "
                    f"out like ../shared/data")
    return mirror


@pytest.fixture(scope="session")
def mnist() -> Mnist:
    """The MNIST IDX files as numpy arrays (tests.harness.load_mnist: ``$MNIST_DIR``, else
    ``$DATA_MIRROR/mnist``, default ``../shared/data/mnist``); the tests that need it skip, saying why,
    when they are missing."""
    try:
        return load_mnist()
    except MissingData as err:
        pytest.skip(f"MNIST data missing: {err}")


@pytest.fixture
def make_project(tmp_path_factory):
    """Factory: a new empty project folder per call (the mirror is looked up lazily, see `data_mirror`)."""
    def make(name: str = "project") -> Project:
        return Project(tmp_path_factory.mktemp(name), mirror_path())

    return make


@pytest.fixture
def project(make_project) -> Project:
    return make_project()


@pytest.fixture(scope="session")
def prepared_mnist(tmp_path_factory, data_mirror) -> Path:
    """data/prepared of a 3000-image-per-split stratified MNIST subset, made once by the real download
    stage; copy it (Project.copy_prepared), never modify it."""
    proj = Project(tmp_path_factory.mktemp("prepared-mnist"), data_mirror)
    proj.write_params({"cnn": {}}, limit=3000)
    proj.run("pipeline.download")
    return proj.path / "data" / "prepared"


#: the two models of `exported_models`: a decent `cnn` and a deliberately weak `mlp`
EXPORTED_MODELS = {"cnn": {"epochs": 2, "lr": 0.05}, "mlp": {"epochs": 1, "lr": 0.0002}}


@pytest.fixture(scope="session")
def exported_models(tmp_path_factory, prepared_mnist) -> Path:
    """A project folder in which train, evaluate and export ran for EXPORTED_MODELS (nothing
    registered yet), made once per session; clone it (`clone_project`), never modify it."""
    proj = Project(tmp_path_factory.mktemp("exported"), mirror_path())
    proj.write_params(EXPORTED_MODELS)
    proj.copy_prepared(prepared_mnist)
    for arch in EXPORTED_MODELS:
        for stage in ("pipeline.train", "pipeline.evaluate", "pipeline.export"):
            proj.run(stage, "--arch", arch)
    return proj.path


def clone_project(source: Path, target: Path) -> Project:
    """A copy of a project folder, MLflow store included (its runs keep their artifacts where they
    are: the copy reads them, and new runs' artifacts land beside the source's)."""
    shutil.copytree(source, target)
    return Project(target, mirror_path())
