"""Classify encoded images without a server, with the service's own steps (numpy, Pillow, onnxruntime).

The one implementation behind ``imgcls predict`` (``pipeline.predict``) and the MLflow pyfunc model:
bytes -> :func:`service.preprocessing.spec_to_array` (decode + ``input_transform``, per image) ->
:func:`service.contract.normalize` -> :class:`service.engine.OnnxClassifier` (the serving session:
contract checks, provider choice) -> :func:`service.postprocessing.predictions`. The service's HTTP
path runs the same four calls (``Classifier._classify``), so a file gets the same label and score
offline as over HTTP.

    predictor = Predictor("model.onnx")
    for answer in predictor.classify([Path("7.png").read_bytes()], top_k=3):
        print(answer)   # {"label", "index", "score", "top_k": [...]}, or an ImageError for that image

A bad image is that image's :class:`ImageError` (the HTTP reason and status), never the batch's failure.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .contract import PreprocessSpec, normalize
from .engine import OnnxClassifier
from .postprocessing import predictions
from .preprocessing import ImageError, pixel_limit, spec_to_array

__all__ = ["Predictor", "ImageError", "prepare"]


def prepare(data: bytes, spec: PreprocessSpec, max_pixels: int | None = None) -> "np.ndarray | ImageError":
    """Encoded bytes -> ``uint8 [C, H, W]``, or the image's :class:`ImageError` (returned, not raised:
    callers decode many images, in worker processes too, and report each bad one). ``max_pixels``:
    default the service's for this model (``pixel_limit``)."""
    try:
        return spec_to_array(data, spec, max_pixels=max_pixels or pixel_limit(spec.image_size))
    except ImageError as err:
        return err
    except Exception as err:  # noqa: BLE001  (a decoder bug is this file's problem, as in the service)
        return ImageError("corrupt", f"cannot decode image: {type(err).__name__}: {err}")


class Predictor:
    """An ONNX Runtime session of a contract-conforming model, and the service's decode steps."""

    def __init__(self, model: str | Path, *, providers: str = "auto", threads: int = 1,
                 max_pixels: int | None = None) -> None:
        self.engine = OnnxClassifier(model, providers=providers, intra_op_threads=threads)
        self.spec = self.engine.spec
        #: the service's default per-image limit for this model (CLASSIFIER_MAX_IMAGE_PIXELS unset), so a
        #: file too large to be sent over HTTP is refused offline too, with the same 413 reason
        self.max_pixels = max_pixels or pixel_limit(self.spec.image_size)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    def prepare(self, data: bytes) -> "np.ndarray | ImageError":
        """:func:`prepare` with this model's spec."""
        return prepare(data, self.spec, self.max_pixels)

    def logits(self, arrays: Sequence[np.ndarray], batch_size: int | None = None) -> np.ndarray:
        """Prepared ``uint8 [C, H, W]`` arrays -> ``float32 [N, K]`` logits, ``batch_size`` per ONNX
        Runtime call (default: all at once)."""
        if not len(arrays):
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        step = batch_size or len(arrays)
        return np.concatenate([self.engine.logits(normalize(np.stack(arrays[i:i + step]), self.spec.mean, self.spec.std))
                               for i in range(0, len(arrays), step)])

    def classify_arrays(self, arrays: Sequence[np.ndarray], top_k: int = 1) -> list[dict]:
        """Prepared ``uint8 [C, H, W]`` arrays -> one answer per array (one ONNX Runtime call)."""
        return predictions(self.logits(arrays), self.classes, top_k) if len(arrays) else []

    def classify(self, blobs: Sequence[bytes], top_k: int = 1) -> "list[dict | ImageError]":
        """Encoded images -> an answer or an :class:`ImageError` per image, in order."""
        prepared = [self.prepare(data) for data in blobs]
        answers = iter(self.classify_arrays([a for a in prepared if not isinstance(a, ImageError)], top_k))
        return [a if isinstance(a, ImageError) else next(answers) for a in prepared]
