"""Service configuration from environment variables (read once, at import of ``service.service``).

Every variable is optional; a malformed value is an error at startup naming the variable, never a
silent fallback. BentoML reads batching/worker settings when the service class is defined, so these
must be set in the environment of ``bentoml serve`` (or in ``bentofile.yaml`` ``envs``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from .cpus import usable_cpus
from .preprocessing import MIN_DEFAULT_PIXELS, PIXELS_PER_INPUT_PIXEL

#: name -> (default, description); the README table is generated from this.
ENV_VARS: dict[str, tuple[str, str]] = {
    "CLASSIFIER_MODEL_NAME": ("image-classifier", "BentoML model-store name of the ONNX model"),
    "CLASSIFIER_MODEL_VERSION": ("", "empty: serve what the store's pointer for CLASSIFIER_MODEL_ALIAS names and follow "
                                 "the alias; a store version (or `latest`): serve that one, pinned (a built Bento is "
                                 "always pinned to the version it was built with)"),
    "CLASSIFIER_MODEL_ALIAS": ("champion", "the MLflow registry alias served and followed"),
    "CLASSIFIER_REGISTRY_POLL_S": ("10", "seconds between checks of the registry alias (a promotion or rollback is "
                                   "served within about this time plus the load); 0 = follow only the store's pointer "
                                   "(moved by `python -m pipeline.package`)"),
    "CLASSIFIER_ADMIN_TOKEN": ("", "bearer token for POST /admin/reload (check the registry now); empty = the "
                               "endpoint answers 403"),
    "CLASSIFIER_SHADOW_ALIAS": ("", "registry alias (e.g. `challenger`) run beside the champion on a sample of live "
                                "traffic, off the response path; agreement and latency on /metrics; empty = off"),
    "CLASSIFIER_SHADOW_RATE": ("0.1", "fraction of requests shadowed (at most one shadow call in flight per worker)"),
    "CLASSIFIER_PROVIDERS": (
        "auto",
        "ONNX Runtime providers: `auto` (CUDA when usable, else CPU), `cpu`, `cuda` (CUDA; when it cannot start, "
        "fall back to CPU with a loud warning in the log and `provider_warning`/`provider_fallback` in GET /metadata), "
        "`cuda-only` (refuse to start unless CUDA is active), or a comma list such as "
        "`CUDAExecutionProvider,CPUExecutionProvider` (strict about the first)",
    ),
    "CLASSIFIER_WORKERS": ("0", "worker processes, each with its own ONNX Runtime session and micro-batcher; "
                           "0 = one per CPU (with CUDA, 1-2 workers keep the GPU busy)"),
    "CLASSIFIER_ORT_THREADS": ("0", "ONNX Runtime intra-op threads per worker; 0 = CPU count / workers"),
    "CLASSIFIER_MAX_BATCH_SIZE": ("64", "micro-batching: most images per model call"),
    "CLASSIFIER_SPLIT_MIN_MS": ("2", "a CPU model call is cut into chunks run at once on the cores no other worker's call "
                                "holds (one session), each chunk at least this many ms of one core; 0 = never split "
                                "(service.spread)"),
    "CLASSIFIER_MAX_LATENCY_MS": ("5000", "micro-batching: queueing budget; a request predicted to wait longer for the model gets 503 + Retry-After"),
    "CLASSIFIER_KEEPALIVE_REQUESTS": ("20", "with several workers, ~1 in N responses closes its keep-alive connection so that "
                                      "clients reconnect to an idle worker (0 = never)"),
    "CLASSIFIER_ACCESS_LOG": ("1", "1 = one log line per request (BentoML's access log), 0 = none (an ingress or load "
                              "balancer usually logs requests already)"),
    "CLASSIFIER_TRACING": ("0", "1 = OpenTelemetry spans for every request (configure BentoML's `tracing` exporter and "
                           "sample_rate too); 0 = no tracing middleware work at all (it cost ~25 % of the CPU of a "
                           "small-image request even with nothing sampled)"),
    "CLASSIFIER_TOP_K": ("5", "default number of entries in `top_k` (capped at the number of classes)"),
    "CLASSIFIER_MAX_IMAGES": ("64", "most images in one request (more -> 413)"),
    "CLASSIFIER_MAX_REQUEST_BYTES": (str(32 * 1024 * 1024), "largest request body in bytes (more -> 413)"),
    "CLASSIFIER_MAX_IMAGE_PIXELS": ("auto", "largest image in decoded pixels, width*height (more -> 413, refused from the "
                                    "header); `auto` = what the model's input needs: "
                                    f"{PIXELS_PER_INPUT_PIXEL} x its pixels, at least {MIN_DEFAULT_PIXELS} "
                                    "(4.2 MP for 28x28 or 32x32 models), at most 40 MP. Large JPEGs decode at reduced "
                                    "scale and count at that scale"),
    "CLASSIFIER_MAX_REQUEST_PIXELS": ("auto", "most decoded pixels in one request, all images together (more -> 413); "
                                      "`auto` = 4 x CLASSIFIER_MAX_IMAGE_PIXELS"),
    "CLASSIFIER_MODEL_STALL_S": ("20", "a model call running longer than this many seconds is stuck: the worker stops "
                                 "reporting ready, answers 503 `model_stuck` and exits so that it is restarted; 0 = never"),
    "CLASSIFIER_MAX_CONCURRENCY": ("64", "requests in flight per worker before answering 429"),
    "CLASSIFIER_REQUEST_TIMEOUT_S": ("30", "per-request timeout in seconds (-> 504)"),
    "CLASSIFIER_BODY_TIMEOUT_S": ("10", "seconds a client may take to send its whole request body (-> 408): a slow "
                                  "client holds one of the worker's CLASSIFIER_MAX_CONCURRENCY slots meanwhile"),
    "CLASSIFIER_REFUSAL_RATE": ("10", "penalty box: refusals (4xx but 429, or leaving unanswered) per second a client "
                                "address may have without being slowed; past CLASSIFIER_REFUSAL_BURST its new requests "
                                "wait before they are read (per worker; 0 = off)"),
    "CLASSIFIER_REFUSAL_BURST": ("50", "penalty box: refusals a client address may have outstanding before any delay"),
    "CLASSIFIER_REFUSAL_MAX_DELAY_S": ("5", "penalty box: the longest wait a penalised request gets"),
}


def _check_names(env: Mapping[str, str]) -> None:
    """An unknown CLASSIFIER_* variable is an error (a typo, or a setting that no longer exists would
    otherwise be ignored without a word), naming the closest known one."""
    import difflib

    for name in sorted(n for n in env if n.startswith("CLASSIFIER_") and n not in ENV_VARS):
        known = {k.removeprefix("CLASSIFIER_"): k for k in ENV_VARS}  # the shared prefix would make all "close"
        close = difflib.get_close_matches(name.removeprefix("CLASSIFIER_"), known, n=1, cutoff=0.6)
        hint = f"; did you mean {known[close[0]]}?" if close else "; docs/deployment.md lists them"
        raise ValueError(f"{name} is not a setting of this service{hint}")


def _int(env: Mapping[str, str], name: str, minimum: int) -> int:
    raw = env.get(name, "").strip() or ENV_VARS[name][0]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, minimum: float, maximum: float = float("inf")) -> float:
    raw = env.get(name, "").strip() or ENV_VARS[name][0]
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not minimum <= value <= maximum:
        raise ValueError(f"{name}={value} must be between {minimum} and {maximum}")
    return value


def _pixels(env: Mapping[str, str], name: str) -> int:
    """A pixel count, or 0 for `auto` (resolved per model: service.preprocessing.pixel_limit)."""
    raw = env.get(name, "").strip().lower() or ENV_VARS[name][0]
    return 0 if raw == "auto" else _int({name: raw}, name, 1)


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower() or ENV_VARS[name][0]
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"{name}={raw!r} must be 1 or 0")
    return raw in ("1", "true", "yes")


@dataclass(frozen=True)
class ServiceConfig:
    model_name: str = "image-classifier"
    model_version: str = ""
    model_alias: str = "champion"
    registry_poll_s: float = 10.0
    admin_token: str = ""
    shadow_alias: str = ""
    shadow_rate: float = 0.1
    providers: str = "auto"
    ort_threads: int = 0
    workers: int = 0  # 0 -> cpu_count (the CPUs this process may use), resolved by from_env
    max_batch_size: int = 64
    split_min_ms: float = 2.0  # 0 = never split a model call (service.spread)
    max_latency_ms: int = 5000
    keepalive_requests: int = 20
    access_log: bool = True
    tracing: bool = False
    top_k: int = 5
    max_images: int = 64
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 0  # 0 = auto: from the model's input size (limits_for)
    max_request_pixels: int = 0  # 0 = auto: 4 x the per-image limit
    model_stall_s: float = 20.0
    max_concurrency: int = 64
    request_timeout_s: int = 30
    body_timeout_s: float = 10.0
    refusal_rate: float = 10.0  # 0 = no penalty box
    refusal_burst: int = 50
    refusal_max_delay_s: float = 5.0
    cpu_count: int = field(default_factory=usable_cpus)  # affinity and cgroup quota, not the host's cores

    @property
    def intra_op_threads(self) -> int:
        """Threads per ONNX Runtime session: explicit, or the CPUs shared among the workers."""
        if self.ort_threads > 0:
            return self.ort_threads
        return max(1, self.cpu_count // max(1, self.workers))

    def as_dict(self) -> dict:
        return {**asdict(self), "admin_token": "***" if self.admin_token else "",
                "intra_op_threads": self.intra_op_threads}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ServiceConfig":
        env = os.environ if env is None else env
        name = env.get("CLASSIFIER_MODEL_NAME", "").strip() or "image-classifier"
        version = env.get("CLASSIFIER_MODEL_VERSION", "").strip()
        alias = env.get("CLASSIFIER_MODEL_ALIAS", "").strip() or "champion"
        shadow_alias = env.get("CLASSIFIER_SHADOW_ALIAS", "").strip()
        if shadow_alias == alias:
            raise ValueError(f"CLASSIFIER_SHADOW_ALIAS={shadow_alias!r} is the served alias itself")
        if ":" in name:
            raise ValueError(f"CLASSIFIER_MODEL_NAME={name!r} must be a bare name; put the version in CLASSIFIER_MODEL_VERSION")
        _check_names(env)
        providers = env.get("CLASSIFIER_PROVIDERS", "").strip() or "auto"
        max_batch_size = _int(env, "CLASSIFIER_MAX_BATCH_SIZE", 1)
        cpu_count = usable_cpus()
        return cls(
            model_name=name,
            model_version=version,
            model_alias=alias,
            registry_poll_s=_float(env, "CLASSIFIER_REGISTRY_POLL_S", 0.0),
            admin_token=env.get("CLASSIFIER_ADMIN_TOKEN", "").strip(),
            shadow_alias=shadow_alias,
            shadow_rate=_float(env, "CLASSIFIER_SHADOW_RATE", 0.001, 1.0),
            providers=providers,
            ort_threads=_int(env, "CLASSIFIER_ORT_THREADS", 0),
            workers=_int(env, "CLASSIFIER_WORKERS", 0) or cpu_count,
            max_batch_size=max_batch_size,
            split_min_ms=_float(env, "CLASSIFIER_SPLIT_MIN_MS", 0.0),
            max_latency_ms=_int(env, "CLASSIFIER_MAX_LATENCY_MS", 1),
            keepalive_requests=_int(env, "CLASSIFIER_KEEPALIVE_REQUESTS", 0),
            access_log=_flag(env, "CLASSIFIER_ACCESS_LOG"),
            tracing=_flag(env, "CLASSIFIER_TRACING"),
            top_k=_int(env, "CLASSIFIER_TOP_K", 1),
            max_images=_int(env, "CLASSIFIER_MAX_IMAGES", 1),
            max_request_bytes=_int(env, "CLASSIFIER_MAX_REQUEST_BYTES", 1024),
            max_image_pixels=_pixels(env, "CLASSIFIER_MAX_IMAGE_PIXELS"),
            max_request_pixels=_pixels(env, "CLASSIFIER_MAX_REQUEST_PIXELS"),
            model_stall_s=_float(env, "CLASSIFIER_MODEL_STALL_S", 0.0),
            max_concurrency=_int(env, "CLASSIFIER_MAX_CONCURRENCY", 1),
            request_timeout_s=_int(env, "CLASSIFIER_REQUEST_TIMEOUT_S", 1),
            body_timeout_s=_float(env, "CLASSIFIER_BODY_TIMEOUT_S", 0.1),
            refusal_rate=_float(env, "CLASSIFIER_REFUSAL_RATE", 0.0),
            refusal_burst=_int(env, "CLASSIFIER_REFUSAL_BURST", 0),
            refusal_max_delay_s=_float(env, "CLASSIFIER_REFUSAL_MAX_DELAY_S", 0.0, 60.0),
            cpu_count=cpu_count,
        )
