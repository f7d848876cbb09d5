"""The registered model as an MLflow ``python_function`` model: image bytes in, labels and scores out.

A registry version's MLflow model folder holds the exported ONNX file (``model.onnx``, the bytes the
export stage wrote) and this package (``code/service/``); its ``python_function`` flavor names this
module as its loader (``loader_module: service.mlflow_model``), so MLflow calls :func:`_load_pyfunc`
with the ONNX file, and every prediction runs :class:`service.predictor.Predictor`: the service's own
decode, ``input_transform``, normalization, ONNX Runtime session and answer steps, so an image gets
the same label and score from ``mlflow models serve``, ``mlflow.pyfunc.load_model(...).predict``,
``imgcls predict`` and the BentoML service. ``pipeline.tracking.log_pyfunc_model`` logs it.

    model = mlflow.pyfunc.load_model("models:/image-classifier@champion")
    model.predict(pd.DataFrame({"image": [Path("7.png").read_bytes()]}), params={"top_k": 3})

Input: a DataFrame with one binary column ``image`` (the encoded file: PNG, JPEG, WebP, ...; base64
in the scoring server's JSON, MLflow decodes it). Param ``top_k`` (default 1). Output: one row per
image, ``label``, ``index``, ``score`` (softmax probability), ``top_k`` (a list of ``{label, index,
score}``); a bad image is its own row with ``label`` None, ``reason`` (the service's machine-readable
code: ``corrupt``, ``not_an_image``, ``no_ink``, ...) and ``error`` (the message), never the batch's
failure. Settings (``model_config`` at load, or ``MLFLOW_PYFUNC_INFERENCE_CONFIG`` for ``mlflow models
serve``): ``providers`` (as ``CLASSIFIER_PROVIDERS``: auto, cpu, cuda, ...), ``threads`` (ONNX Runtime
intra-op threads; 0: the CPUs this process may use).

No mlflow and no pandas at import time (``service/`` never imports mlflow; pandas comes with mlflow
and is imported when a prediction is built).
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .contract import MODEL_FILE, PreprocessSpec
from .predictor import ImageError, Predictor

__all__ = ["INPUT_COLUMN", "OUTPUT_COLUMNS", "DEFAULT_CONFIG", "REQUIREMENTS", "SIGNATURE", "ImageClassifierPyfunc",
           "example_image", "answers_frame", "_load_pyfunc"]

INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ("label", "index", "score", "top_k", "reason", "error")
#: the python_function flavor's model_config: what a loader may override (``model_config=`` at load)
DEFAULT_CONFIG = {"providers": "auto", "threads": 0}
#: the top-level modules this module and service.predictor import (the logged model pins the
#: distributions that provide them: pillow for PIL, onnxruntime or onnxruntime-gpu)
REQUIREMENTS = ("numpy", "PIL", "onnxruntime", "pandas")

_TOP_K_ITEM = {"type": "object", "properties": {"label": {"type": "string", "required": True},
                                                "index": {"type": "long", "required": True},
                                                "score": {"type": "double", "required": True}}}
#: the model signature in MLflow's MLmodel JSON form (``ModelSignature.from_dict`` of the JSON strings)
SIGNATURE = {
    "inputs": [{"type": "binary", "name": INPUT_COLUMN, "required": True}],
    "outputs": [{"type": "string", "name": "label", "required": False},
                {"type": "long", "name": "index", "required": False},
                {"type": "double", "name": "score", "required": False},
                {"type": "array", "items": _TOP_K_ITEM, "name": "top_k", "required": False},
                {"type": "string", "name": "reason", "required": False},
                {"type": "string", "name": "error", "required": False}],
    "params": [{"name": "top_k", "type": "long", "default": 1, "shape": None}],
}


def example_image(spec: PreprocessSpec) -> bytes:
    """A small PNG every model of this contract answers (the logged input example): one light
    vertical stroke on black at the model's size and channels; a ``digit`` model reads a "1" in it
    (a blank image would be its ``no_ink``)."""
    from PIL import Image, ImageDraw

    size = spec.image_size
    image = Image.new("L" if spec.channels == 1 else "RGB", (size, size), 0)
    width = max(1, round(size * 3 / 28))
    left = (size - width) // 2
    ImageDraw.Draw(image).rectangle([left, size // 7, left + width - 1, size - size // 7 - 1], fill="white")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def answers_frame(answers: Sequence[Any]):
    """Predictor answers (a dict or an ImageError per image) -> the output DataFrame. A column that
    holds a None keeps Python objects (no NaN, which is not JSON, nor pandas' NA, which MLflow's
    scoring server cannot write)."""
    import pandas as pd

    columns: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
    for answer in answers:
        if isinstance(answer, ImageError):
            row = {"label": None, "index": None, "score": None, "top_k": None, "reason": answer.reason,
                   "error": answer.message}
        else:
            row = {"label": answer["label"], "index": answer["index"], "score": answer["score"],
                   "top_k": answer["top_k"], "reason": None, "error": None}
        for name in OUTPUT_COLUMNS:
            columns[name].append(row[name])
    return pd.DataFrame({name: pd.Series(values, dtype=object if name == "top_k" or None in values else None)
                         for name, values in columns.items()}, columns=list(OUTPUT_COLUMNS))


def _bad_param(message: str) -> Exception:
    """MLflow's invalid-parameter error when mlflow is there (the scoring server answers 400 with this
    message; any other exception is a 400 "unexpected error"), else a ValueError."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return ValueError(message)
    return MlflowException.invalid_parameter_value(message)


def _image_bytes(value: Any) -> "bytes | ImageError":
    """One cell of the ``image`` column -> the file's bytes, or the ImageError of a cell that holds none."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ImageError("empty", "no image: the image cell is empty")
    if isinstance(value, str):
        return ImageError("not_an_image", "the image cell holds text; send the file's bytes "
                          "(base64 only in a JSON request to the scoring server, which decodes it)")
    return ImageError("not_an_image", f"the image cell holds a {type(value).__name__}, not the file's bytes")


def _cells(model_input: Any) -> list:
    """The image cells of whatever MLflow (or a direct caller) passes: a DataFrame with an ``image``
    column (the signature's), a mapping of it, a list of files, or one file."""
    if isinstance(model_input, (bytes, bytearray, memoryview)):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(f"the input needs a column {INPUT_COLUMN!r} (the image files' bytes), got "
                             f"{list(model_input.columns)}")
        return list(model_input[INPUT_COLUMN])
    if isinstance(model_input, Mapping):
        if INPUT_COLUMN not in model_input:
            raise ValueError(f"the input needs a key {INPUT_COLUMN!r}, got {sorted(model_input)}")
        value = model_input[INPUT_COLUMN]
        return [value] if isinstance(value, (bytes, bytearray, memoryview)) else list(value)
    return list(model_input)


class ImageClassifierPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: a :class:`Predictor` of the version's ONNX file."""

    def __init__(self, model_path: str | Path, providers: str = "auto", threads: int = 0) -> None:
        if not int(threads or 0):
            from .cpus import usable_cpus

            threads = usable_cpus()
        self.predictor = Predictor(model_path, providers=providers, threads=int(threads))

    @property
    def spec(self) -> PreprocessSpec:
        return self.predictor.spec

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        """Classify every image of ``model_input`` (see the module doc); one output row per image, in order."""
        top_k = (params or {}).get("top_k")
        top_k = 1 if top_k is None else top_k
        try:
            k = int(top_k)
            whole = k == top_k and not isinstance(top_k, bool)
        except (TypeError, ValueError):
            whole = False
        if not whole or k < 1:
            raise _bad_param(f"top_k must be a positive integer, got {top_k!r}")
        cells = [_image_bytes(value) for value in _cells(model_input)]
        blobs = [c for c in cells if not isinstance(c, ImageError)]
        answers = iter(self.predictor.classify(blobs, k))
        return answers_frame([c if isinstance(c, ImageError) else next(answers) for c in cells])


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> ImageClassifierPyfunc:
    """MLflow's entry point (``loader_module``): ``data_path`` is the version's ONNX file."""
    config = {**DEFAULT_CONFIG, **(model_config or {})}
    path = Path(data_path)
    if path.is_dir():  # a model folder laid out by hand: its model.onnx
        path = path / MODEL_FILE
    return ImageClassifierPyfunc(path, providers=str(config["providers"]), threads=int(config["threads"] or 0))
