"""Where things live, relative to the repository root (so stages work from any working directory)."""
from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # this code's checkout (a DVC experiment's copy in --temp/--queue)

RAW_DIR = Path("data/raw")  # download cache (not tracked; DVC tracks data/prepared)
PREPARED_DIR = Path("data/prepared")
OUTPUTS_DIR = Path("outputs")  # one folder per architecture
CHECKPOINT_DIR = Path("checkpoints")  # resumable state; removed once a run completes
RELEASE_DIR = Path("release")  # promotion.json, bento.json
EXPORTS_DIR = Path("exports")  # one folder per architecture: model.onnx, export.json, parity.json


def arch_dir(arch: str) -> Path:
    return OUTPUTS_DIR / arch


def export_dir(arch: str) -> Path:
    return EXPORTS_DIR / arch


def checkpoint_path(arch: str) -> Path:
    return CHECKPOINT_DIR / arch / "last.pt"


def data_mirror() -> Path | None:
    """The offline mirror folder named by DATA_MIRROR (laid out like ../shared/data), if set."""
    value = os.environ.get("DATA_MIRROR", "").strip()
    return Path(value).expanduser() if value else None


@lru_cache(maxsize=1)
def workspace_root() -> Path:
    """The user's workspace, whatever copy of the code runs: DVC sets DVC_ROOT for every stage to the
    main repository, also in `dvc exp run --temp/--queue`, whose stages run in a copy under
    .dvc/tmp/exps/; outside DVC, the folder holding git's common dir (the main checkout of a git
    worktree); else this checkout."""
    root = os.environ.get("DVC_ROOT", "").strip()
    if root and Path(root).is_dir():
        return Path(root).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip()).resolve().parent
    except OSError:
        pass
    return REPO_ROOT


def isolated_experiment() -> str | None:
    """The experiment's name when this stage runs in a `dvc exp run --temp/--queue` copy (not in the
    workspace): such runs register candidates but leave the serving aliases and store alone."""
    root = os.environ.get("DVC_ROOT", "").strip()
    if not root:
        return None
    executors = Path(root).resolve() / ".dvc" / "tmp" / "exps"  # where DVC's temp and queue executors run
    if executors not in Path.cwd().resolve().parents:
        return None
    return os.environ.get("DVC_EXP_NAME") or Path.cwd().name


def experiments_may_promote() -> bool:
    """PROMOTE_IN_EXPERIMENTS=1: let --temp/--queue experiments move aliases and package (off by default)."""
    return os.environ.get("PROMOTE_IN_EXPERIMENTS", "").strip().lower() in ("1", "true", "yes")
