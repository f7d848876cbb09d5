"""Service configuration from environment variables (read once, at import of ``service.service``).

Every variable is optional; a malformed value is an error at startup naming the variable, never a
silent fallback. BentoML reads batching/worker settings when the service class is defined, so these
must be set in the environment of ``bentoml serve`` (or in ``bentofile.yaml`` ``envs``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from .preprocessing import DEFAULT_MAX_PIXELS

#: name -> (default, description); the README table is generated from this.
ENV_VARS: dict[str, tuple[str, str]] = {
    "CLASSIFIER_MODEL_NAME": ("image-classifier", "BentoML model-store name of the ONNX model"),
    "CLASSIFIER_MODEL_VERSION": ("latest", "model version in the store (`latest` = newest)"),
    "CLASSIFIER_PROVIDERS": (
        "auto",
        "ONNX Runtime providers: `auto` (CUDA when usable, else CPU), `cpu`, `cuda` (CUDA; when it cannot start, "
        "fall back to CPU with a loud warning in the log and `provider_warning`/`provider_fallback` in GET /metadata), "
        "`cuda-only` (refuse to start unless CUDA is active), or a comma list such as "
        "`CUDAExecutionProvider,CPUExecutionProvider` (strict about the first)",
    ),
    "CLASSIFIER_ORT_THREADS": ("0", "ONNX Runtime intra-op threads per runtime worker; 0 = CPU count / runtime workers"),
    "CLASSIFIER_RUNTIME_WORKERS": ("1", "worker processes of the model (runtime) service"),
    "CLASSIFIER_API_WORKERS": ("1", "worker processes of the public HTTP service (decoding, preprocessing)"),
    "CLASSIFIER_MAX_BATCH_SIZE": ("64", "adaptive batching: most images per model call"),
    "CLASSIFIER_MAX_LATENCY_MS": ("1000", "adaptive batching: latency budget; requests predicted to miss it get 503"),
    "CLASSIFIER_TOP_K": ("5", "default number of entries in `top_k` (capped at the number of classes)"),
    "CLASSIFIER_MAX_IMAGES": ("64", "most images in one request (more -> 413)"),
    "CLASSIFIER_MAX_REQUEST_BYTES": (str(32 * 1024 * 1024), "largest request body in bytes (more -> 413)"),
    "CLASSIFIER_MAX_IMAGE_PIXELS": (str(DEFAULT_MAX_PIXELS), "largest image in pixels, width*height (more -> 413)"),
    "CLASSIFIER_MAX_CONCURRENCY": ("64", "requests in flight per public service before answering 429"),
    "CLASSIFIER_REQUEST_TIMEOUT_S": ("30", "per-request timeout in seconds (-> 504)"),
}


def _int(env: Mapping[str, str], name: str, minimum: int) -> int:
    raw = env.get(name, "").strip() or ENV_VARS[name][0]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class ServiceConfig:
    model_name: str = "image-classifier"
    model_version: str = "latest"
    providers: str = "auto"
    ort_threads: int = 0
    runtime_workers: int = 1
    api_workers: int = 1
    max_batch_size: int = 64
    max_latency_ms: int = 1000
    top_k: int = 5
    max_images: int = 64
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_concurrency: int = 64
    request_timeout_s: int = 30
    cpu_count: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def model_tag(self) -> str:
        return f"{self.model_name}:{self.model_version}"

    @property
    def intra_op_threads(self) -> int:
        """Threads per ONNX Runtime session: explicit, or the CPUs shared among runtime workers."""
        if self.ort_threads > 0:
            return self.ort_threads
        return max(1, self.cpu_count // self.runtime_workers)

    def as_dict(self) -> dict:
        return {**asdict(self), "model_tag": self.model_tag, "intra_op_threads": self.intra_op_threads}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ServiceConfig":
        env = os.environ if env is None else env
        name = env.get("CLASSIFIER_MODEL_NAME", "").strip() or "image-classifier"
        version = env.get("CLASSIFIER_MODEL_VERSION", "").strip() or "latest"
        if ":" in name:
            raise ValueError(f"CLASSIFIER_MODEL_NAME={name!r} must be a bare name; put the version in CLASSIFIER_MODEL_VERSION")
        providers = env.get("CLASSIFIER_PROVIDERS", "").strip() or "auto"
        max_batch_size = _int(env, "CLASSIFIER_MAX_BATCH_SIZE", 2)  # BentoML requires > 1
        return cls(
            model_name=name,
            model_version=version,
            providers=providers,
            ort_threads=_int(env, "CLASSIFIER_ORT_THREADS", 0),
            runtime_workers=_int(env, "CLASSIFIER_RUNTIME_WORKERS", 1),
            api_workers=_int(env, "CLASSIFIER_API_WORKERS", 1),
            max_batch_size=max_batch_size,
            max_latency_ms=_int(env, "CLASSIFIER_MAX_LATENCY_MS", 1),
            top_k=_int(env, "CLASSIFIER_TOP_K", 1),
            max_images=_int(env, "CLASSIFIER_MAX_IMAGES", 1),
            max_request_bytes=_int(env, "CLASSIFIER_MAX_REQUEST_BYTES", 1024),
            max_image_pixels=_int(env, "CLASSIFIER_MAX_IMAGE_PIXELS", 1),
            max_concurrency=_int(env, "CLASSIFIER_MAX_CONCURRENCY", 1),
            request_timeout_s=_int(env, "CLASSIFIER_REQUEST_TIMEOUT_S", 1),
        )
