"""Path-based shorthands over `tests.conftest.Project` for module-scoped fixtures that hold a bare
folder (tmp_path_factory) rather than a `Project`: the same environment, params and runner."""
from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import Project
from tests.harness import mirror_path


def _project(folder: Path) -> Project:
    return Project(Path(folder), mirror_path())


def stage_env(folder: Path, **extra: str) -> dict[str, str]:
    """PYTHONPATH at the checkout, data from the mirror, MLflow in the folder's own SQLite file."""
    return _project(folder).env(**extra)


def run_stage(folder: Path, module: str, *args: str, check: bool = True, env: dict | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    return _project(folder).run(module, *args, check=check, env=env, timeout=timeout)


def write_params(folder: Path, models: dict, limit: int = 3000, train: dict | None = None, **promote) -> Path:
    """The repo's params.yaml with a small data subset, the given models and overrides."""
    return _project(folder).write_params(models, limit=limit, train=train or {}, promote=promote)
