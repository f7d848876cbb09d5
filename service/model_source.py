"""Which stored model a worker serves, and the store's alias pointers (no bentoml, mlflow or torch).

The MLflow registry alias (``champion`` by default) decides what is served. The BentoML store keeps
versions (content hash, registry version, run id in their labels) and never records an alias in
them; which store entry serves which alias is written in ONE place, the pointer file
``$BENTOML_HOME/aliases/<model name>.json``::

    {"champion": {"tag": "image-classifier:abc", "registry_version": "3", "onnx_sha256": "...",
                  "mlflow_run_id": "...", "registered_model": "image-classifier", "since": "...Z"},
     "challenger": {...}}

``python -m pipeline.package`` (and the service's follower, which runs it) writes it, atomically and
under a lock (``pipeline.bento_store.point_alias``); the service only reads it. Selection (:func:`select_model`), first match wins:

1. a built Bento: the model its manifest lists (the version it was built with) -> pinned;
2. ``CLASSIFIER_MODEL_VERSION`` set -> that store version, pinned (``latest`` = newest at start-up);
3. otherwise the pointer of ``CLASSIFIER_MODEL_ALIAS`` -> followed: the service swaps models when
   the pointer (or, with the registry reachable, the alias itself) moves.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

POINTER_DIR = "aliases"
#: a stored version's facts, in its labels (else metadata); never an alias, which moves
REGISTRY_KEYS = ("registry_version", "mlflow_run_id")


class NoModelForAlias(LookupError):
    """The store's pointer file names no entry for the alias."""


def bentoml_home() -> Path:
    """BentoML's home as BentoML resolves it: ``$BENTOML_HOME``, else ``~/bentoml``."""
    return Path(os.environ.get("BENTOML_HOME") or "~/bentoml").expanduser()


def pointer_file(name: str, home: Optional[Path] = None) -> Path:
    return (home or bentoml_home()) / POINTER_DIR / f"{name}.json"


def read_pointers(name: str, home: Optional[Path] = None) -> dict[str, dict]:
    """alias -> entry; ``{}`` when nothing was packaged yet. A torn file cannot occur (atomic writes)."""
    try:
        data = json.loads(pointer_file(name, home).read_text())
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class Selection:
    """What a worker serves: ``tag`` now; ``alias`` is followed when ``pinned_by`` is None."""

    tag: str
    alias: Optional[str]
    pinned_by: Optional[str]  # "bento" | "CLASSIFIER_MODEL_VERSION" | None (following the alias)

    @property
    def follows(self) -> bool:
        return self.pinned_by is None


def select_model(name: str, version: str, alias: str, bento_tag: Optional[str],
                 pointers: dict[str, dict]) -> Selection:
    """The pure selection rule of the module docstring."""
    if bento_tag:
        return Selection(bento_tag, None, "bento")
    if version:
        return Selection(f"{name}:{version}", None, "CLASSIFIER_MODEL_VERSION")
    entry = pointers.get(alias)
    if not entry or not entry.get("tag"):
        raise NoModelForAlias(
            f"the BentoML store has no model serving alias {alias!r} of {name!r} ({pointer_file(name)} "
            f"names none): run `python -m pipeline.package` (it stores the registry's {alias!r}), or set "
            f"CLASSIFIER_MODEL_VERSION to serve a stored version")
    return Selection(str(entry["tag"]), alias, None)
