"""ONNX Runtime inference for a contract-conforming model (numpy + onnxruntime; no bentoml, no torch).

:class:`OnnxClassifier` opens the ``.onnx`` file, checks it against docs/model-contract.md, reads the
preprocessing parameters from its ``metadata_props``, picks execution providers from a setting and
reports the providers that are *actually* active: ONNX Runtime silently falls back to CPU when a
requested provider cannot start, so the session is asked afterwards (``session.get_providers()``).
"""
from __future__ import annotations

import ctypes
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .contract import INPUT_NAME, OUTPUT_NAME, PreprocessSpec, check_graph

__all__ = ["OnnxClassifier", "ProviderError", "cuda_driver_present", "resolve_providers"]

logger = logging.getLogger("bentoml.classifier.engine")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: setting -> (providers, strict). ``cuda``/``gpu`` fall back to CPU (loudly); ``*-only`` refuse to.
_ALIASES = {
    "cpu": ([CPU], True),
    "cuda": ([CUDA, CPU], False),
    "gpu": ([CUDA, CPU], False),
    "cuda-only": ([CUDA, CPU], True),
    "gpu-only": ([CUDA, CPU], True),
}


class ProviderError(RuntimeError):
    """The configured execution providers cannot be honoured."""


def cuda_driver_present() -> bool:
    """True when the NVIDIA driver library loads (a GPU machine); avoids noisy CUDA-provider failures."""
    if sys.platform == "darwin":
        return False
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def resolve_providers(
    setting: str, available: Sequence[str] | None = None, *, gpu: bool | None = None
) -> tuple[list[str], bool]:
    """Map a ``CLASSIFIER_PROVIDERS`` value to ``(providers to request, strict)``.

    ``auto``: CUDA then CPU when the CUDA provider is installed and a driver is present, else CPU
    (not strict: falling back to CPU is allowed, and logged). ``cpu``. ``cuda``/``gpu``: CUDA then
    CPU, not strict: when CUDA cannot start (no GPU, no driver, CUDA/cuDNN libraries missing, or an
    onnxruntime build without the CUDA provider) the session runs on CPU, with a loud warning in the
    log and ``provider_warning`` in the model description (``GET /metadata``).
    ``cuda-only``/``gpu-only``: strict, the service refuses to start unless CUDA is active. A comma
    list of ONNX Runtime provider names is requested as given (strict about the first one).
    Providers missing from this onnxruntime build are kept in a non-strict list (the caller drops
    them before creating the session and reports the fallback); a strict setting naming one is an error.
    """
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    value = (setting or "auto").strip()
    key = value.lower()
    if key == "auto":
        use_cuda = CUDA in available and (cuda_driver_present() if gpu is None else gpu)
        return ([CUDA, CPU] if use_cuda else [CPU]), False
    strict = True
    if key in _ALIASES:
        wanted, strict = list(_ALIASES[key][0]), _ALIASES[key][1]
    else:
        wanted = [p.strip() for p in value.split(",") if p.strip()]
        if not wanted:
            raise ProviderError(f"CLASSIFIER_PROVIDERS={setting!r} names no provider")
    missing = [p for p in wanted if p not in available]
    if missing and strict:
        raise ProviderError(
            f"CLASSIFIER_PROVIDERS={setting!r}: provider(s) {missing} are not available in this onnxruntime "
            f"build (available: {list(available)})"
        )
    return wanted, strict


class OnnxClassifier:
    """A contract-checked ONNX Runtime session: ``logits(batch) -> float32 [N, num_classes]``."""

    def __init__(
        self,
        path: str | Path,
        *,
        providers: str = "auto",
        intra_op_threads: int = 1,
        available_providers: Sequence[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = str(path)
        if available_providers is None:
            available_providers = ort.get_available_providers()
        requested, strict = resolve_providers(providers, available_providers)
        # a non-strict request may name a provider this build lacks: ask ONNX Runtime for the rest only
        session_providers = [p for p in requested if p in available_providers] or [CPU]
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(intra_op_threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle intra-op threads must not spin: the CPU is shared with decoding in the API process
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.path, sess_options=options, providers=session_providers)
        self.requested_providers = requested
        self.active_providers = list(self.session.get_providers())
        self.intra_op_threads = options.intra_op_num_threads
        fell_back = [p for p in requested if p != CPU and p not in self.active_providers]
        self.provider_warning: str | None = None
        if fell_back:
            self.provider_warning = (
                f"CLASSIFIER_PROVIDERS={providers!r}: requested execution providers {requested} but ONNX Runtime "
                f"activated {self.active_providers}: {fell_back} could not start (CUDA/cuDNN libraries or a GPU "
                f"missing?); FALLING BACK TO CPU"
            )
            if strict and requested[0] not in self.active_providers:
                raise ProviderError(self.provider_warning.replace("; FALLING BACK TO CPU", "; refusing to start (strict)"))

        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.spec = PreprocessSpec.from_metadata(self.metadata)
        check_graph(self.session.get_inputs(), self.session.get_outputs(), self.spec)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Run ``float32 [N, C, H, W]`` (N may be 0) -> ``float32 [N, num_classes]``."""
        batch = np.asarray(batch)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.spec.input_shape:
            raise ValueError(f"expected a batch of shape [N, {', '.join(map(str, self.spec.input_shape))}], got {batch.shape}")
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        return np.asarray(out, dtype=np.float32)

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run zero batches of the given sizes (allocations, kernel selection); returns seconds taken."""
        start = time.perf_counter()
        for n in batch_sizes:
            self.logits(np.zeros((int(n), *self.spec.input_shape), dtype=np.float32))
        return time.perf_counter() - start

    def describe(self) -> dict:
        """JSON-ready facts about the model and the session."""
        try:
            num_params = int(self.metadata["num_params"])
        except (KeyError, ValueError):
            num_params = self.metadata.get("num_params")

        return {
            "classes": list(self.classes),
            "input_shape": [None, *self.spec.input_shape],
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "normalization": {"mean": list(self.spec.mean), "std": list(self.spec.std), "scale": "x / 255"},
            "resize": self.spec.resize,
            "input_transform": self.spec.input_transform,
            "in_channels": self.spec.channels,
            "image_size": self.spec.image_size,
            "arch": self.metadata.get("arch"),
            "dataset": self.metadata.get("dataset"),
            "num_params": num_params,
            "onnx_mlflow_run_id": self.metadata.get("mlflow_run_id"),
            "requested_providers": list(self.requested_providers),
            "active_providers": list(self.active_providers),
            "provider_warning": self.provider_warning,
            "provider_fallback": self.provider_warning is not None,
            "intra_op_threads": self.intra_op_threads,
        }
