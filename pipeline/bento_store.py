"""The BentoML model store: put an exported ONNX model in it (package stage), read it back (service, tests).

This and ``service/`` are the only project modules that import bentoml. The store lives under
``$BENTOML_HOME/models`` (default ``~/bentoml``); set ``BENTOML_HOME`` before calling these functions
(BentoML reads it once per process) to use another store, as the tests do.

A stored model is a folder holding ``model.onnx`` plus BentoML's ``model.yaml`` with:

- ``metadata``: every ONNX ``metadata_props`` entry of docs/model-contract.md, JSON values parsed
  (``classes``/``mean``/``std`` are lists, ``in_channels``/``image_size``/``num_params`` ints; the rest strings), plus the caller's metadata (e.g.
  ``registry_version``, ``mlflow_run_id``, metrics) and ``onnx_sha256``;
- ``labels``: the caller's labels (strings), e.g. ``registry_version: "3"``.

Labels and metadata describe a *version*; they never say which alias serves it (that changes with
every promotion). The store's alias pointers (``service/model_source.py`` documents the file) do:
:func:`point_alias` writes them, under :func:`store_lock`, which also keeps two package runs from
storing one registry version twice.

The service reads preprocessing from the ONNX file itself; the mirror makes ``bentoml models get``
and ``GET /metadata`` informative without opening the model.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

from service.contract import MODEL_FILE, missing_keys, parse_metadata, read_metadata
from service.model_source import REGISTRY_KEYS, bentoml_home, pointer_file, read_pointers

from . import atomic
from .atomic import sha256_file

__all__ = [
    "DEFAULT_MODEL_NAME",
    "bento_model_info",
    "list_model_tags",
    "find_stored",
    "onnx_path",
    "point_alias",
    "read_pointers",
    "save_to_bento_store",
    "store_lock",
    "store_serving",
]

DEFAULT_MODEL_NAME = "image-classifier"


def bentoml_executable() -> str | None:
    """The `bentoml` command of this interpreter's environment, else the one on PATH (None: neither)."""
    here = Path(sys.executable).with_name("bentoml")
    return str(here) if here.exists() else shutil.which("bentoml")


def save_to_bento_store(
    onnx_file: str | Path,
    *,
    name: str = DEFAULT_MODEL_NAME,
    labels: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Copy ``onnx_file`` into a new version of BentoML model ``name``; returns its tag ``name:version``.

    The ONNX ``metadata_props`` are mirrored into the bento model's metadata (JSON values parsed) and
    merged with ``metadata``; a caller value that contradicts the ONNX file (e.g. another
    ``mlflow_run_id``) is an error. ``labels`` values are converted to strings. Raises
    ``FileNotFoundError`` or ``ValueError`` (missing contract keys, conflicting metadata) before
    anything is written.
    """
    import bentoml

    src = Path(onnx_file)
    if not src.is_file():
        raise FileNotFoundError(f"ONNX model {str(src)!r} does not exist")
    props = read_metadata(src)
    missing = missing_keys(props)
    if missing:
        raise ValueError(f"{src}: metadata_props lack {missing} (see docs/model-contract.md)")
    mirrored: dict[str, Any] = parse_metadata(props)
    extra = dict(metadata or {})
    for key, value in extra.items():
        if key in mirrored and value not in (None, "") and mirrored[key] not in (None, "") and value != mirrored[key]:
            raise ValueError(f"metadata[{key!r}]={value!r} contradicts the ONNX file's {key}={mirrored[key]!r}")
    merged = {**mirrored, **{k: v for k, v in extra.items() if v is not None}, "onnx_sha256": sha256_file(src)}
    str_labels = {str(k): str(v) for k, v in (labels or {}).items() if v is not None}

    with bentoml.models.create(name, labels=str_labels, metadata=merged) as model:
        shutil.copyfile(src, model.path_of(MODEL_FILE))
    return str(model.tag)


def bento_model_info(tag: str = f"{DEFAULT_MODEL_NAME}:latest") -> dict[str, Any]:
    """A stored model as a plain dict: tag, name, version, path (of model.onnx), labels, metadata,
    creation_time, and ``registry`` (registry_version/mlflow_run_id from labels, else
    metadata). Raises ``bentoml.exceptions.NotFound`` for an unknown tag."""
    import bentoml

    model = bentoml.models.get(tag)
    info = model.info
    labels = dict(info.labels)
    meta = dict(info.metadata)
    registry = {k: labels.get(k, meta.get(k)) for k in REGISTRY_KEYS}  # a version's facts, never an alias
    return {
        "tag": str(model.tag),
        "name": model.tag.name,
        "version": model.tag.version,
        "path": model.path_of(MODEL_FILE),
        "labels": labels,
        "metadata": meta,
        "registry": registry,
        "creation_time": info.creation_time.isoformat(),
    }


def onnx_path(tag: str = f"{DEFAULT_MODEL_NAME}:latest") -> str:
    """Filesystem path of the stored ``model.onnx`` for ``tag``."""
    return bento_model_info(tag)["path"]


def list_model_tags(name: str = DEFAULT_MODEL_NAME) -> list[str]:
    """Tags of every stored version of ``name``, newest first."""
    import bentoml

    models = [m for m in bentoml.models.list() if m.tag.name == name]
    models.sort(key=lambda m: m.info.creation_time, reverse=True)
    return [str(m.tag) for m in models]


def find_stored(name: str, onnx_sha256: str, registry_version: str | None = None) -> str | None:
    """The newest stored version of ``name`` recorded as holding this ONNX file (and registry
    version). Call it after :func:`remove_debris`, under :func:`store_lock`: that is what checks the
    files' bytes against their recorded SHA-256."""
    for tag in list_model_tags(name):
        info = bento_model_info(tag)
        if info["metadata"].get("onnx_sha256") != onnx_sha256:
            continue
        if registry_version is None or str(info["registry"].get("registry_version")) == str(registry_version):
            return tag
    return None


def remove_debris(name: str) -> list[str]:
    """Delete store entries of ``name`` that a killed copy left incomplete (no model.yaml, no
    model.onnx, or a model.onnx whose SHA-256 is not the recorded one); call under :func:`store_lock`.
    BentoML removes an entry only when the copy raises, not when its process is killed."""
    import yaml

    removed = []
    for folder in sorted(f for f in (bentoml_home() / "models" / name).glob("*") if f.is_dir()):
        manifest, model = folder / "model.yaml", folder / MODEL_FILE
        try:
            recorded = (yaml.safe_load(manifest.read_text()) or {}).get("metadata", {}).get("onnx_sha256")
            intact = model.is_file() and (recorded is None or sha256_file(model) == recorded)
        except (OSError, yaml.YAMLError):
            intact = False
        if not intact:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f"{name}:{folder.name}")
    return removed


@contextlib.contextmanager
def store_lock(name: str, timeout_s: float = 300.0) -> Iterator[None]:
    """One writer at a time for ``name``'s store entries and alias pointers (a kill -9 releases it)."""
    with atomic.file_lock(pointer_file(name).with_suffix(".lock"), timeout_s):
        yield


def point_alias(name: str, alias: str, entry: dict[str, Any]) -> dict[str, dict]:
    """Record that the store entry ``entry["tag"]`` serves ``alias`` (call under :func:`store_lock`);
    atomic, so a reader (the service) sees the old pointers or the new ones. Returns all pointers."""
    pointers = {**read_pointers(name), alias: entry}
    atomic.write_json(pointer_file(name), pointers)
    return pointers


def store_serving(onnx_file: str | Path, *, name: str = DEFAULT_MODEL_NAME, alias: str = "champion",
                  registry_version: str | None = None, mlflow_run_id: str | None = None) -> str:
    """Store a model that is in no registry (tests, benchmarks) and point ``alias`` at it, as a
    package run leaves the store; its tag."""
    version = {"registry_version": registry_version} if registry_version else {}
    with store_lock(name):
        tag = save_to_bento_store(onnx_file, name=name, labels=version,
                                  metadata={**version, "mlflow_run_id": mlflow_run_id})
        point_alias(name, alias, {"tag": tag, **version})
    return tag
