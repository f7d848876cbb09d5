"""The BentoML model store: put an exported ONNX model in it (package stage), read it back (service, tests).

This and ``service/`` are the only project modules that import bentoml. The store lives under
``$BENTOML_HOME/models`` (default ``~/bentoml``); set ``BENTOML_HOME`` before calling these functions
(BentoML reads it once per process) to use another store, as the tests do.

A stored model is a folder holding ``model.onnx`` plus BentoML's ``model.yaml`` with:

- ``metadata``: every ONNX ``metadata_props`` entry of docs/model-contract.md, JSON values parsed
  (``classes``/``mean``/``std`` are lists, ``in_channels``/``image_size``/``num_params`` ints; the rest strings), plus the caller's metadata (e.g.
  ``registry_version``, ``registry_alias``, ``mlflow_run_id``, metrics) and ``onnx_sha256``;
- ``labels``: the caller's labels (strings), e.g. ``registry_alias: champion``.

The service reads preprocessing from the ONNX file itself; the mirror makes ``bentoml models get``
and ``GET /metadata`` informative without opening the model.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MODEL_NAME",
    "MODEL_FILE",
    "REQUIRED_METADATA",
    "bento_model_info",
    "list_model_tags",
    "onnx_path",
    "read_onnx_metadata",
    "save_to_bento_store",
]

DEFAULT_MODEL_NAME = "image-classifier"
MODEL_FILE = "model.onnx"
REQUIRED_METADATA = ("classes", "in_channels", "image_size", "mean", "std")
#: keys the package step sets and the service reports (looked up in labels, then metadata)
REGISTRY_KEYS = ("registry_version", "registry_alias", "mlflow_run_id")
#: contract keys whose values are JSON (the others, e.g. mlflow_run_id, stay strings)
JSON_KEYS = frozenset({"classes", "in_channels", "image_size", "mean", "std", "num_params"})


def _parse(key: str, value: str) -> Any:
    if key not in JSON_KEYS:
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def read_onnx_metadata(onnx_file: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (string values), without loading external weights."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    props = read_onnx_metadata(src)
    missing = [k for k in REQUIRED_METADATA if k not in props]
    if missing:
        raise ValueError(f"{src}: metadata_props lack {missing} (see docs/model-contract.md)")
    mirrored: dict[str, Any] = {k: _parse(k, v) for k, v in props.items()}
    extra = dict(metadata or {})
    for key, value in extra.items():
        if key in mirrored and value not in (None, "") and mirrored[key] not in (None, "") and value != mirrored[key]:
            raise ValueError(f"metadata[{key!r}]={value!r} contradicts the ONNX file's {key}={mirrored[key]!r}")
    merged = {**mirrored, **{k: v for k, v in extra.items() if v is not None}, "onnx_sha256": _sha256(src)}
    str_labels = {str(k): str(v) for k, v in (labels or {}).items() if v is not None}

    with bentoml.models.create(name, labels=str_labels, metadata=merged) as model:
        shutil.copyfile(src, model.path_of(MODEL_FILE))
    return str(model.tag)


def bento_model_info(tag: str = f"{DEFAULT_MODEL_NAME}:latest") -> dict[str, Any]:
    """A stored model as a plain dict: tag, name, version, path (of model.onnx), labels, metadata,
    creation_time, and ``registry`` (registry_version/registry_alias/mlflow_run_id from labels, else
    metadata). Raises ``bentoml.exceptions.NotFound`` for an unknown tag."""
    import bentoml

    model = bentoml.models.get(tag)
    info = model.info
    labels = dict(info.labels)
    meta = dict(info.metadata)
    registry = {k: labels.get(k, meta.get(k)) for k in REGISTRY_KEYS}
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
