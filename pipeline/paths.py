"""Where things live, relative to the repository root (so stages work from any working directory)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

RAW_DIR = Path("data/raw")  # download cache (not tracked; DVC tracks data/prepared)
PREPARED_DIR = Path("data/prepared")
OUTPUTS_DIR = Path("outputs")  # one folder per architecture
CHECKPOINT_DIR = Path("checkpoints")  # resumable state; removed once a run completes
RELEASE_DIR = Path("release")  # promotion.json, bento.json


def arch_dir(arch: str) -> Path:
    return OUTPUTS_DIR / arch


def checkpoint_path(arch: str) -> Path:
    return CHECKPOINT_DIR / arch / "last.pt"


def data_mirror() -> Path | None:
    """The offline mirror folder named by DATA_MIRROR (laid out like ../shared/data), if set."""
    value = os.environ.get("DATA_MIRROR", "").strip()
    return Path(value).expanduser() if value else None
