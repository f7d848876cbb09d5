"""The model contract: what an exported classifier file carries, and the numbers computed with it.

One owner for what the pipeline writes and the service reads (docs/model-contract.md):

- the file (``MODEL_FILE``) and its tensors: one float32 input ``INPUT_NAME`` of shape
  ``[N, C, H, W]`` (N dynamic), one output ``OUTPUT_NAME`` of ``[N, num_classes]`` logits;
- its ``metadata_props`` (all strings; ``JSON_KEYS`` hold JSON): :func:`metadata_props` builds them
  from a training run's facts, :func:`read_metadata`/:func:`write_metadata` move them in and out of
  ONNX, :func:`missing_keys` and :class:`PreprocessSpec` validate them, :func:`check_graph` checks the
  graph against them;
- the numerics on both sides: :func:`normalize` (``x / 255`` then ``(x - mean) / std`` per channel),
  :func:`softmax`, and :func:`cpu_session`/:func:`run_logits` (ONNX Runtime on the CPU, in batches).

numpy only at import (``onnx`` and ``onnxruntime`` inside the functions that need them): the service
stays free of torch, and the pipeline's torch code (training's on-device batches,
``pipeline.modelfile``) uses the same formula, checked against :func:`normalize` in the tests.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["INPUT_NAME", "INPUT_TRANSFORMS", "JSON_KEYS", "MODEL_FILE", "OUTPUT_NAME", "REQUIRED_KEYS", "RESIZE_FILTERS", "VARIANT_KEYS",
           "PreprocessSpec", "check_graph", "cpu_session", "metadata_props", "missing_keys", "normalize",
           "parse_metadata", "read_metadata", "run_logits", "softmax", "write_metadata"]

MODEL_FILE = "model.onnx"  # in an export folder, a registry version's artifacts and a store entry
INPUT_NAME, OUTPUT_NAME = "input", "logits"
#: keys without which a file cannot be served
REQUIRED_KEYS = ("classes", "in_channels", "image_size", "mean", "std")
#: keys whose values are JSON (the others, e.g. mlflow_run_id, are plain strings)
JSON_KEYS = frozenset({"classes", "in_channels", "image_size", "mean", "std", "num_params"})
#: keys a reduced-precision variant (bench/quantize.py) adds; every other key is the FP32 model's
VARIANT_KEYS = frozenset({"precision", "quantization"})
#: the ``resize`` values (Pillow filters of the same names; service.preprocessing maps them)
RESIZE_FILTERS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
DEFAULT_RESIZE = "bilinear"
#: the ``input_transform`` values (service.input_transform does them): how an image of any size and
#: shape becomes ``image_size x image_size``; a file without the key is ``resize``, as before the key
INPUT_TRANSFORMS = ("resize", "crop", "digit")
DEFAULT_INPUT_TRANSFORM = "resize"


# --- metadata -------------------------------------------------------------------------------------

def metadata_props(meta: Mapping[str, Any]) -> dict[str, str]:
    """A trained model's facts (``pipeline.modelfile`` metadata) -> the file's ``metadata_props``."""
    return {
        "classes": json.dumps(list(meta["classes"])), "in_channels": str(meta["in_channels"]),
        "image_size": str(meta["image_size"]), "mean": json.dumps(list(meta["mean"])),
        "std": json.dumps(list(meta["std"])), "arch": meta["arch"], "dataset": meta["dataset"],
        "mlflow_run_id": meta["mlflow_run_id"], "num_params": str(meta["num_params"]),
        "resize": meta.get("resize", DEFAULT_RESIZE),
        "input_transform": meta.get("input_transform", DEFAULT_INPUT_TRANSFORM),
    }


def _parse(key: str, value: Any) -> Any:
    if key not in JSON_KEYS or not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def parse_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    """String ``metadata_props`` -> values (JSON keys parsed), as a BentoML store entry keeps them."""
    return {key: _parse(key, value) for key, value in props.items()}


def missing_keys(metadata: Mapping[str, Any]) -> list[str]:
    return [key for key in REQUIRED_KEYS if key not in metadata]


def read_metadata(model: str | Path | bytes | Any) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, its bytes, or a loaded ``ModelProto`` (weights not loaded)."""
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    elif isinstance(model, bytes):
        model = onnx.load_from_string(model)
    return {p.key: p.value for p in model.metadata_props}


def write_metadata(proto: Any, props: Mapping[str, str]) -> Any:
    """Replace a ``ModelProto``'s ``metadata_props`` with ``props`` (string values); returns it."""
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    return proto


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn an image into a model input, read from the model's metadata."""

    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = DEFAULT_RESIZE
    classes: tuple[str, ...] = ()
    input_transform: str = DEFAULT_INPUT_TRANSFORM

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.channels!r}")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels:
                raise ValueError(f"{name} needs {self.channels} value(s) (one per channel), got {list(values)}")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} values must be finite, got {list(values)}")
        if any(v <= 0 for v in self.std):
            raise ValueError(f"std values must be > 0, got {list(self.std)}")
        if self.resize not in RESIZE_FILTERS:
            raise ValueError(f"resize must be one of {sorted(RESIZE_FILTERS)}, got {self.resize!r}")
        if self.input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"input_transform must be one of {list(INPUT_TRANSFORMS)}, got {self.input_transform!r}")
        if self.input_transform == "digit" and self.channels != 1:
            raise ValueError(f"input_transform 'digit' needs a 1-channel model, this one has {self.channels}")

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "PreprocessSpec":
        """Build from ONNX ``metadata_props`` (string values) or their parsed mirror (a store entry's).

        Required: ``in_channels``, ``image_size``, ``mean``, ``std``; optional: ``resize`` (default
        ``bilinear``), ``input_transform`` (default ``resize``), ``classes`` (required to serve:
        :func:`check_graph`). ``ValueError`` names the bad key.
        """
        missing = [k for k in REQUIRED_KEYS if k != "classes" and k not in metadata]
        if missing:
            raise ValueError(f"model metadata lacks required key(s) {missing}; see docs/model-contract.md")
        try:
            channels = int(_parse("in_channels", metadata["in_channels"]))
            image_size = int(_parse("image_size", metadata["image_size"]))
        except (TypeError, ValueError) as err:
            raise ValueError(f"model metadata in_channels/image_size must be integers: {err}") from err
        mean, std = (_floats(metadata, key) for key in ("mean", "std"))
        classes: tuple[str, ...] = ()
        if "classes" in metadata:
            raw = _parse("classes", metadata["classes"])
            if not isinstance(raw, list) or not raw:
                raise ValueError(f"model metadata 'classes' must be a non-empty JSON list, got {metadata['classes']!r}")
            classes = tuple(str(c) for c in raw)
        resize = str(metadata.get("resize") or DEFAULT_RESIZE).lower()
        transform = str(metadata.get("input_transform") or DEFAULT_INPUT_TRANSFORM).lower()
        return cls(channels, image_size, mean, std, resize, classes, transform)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one model input."""
        return (self.channels, self.image_size, self.image_size)


def _floats(metadata: Mapping[str, Any], key: str) -> tuple[float, ...]:
    raw = _parse(key, metadata[key])
    if isinstance(raw, (int, float)):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(v, (int, float)) for v in raw):
        raise ValueError(f"model metadata {key!r} must be a JSON list of numbers, got {metadata[key]!r}")
    return tuple(float(v) for v in raw)


def check_graph(inputs: Sequence[Any], outputs: Sequence[Any], spec: PreprocessSpec) -> None:
    """The graph (ONNX Runtime's ``get_inputs()``/``get_outputs()``) agrees with the contract and its metadata."""
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise ValueError(f"model must have exactly one input named {INPUT_NAME!r}, has {[i.name for i in inputs]}")
    if OUTPUT_NAME not in [o.name for o in outputs]:
        raise ValueError(f"model must have an output named {OUTPUT_NAME!r}, has {[o.name for o in outputs]}")
    if inputs[0].type != "tensor(float)":
        raise ValueError(f"model input must be float32, is {inputs[0].type}")
    shape = inputs[0].shape
    if len(shape) != 4:
        raise ValueError(f"model input must be [N, C, H, W], is {shape}")
    for got, want, what in zip(shape[1:], spec.input_shape, ("C", "H", "W")):
        if isinstance(got, int) and got != want:
            raise ValueError(f"model input {what}={got} disagrees with metadata ({spec.input_shape})")
    logits = next(o for o in outputs if o.name == OUTPUT_NAME)
    num = logits.shape[-1] if logits.shape else None
    if not spec.classes:
        raise ValueError("model metadata lacks 'classes'")
    if isinstance(num, int) and num != len(spec.classes):
        raise ValueError(f"model has {num} logits but metadata lists {len(spec.classes)} classes")


# --- numerics -------------------------------------------------------------------------------------

def normalize(batch: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``uint8 [..., C, H, W]`` -> ``float32``: ``x / 255`` then ``(x - mean[c]) / std[c]``."""
    batch = np.asarray(batch)
    if batch.dtype != np.uint8:
        raise ValueError(f"normalize expects uint8 pixels, got {batch.dtype}")
    if batch.ndim not in (3, 4):
        raise ValueError(f"normalize expects [C,H,W] or [N,C,H,W], got shape {batch.shape}")
    channels = batch.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} value(s), got {list(mean)} / {list(std)}")
    m = np.asarray(mean, dtype=np.float32).reshape(channels, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(channels, 1, 1)
    # the same float32 operations in the same order, in place: each temporary of a large batch cost a
    # fresh allocation and its page faults (3x32x32 at batch 16-256: ~20 us per image, in place ~2 us)
    x = batch.astype(np.float32)
    np.divide(x, np.float32(255.0), out=x)
    np.subtract(x, m, out=x)
    np.divide(x, s, out=x)
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise, numerically stable softmax of ``[N, K]`` logits, computed in float64, returned float32."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected logits of shape [N, K], got {x.shape}")
    x = x - x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x.astype(np.float32)


def cpu_session(model: bytes | str | Path, threads: int = 0, optimization: str = "all",
                optimized_path: str | Path | None = None):
    """An ONNX Runtime CPU session (``threads`` 0 = ONNX Runtime's default; ``optimization`` all,
    basic or none; ``optimized_path``: also save the optimized graph there)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_logits(session: Any, inputs: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """``float32 [N, num_classes]`` logits of normalized ``inputs`` ``[N, C, H, W]``, ``batch_size`` at a time.

    ``session`` is an ONNX Runtime session, or model bytes / a path for a fresh CPU session."""
    if not hasattr(session, "run"):
        session = cpu_session(session)
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    if len(x) == 0:
        classes = session.get_outputs()[0].shape[-1]
        return np.zeros((0, classes if isinstance(classes, int) else 0), dtype=np.float32)
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)]).astype(np.float32, copy=False)
