"""BentoML 1.4 services: ``bentoml serve service.service:Classifier``.

One service, ``Classifier``: ``POST /classify`` (multipart), ``POST /classify_base64`` (JSON),
``GET|POST /metadata``, a web page at ``GET /ui`` (``service.ui``), plus BentoML's ``/livez``,
``/readyz``, ``/metrics`` and OpenAPI docs.

Each worker process (``CLASSIFIER_WORKERS``, default one per CPU) holds its own ONNX Runtime session
(``CLASSIFIER_ORT_THREADS`` intra-op threads, default CPUs / workers). A request is parsed and
validated, its images decoded and preprocessed (``service.preprocessing``) into one
``float32 [n, C, H, W]`` array (split into chunks of at most ``CLASSIFIER_MAX_BATCH_SIZE``) and handed
to the worker's micro-batcher (``service.batcher``), which merges the arrays of concurrent requests
into one model call. The model runs in the worker that parsed the request: a separate BentoML model
service (adaptive batching across processes) cost ~5 ms of CPU per request in serialization and a
second HTTP hop, 100x the tiny CNN's inference (bench/results, README "Serving benchmark").
Batch sizes are on ``/metrics`` as the histogram ``classifier_batch_size``.

Which model: ``service.model_source.select_model`` (a built Bento serves the version it was built
with; ``CLASSIFIER_MODEL_VERSION`` pins a store version; otherwise the store's pointer for the
registry alias ``CLASSIFIER_MODEL_ALIAS``, default ``champion``). An unpinned worker follows its
alias (``service.follower``): a promotion or rollback in the registry is loaded and warmed beside
the serving model, then swapped in; in-flight requests finish on the model they started on, and
every prediction response names the model that answered (``X-Model-Version``: registry version,
``X-Model-Tag``: store tag). ``CLASSIFIER_SHADOW_ALIAS`` runs a challenger on a sample of the
traffic, off the response path (``service.shadow``). ``POST /admin/reload`` (bearer token
``CLASSIFIER_ADMIN_TOKEN``) checks the registry at once.

Errors are JSON: ``{"error": message, "reason": code, "status": http_status, "file": name,
"index": i, "errors": [per-file entries]}``; bad input is a 4xx, overload a 429/503, never a hang.
"""
import asyncio
import base64
import binascii
import functools
import gc
import hmac
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
import threading
from typing import Any, Optional

import numpy as np
import orjson
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.formparsers import MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import bentoml
from service.batcher import MicroBatcher, Overloaded
from service.bodies import BadValue, load_json, quote, top_k_value
from service.config import ServiceConfig
from service.contract import MODEL_FILE, PreprocessSpec, normalize
from service.decoding import (INLINE_BYTES, INLINE_PIXELS, DecodeBudget, DecodeBusy, DecodePool, canvas_pixels,
                              decode_cost)
from service.engine import OnnxClassifier
from service.follower import AliasFollower, Unservable
from service.limits import (CancelOnDisconnectMiddleware, ConnectionRecycleMiddleware, JsonErrorsMiddleware,
                            RequestSizeLimitMiddleware, error_response)
from service.model_source import (REGISTRY_KEYS, NoModelForAlias, Selection, pointer_file,
                                  read_pointers, select_model)
from service.patches import (check_bentoml_version, mark_metrics_process_dead, patch_access_log,
                             patch_concurrency_limit, patch_media_types, patch_metrics_paths,
                             patch_outermost_middleware, patch_timeout_middleware)
from service.penalty import PenaltyBoxMiddleware, RefusalPenalty
from service.postprocessing import predictions
from service.preprocessing import ImageError, spec_to_array
from service.shadow import Shadow
from service.spread import BusyBoard, Spreader
from service.ui import ServerTimingMiddleware, ui_routes

CONFIG = ServiceConfig.from_env()
check_bentoml_version()  # a warning when the installed BentoML is not the one the workarounds were written for
patch_timeout_middleware()  # BentoML's per-request timeout timers otherwise live for the whole timeout
patch_concurrency_limit()  # its 429 in the API's error shape, with Retry-After
patch_access_log()  # a non-UTF-8 Content-Type no longer cuts the response off
SOURCE_DIR = Path(__file__).resolve().parent.parent  # the project (or the Bento's src/) folder
try:  # at import: what `bentoml build` pins and what a worker serves unless it runs from a Bento
    SELECTION: Optional[Selection] = select_model(CONFIG.model_name, CONFIG.model_version, CONFIG.model_alias,
                                                  None, read_pointers(CONFIG.model_name))
    NO_MODEL: Optional[str] = None
except NoModelForAlias as _err:  # importable (tests, tooling); a worker refuses to start, saying why
    SELECTION, NO_MODEL = None, str(_err)


def worker_selection() -> Optional[Selection]:
    """In a worker: a built Bento's own model (BentoML sets ``Service.bento`` when it serves one, but
    re-resolves only Hugging Face model references to the Bento's versions, so this one is ours to
    pin): the one named CLASSIFIER_MODEL_NAME, else the Bento's only model (a CIFAR-10 Bento serves
    its model without CLASSIFIER_MODEL_NAME set); else the import-time selection."""
    bento = getattr(Classifier, "bento", None)
    models = [m.tag for m in getattr(getattr(bento, "info", None), "all_models", []) or []]
    named = [tag for tag in models if tag.name == CONFIG.model_name] or (models if len(models) == 1 else [])
    if named:
        return select_model(named[0].name, "", CONFIG.model_alias, str(named[0]), {})
    return SELECTION


#: never held back by the penalty box: an orchestrator's probes and the metrics scraper
PROBE_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")
#: seconds the registry -> store sync (python -m pipeline.serving: download, check, store) may take
SYNC_TIMEOUT_S = 600
FIELD = "images"
#: pixels the decode threads may hold, queued or running, in maximal requests (DecodeBudget.request_pixels):
#: 8 x 16.8 MP (a 28x28 model's default) is ~1.3 s of lossless-WebP decoding (~9 ns per pixel)
DECODE_QUEUE_REQUESTS = 8
#: seconds between checks for a stuck model call; seconds a worker answers 503 before it exits
WATCHDOG_INTERVAL_S, STUCK_EXIT_S = 1.0, 2.0
#: exit status of a worker whose model call is stuck (circus, or the container's orchestrator, restarts it)
EXIT_MODEL_STUCK = 70

logger = logging.getLogger("bentoml.classifier")


# --- error responses -------------------------------------------------------------------------------

class Rejection:
    """A request refused while parsing; the API method turns it into the JSON error response."""

    def __init__(self, status: int, error: str, reason: str, **extra: Any) -> None:
        self.status, self.error, self.reason, self.extra = status, error, reason, extra

    def response(self) -> Response:
        return error_response(self.status, self.error, self.reason, **self.extra)


MAX_NAME_CHARS = 100


def display_name(filename: Optional[str], index: int) -> str:
    """A client's file name made safe to echo in JSON errors and logs (it never touches the filesystem).

    Only the last path component is kept (``../../etc/passwd`` -> ``passwd``), control characters
    (NUL, CR/LF, ...) are dropped and the result is cut to ``MAX_NAME_CHARS``; an empty result
    becomes ``images[i]``.
    """
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if len(name) > MAX_NAME_CHARS:
        name = name[:MAX_NAME_CHARS - 3] + "..."
    return name if name not in ("", ".", "..") else f"{FIELD}[{index}]"


class Upload:
    """One image of a request: its position, a display name (file name or ``images[i]``) and bytes."""

    __slots__ = ("index", "name", "data")

    def __init__(self, index: int, name: str, data: bytes) -> None:
        self.index, self.name, self.data = index, name, data


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _parse_top_k(raw: Any) -> "int | None | Rejection":
    try:
        return top_k_value(raw)
    except BadValue as err:
        return Rejection(400, err.message, err.reason)


def _too_many(count: int) -> Rejection:
    return Rejection(
        413,
        f"too many images in one request: {count} > {CONFIG.max_images} (CLASSIFIER_MAX_IMAGES); split the request",
        "too_many_images",
        limit=CONFIG.max_images,
    )


# --- request bodies (custom parsing so that no malformed body reaches BentoML's generic parser) ----

class InMemoryMultiPartParser(MultiPartParser):
    """Uploaded files stay in memory: the whole body does anyway (<= CLASSIFIER_MAX_REQUEST_BYTES), and
    Starlette's spooling of a part over 1 MB to a temporary file cost a thread hand-off per 64 KB
    chunk, a fifth of the event loop's time under a flood of large uploads (bench/abuse.py, py-spy)."""

    spool_max_size = CONFIG.max_request_bytes + 1


class ClassifyMultipart(bentoml.IODescriptor):
    """``multipart/form-data`` with one or more image files in the repeatable field ``images``."""

    images: list[Path] = Field(description="image files (PNG, JPEG, WebP, BMP, TIFF, GIF); repeat the field for several")
    top_k: Optional[int] = Field(default=None, description="entries in each top_k list (default CLASSIFIER_TOP_K)")

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> "ClassifyMultipart":
        if _media_type(request) != "multipart/form-data":
            rejection = Rejection(
                415,
                f"POST /classify takes multipart/form-data with files in the field '{FIELD}', got "
                f"{request.headers.get('content-type') or 'no Content-Type'}; JSON clients use POST /classify_base64",
                "unsupported_media_type",
            )
            return cls.model_construct(images=rejection, top_k=None)
        try:
            form = await InMemoryMultiPartParser(request.headers, request.stream(), max_files=CONFIG.max_images,
                                                 max_fields=4, max_part_size=64 * 1024).parse()
        except Exception as err:  # starlette: MultiPartException / HTTPException(400) for malformed bodies
            message = getattr(err, "detail", None) or getattr(err, "message", None) or str(err) or type(err).__name__
            if "too many files" in str(message).lower():
                return cls.model_construct(images=_too_many(CONFIG.max_images + 1), top_k=None)
            return cls.model_construct(images=Rejection(400, f"malformed multipart body: {quote(str(message), 200)}",
                                                        "bad_multipart"), top_k=None)
        uploads: list[Upload] = []
        top_k: Any = None
        for key, value in form.multi_items():
            if key == FIELD:
                if isinstance(value, str):
                    return cls.model_construct(images=Rejection(
                        400, f"form field '{FIELD}' #{len(uploads)} is text, not a file upload", "not_a_file",
                        index=len(uploads), file=f"{FIELD}[{len(uploads)}]"), top_k=None)
                index = len(uploads)
                uploads.append(Upload(index, display_name(value.filename, index), await value.read()))
                await value.close()  # its buffer: the bytes are in the Upload now (1x the body in memory, not 2x)
            elif key == "top_k" and isinstance(value, str):
                top_k = value
            else:
                return cls.model_construct(images=Rejection(
                    400, f"unexpected form field {quote(key)}; send files in the repeatable field '{FIELD}'",
                    "unexpected_field", field=key[:MAX_NAME_CHARS]), top_k=None)
        if not uploads:
            return cls.model_construct(images=Rejection(
                400, f"no files: send one or more images in the multipart field '{FIELD}'", "no_images"), top_k=None)
        return cls.model_construct(images=uploads, top_k=_parse_top_k(top_k))


class ClassifyBase64(bentoml.IODescriptor):
    """``application/json``: ``{"images": ["<base64>", ...], "top_k": 5}``."""

    images: list[str] = Field(description="base64-encoded image files (standard or URL-safe alphabet, data: URLs accepted)")
    top_k: Optional[int] = Field(default=None, description="entries in each top_k list (default CLASSIFIER_TOP_K)")

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> "ClassifyBase64":
        def reject(status: int, error: str, reason: str, **extra: Any) -> "ClassifyBase64":
            return cls.model_construct(images=Rejection(status, error, reason, **extra), top_k=None)

        media = _media_type(request)
        if media not in ("", "application/json") and not media.endswith("+json"):
            return reject(415, f"POST /classify_base64 takes application/json, got {media}", "unsupported_media_type")
        try:
            raw = await request.body()
        except Exception as err:  # client went away, or the size limit tripped (the middleware answers 413)
            return reject(400, f"cannot read the request body: {type(err).__name__}", "bad_body")
        try:
            body = load_json(raw, CONFIG.max_images)
        except BadValue as err:
            return reject(400, err.message, err.reason)
        if not isinstance(body, dict) or not isinstance(body.get(FIELD), list):
            return reject(400, f'body must be a JSON object {{"{FIELD}": ["<base64>", ...]}}', "bad_json")
        unexpected = sorted(set(body) - {FIELD, "top_k"})
        if unexpected:
            return reject(400, f"unexpected key(s) {quote(unexpected, 120)}", "unexpected_field")
        items = body[FIELD]
        if not items:
            return reject(400, f"'{FIELD}' is empty: send one or more base64 images", "no_images")
        if len(items) > CONFIG.max_images:
            return cls.model_construct(images=_too_many(len(items)), top_k=None)
        uploads = []
        for index, item in enumerate(items):
            name = f"{FIELD}[{index}]"
            if not isinstance(item, str):
                return reject(400, f"{name} is not a string", "bad_base64", file=name, index=index)
            text = item.strip()
            if text.startswith("data:"):
                text = text.partition(",")[2]
            text = _without_whitespace(text)
            try:
                altchars = b"-_" if ("-" in text or "_" in text) else None
                data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)
            except (binascii.Error, ValueError) as err:
                return reject(400, f"{name} is not valid base64: {quote(str(err), 120)}", "bad_base64", file=name, index=index)
            uploads.append(Upload(index, name, data))
        top_k = _parse_top_k(body.get("top_k"))
        return cls.model_construct(images=uploads, top_k=top_k)


_WHITESPACE = str.maketrans("", "", " \t\r\n\v\f")


def _without_whitespace(text: str) -> str:
    """``text`` without ASCII whitespace, in one pass (``"".join(text.split())`` built one string per
    piece: 0.6 s and ~700 MB for 32 MB of "abc abc ...")."""
    return text.translate(_WHITESPACE)


class NoInput(bentoml.IODescriptor):
    """No request body (any body is ignored)."""

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> "NoInput":
        return cls.model_construct()


class TopK(BaseModel):
    label: str
    index: int
    score: float = Field(description="softmax probability")


class Prediction(BaseModel):
    label: str
    index: int
    score: float = Field(description="softmax probability of `label`")
    top_k: list[TopK]


BATCH_SIZE = bentoml.metrics.Histogram(
    name="classifier_batch_size",
    documentation="images per model call (micro-batching merges concurrent requests)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)

CALL_CORES = bentoml.metrics.Histogram(
    name="classifier_call_cores",
    documentation="cores each model call ran on: chunks of one call run at once on idle cores (service.spread)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)

MODEL_EVENTS = bentoml.metrics.Counter(
    name="classifier_model_events",
    documentation="alias following: models loaded, versions refused (kept serving the old one), registry errors",
    labelnames=["alias", "event"],
)
MODEL_SECONDS = bentoml.metrics.Histogram(
    name="classifier_model_seconds",
    documentation="seconds a request's images spent in the model (champion: queue + call; shadow: call)",
    labelnames=["model"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
PENALTY_DELAYS = bentoml.metrics.Histogram(
    name="classifier_penalty_delay_seconds",
    documentation="requests held back by the penalty box (their client address kept being refused), by wait",
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
)
SHADOW_IMAGES = bentoml.metrics.Counter(
    name="classifier_shadow_images",
    documentation="shadowed images by outcome: agree / disagree (top-1 of challenger vs champion), skipped (busy), error",
    labelnames=["outcome"],
)


def load_engine(stored: Any, threads: Optional[int] = None) -> tuple[OnnxClassifier, dict]:
    """The worker's ONNX Runtime session for the store entry ``stored``, warmed up, and its description."""
    path = stored.path_of(MODEL_FILE)
    started = time.perf_counter()
    try:
        engine = OnnxClassifier(path, providers=CONFIG.providers, intra_op_threads=threads or CONFIG.intra_op_threads)
    except Exception as err:  # one clear line before BentoML's traceback; the worker never becomes ready
        logger.error(
            "cannot serve model %s from %s: %s: %s (CLASSIFIER_MODEL_NAME/CLASSIFIER_MODEL_ALIAS/"
            "CLASSIFIER_MODEL_VERSION select the model; see docs/model-contract.md)", stored.tag, path,
            type(err).__name__, err)
        raise
    logger.info(
        "model %s loaded from %s: ONNX Runtime providers requested %s, ACTIVE %s, intra-op threads %d",
        stored.tag, path, engine.requested_providers, engine.active_providers, engine.intra_op_threads,
    )
    if engine.provider_warning:
        logger.warning("EXECUTION PROVIDER FALLBACK: %s", engine.provider_warning)
    warmup_s = engine.warmup((1,))
    batch_s = engine.warmup((CONFIG.max_batch_size,))  # timed alone: the seconds per image of a full call
    logger.info("warm-up (batch 1 and %d) took %.3fs; load + warm-up %.3fs",
                CONFIG.max_batch_size, warmup_s + batch_s, time.perf_counter() - started)
    info = stored.info
    labels, meta = dict(info.labels), dict(info.metadata)
    description = {
        "model_name": stored.tag.name,
        "model_version": stored.tag.version,
        "model_tag": str(stored.tag),
        "created": info.creation_time.isoformat(),
        **{key: labels.get(key, meta.get(key)) for key in REGISTRY_KEYS},
        "labels": labels,
        **engine.describe(),
        "batching": {"max_batch_size": CONFIG.max_batch_size, "max_latency_ms": CONFIG.max_latency_ms,
                     "warmup_ms_per_image": round(1000 * batch_s / CONFIG.max_batch_size, 4)},
        "workers": CONFIG.workers,
    }
    if not description.get("mlflow_run_id"):
        description["mlflow_run_id"] = description.get("onnx_mlflow_run_id")
    return engine, description


# --- following the registry alias ------------------------------------------------------------------

_SYNCS: set[subprocess.Popen] = set()  # running `python -m pipeline.serving` children (stopped at shutdown)


def _sync_command(alias: str) -> Any:
    """``sync`` for the follower: ``python -m pipeline.serving`` in a subprocess (mlflow stays out of
    the worker), run by one worker at a time: the others find the sync lock taken and return False
    (the pointer move reaches them anyway). Its exit code tells a version that can never be served
    (refused) from a store that did not answer (asked again)."""
    from pipeline import atomic, serving

    def sync() -> bool:
        lock = pointer_file(CONFIG.model_name).with_suffix(f".{alias}.sync")
        try:
            with atomic.file_lock(lock, timeout_s=0):
                out = _run_sync(alias)
        except TimeoutError:
            return False  # another worker is syncing this alias
        message = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        if out.returncode == serving.EXIT_UNSERVABLE:
            raise Unservable(message)
        if out.returncode != 0:
            raise RuntimeError(message)
        logger.info("%s", out.stdout.strip())
        return True

    return sync


def _run_sync(alias: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.serving", "--model", CONFIG.model_name, "--alias", alias],
                            cwd=SOURCE_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _SYNCS.add(proc)
    try:
        stdout, stderr = proc.communicate(timeout=SYNC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        stderr += f"\npython -m pipeline.serving took more than {SYNC_TIMEOUT_S} s"
    finally:
        _SYNCS.discard(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def make_follower(alias: str, serving: Optional[dict], swap: Any, load: Any, registry: bool = True) -> AliasFollower:
    """A follower of ``alias`` in this worker: the store's pointer always; the registry every
    CLASSIFIER_REGISTRY_POLL_S seconds (through pipeline.tracking's mlflow-free look-up) when
    ``registry`` and the source tree's ``pipeline`` package is there (a built Bento has none)."""
    peek = sync = None
    if registry and CONFIG.registry_poll_s > 0:
        try:
            from pipeline import tracking
        except ImportError:
            logger.warning("alias %r: no `pipeline` package beside the service: following the store's pointer only",
                           alias)
        else:
            def peek() -> Optional[str]:
                return tracking.peek_alias(CONFIG.model_name, alias)

            sync = _sync_command(alias)
    return AliasFollower(
        alias, serving, read_pointer=lambda: read_pointers(CONFIG.model_name).get(alias), load=load, swap=swap,
        peek=peek, sync=sync, registry_poll_s=CONFIG.registry_poll_s,
        on_event=lambda event: MODEL_EVENTS.labels(alias=alias, event=event).inc())


@functools.lru_cache(maxsize=1)
def busy_board() -> Optional[BusyBoard]:
    """The cores the workers' model calls hold, shared by this service's workers (service.spread);
    None outside a numbered BentoML worker."""
    return BusyBoard.for_service("image-classifier", bentoml.server_context.worker_index)


class ModelStuck(Exception):
    """The worker's model call has not returned within CLASSIFIER_MODEL_STALL_S."""


class Slot:
    """One loaded model and its micro-batcher. A request keeps the slot it started on, so a swap
    never changes the model under a request that is already running."""

    def __init__(self, engine: Any, description: dict, max_latency_ms: float) -> None:
        self.engine, self.description = engine, description
        self.spec: PreprocessSpec = engine.spec  # read from the model's metadata (service.engine)
        self.budget = DecodeBudget.for_model(self.spec, CONFIG.max_image_pixels, CONFIG.max_request_pixels)
        warmup_ms = (description.get("batching") or {}).get("warmup_ms_per_image")
        # several workers with no board to see each other's calls: never split (they would oversubscribe)
        cpus = CONFIG.cpu_count if CONFIG.workers == 1 or busy_board() is not None else 1
        self.spreader = Spreader(engine, cpus, busy_board(), warmup_ms and warmup_ms / 1000,
                                 CONFIG.split_min_ms / 1000, on_call=CALL_CORES.observe)
        self.batcher = MicroBatcher(self.spreader.logits, CONFIG.max_batch_size, max_latency_ms,
                                    on_batch=BATCH_SIZE.observe, call_cores=lambda: self.spreader.cores_of_last_call)
        version = description.get("registry_version") or description.get("model_version")
        self.headers = {"X-Model-Version": str(version), "X-Model-Tag": str(description.get("model_tag"))}
        self.users = 0  # requests running on this slot

    async def retire(self) -> None:
        """After a swap: wait for the requests still running here, then stop the batcher's thread."""
        while self.users:
            await asyncio.sleep(0.05)
        self.batcher.close()
        self.spreader.close()


# --- the public service ----------------------------------------------------------------------------

async def _get_metadata(request: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().metadata_dict())


async def _admin_reload(request: Request) -> Response:
    """Check the registry now (the follower would within CLASSIFIER_REGISTRY_POLL_S). Bearer token."""
    if not CONFIG.admin_token:
        return error_response(403, "admin endpoints are disabled: set CLASSIFIER_ADMIN_TOKEN", "admin_disabled")
    supplied = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(supplied, f"Bearer {CONFIG.admin_token}".encode()):
        return error_response(401, "POST /admin/reload needs 'Authorization: Bearer <CLASSIFIER_ADMIN_TOKEN>'",
                              "unauthorized", headers={"WWW-Authenticate": "Bearer"})
    svc = bentoml.get_current_service()
    if svc.follower is None:
        return error_response(409, f"this service is pinned ({svc.selection.pinned_by}: {svc.selection.tag}); it follows "
                              "no alias", "pinned")
    return JSONResponse(await svc.follower.check_now(retry_refused=True))


_metadata_app = Starlette(routes=[Route("/metadata", _get_metadata, methods=["GET"]),
                                  Route("/admin/reload", _admin_reload, methods=["POST"]), *ui_routes()])


@bentoml.asgi_app(_metadata_app, path="/")
@bentoml.service(
    name="image-classifier",
    workers=CONFIG.workers,
    # BentoML splits max_concurrency evenly among the workers, but the kernel does not spread
    # connections evenly: the limit is per worker, so one busy worker never 429s below it
    traffic={"timeout": CONFIG.request_timeout_s, "max_concurrency": CONFIG.max_concurrency * CONFIG.workers},
    logging={"access": {"enabled": CONFIG.access_log}},
    # BentoML's OpenTelemetry middleware builds a span per request even when none is sampled;
    # excluding every URL ("/" matches them all) skips it unless CLASSIFIER_TRACING=1
    **({} if CONFIG.tracing else {"tracing": {"excluded_urls": ["/"]}}),
)
class Classifier:
    """Image classification: POST images, get labels with softmax scores and top-k lists."""

    if SELECTION is not None:  # resolved (and, by `bentoml build`, copied into the Bento) by BentoML
        model_ref = bentoml.models.BentoModel(SELECTION.tag)

    def __init__(self) -> None:
        self.selection = selection = worker_selection()
        if selection is None:
            logger.error("cannot start: %s", NO_MODEL)
            raise NoModelForAlias(NO_MODEL)
        entry, refused = self._load_first(selection)
        if selection.follows:
            self.follower = make_follower(selection.alias, entry, self._swap, self._load)
            if refused:
                self.follower.refuse_entry(*refused)
        if CONFIG.shadow_alias:
            self.shadow = Shadow(CONFIG.shadow_rate, _record_shadow)
            self.shadow_follower = make_follower(CONFIG.shadow_alias, None, self._swap_shadow, self._load_shadow,
                                                 registry=selection.pinned_by != "bento")
        # Everything loaded so far (BentoML, ONNX Runtime, pydantic schemas: ~10^6 objects) lives as
        # long as the worker: keep it out of the cyclic GC, whose full collections otherwise stall
        # the event loop for ~0.1 s every few seconds under load (p99 latency).
        gc.collect()
        gc.freeze()

    def _load_first(self, selection: Selection) -> tuple[dict, Optional[tuple[dict, str]]]:
        """Serve the selected model; a followed alias whose new entry cannot be loaded falls back to
        the entry it replaced (kept in the pointer), so a restarted worker does not crash-loop.
        Returns the pointer entry served and, after a fallback, (refused entry, reason)."""
        pointer = read_pointers(CONFIG.model_name).get(selection.alias or "") or {}
        try:
            self._start(*self._load(selection.tag))
            return {**pointer, "tag": selection.tag, "registry_version": self._slot.description.get("registry_version")}, None
        except Exception as err:
            previous = pointer.get("previous") if selection.follows else None
            if not previous:
                raise
            logger.error("alias %r: cannot serve %s (%s: %s); falling back to the entry it replaced, %s",
                         selection.alias, selection.tag, type(err).__name__, err, previous["tag"])
            self._start(*self._load(previous["tag"]))
            return dict(previous), (pointer, f"cannot be loaded: {type(err).__name__}: {err}")

    def _load(self, tag: str, threads: Optional[int] = None) -> tuple[Any, dict]:
        return load_engine(bentoml.models.get(tag), threads)

    def _load_shadow(self, tag: str) -> tuple[Any, dict]:
        """The challenger, on one thread; refused unless it takes the champion's inputs and classes
        (it is fed the champion's preprocessed batch and compared by class index)."""
        engine, description = self._load(tag, threads=1)
        mine, theirs = self._slot.spec, engine.spec
        if theirs != mine:  # the whole PreprocessSpec: shape, mean/std, resize, input_transform, classes
            raise ValueError(f"the shadow model's preprocessing or classes differ from the champion's "
                             f"({theirs.input_shape}, {theirs.input_transform}, mean {theirs.mean}, "
                             f"{len(theirs.classes)} classes vs {mine.input_shape}, {mine.input_transform}, "
                             f"mean {mine.mean}, {len(mine.classes)} classes)")
        return engine, description

    @bentoml.on_startup
    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        for follower in (self.follower, self.shadow_follower):
            if follower is not None:
                self._tasks.append(loop.create_task(follower.run(), name=f"follow-{follower.alias}"))
        if CONFIG.model_stall_s > 0:
            self._tasks.append(loop.create_task(self._watch_model(), name="model-watchdog"))

    async def _watch_model(self) -> None:
        """Detect a model call that never returns (it cannot be interrupted: ONNX Runtime holds its
        thread): stop reporting ready, fail the waiting requests with 503, and exit so that the
        worker is replaced (circus respawns it; in a container the orchestrator restarts the server)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            slots = [self._slot, *self._retiring]  # a model swapped out mid-call can be the stuck one
            seconds = max(slot.batcher.running_for(loop.time()) for slot in slots)
            if seconds > CONFIG.model_stall_s:
                break
        self.stuck = (f"a model call has run for {seconds:.0f} s (> CLASSIFIER_MODEL_STALL_S={CONFIG.model_stall_s:g}); "
                      "this worker is being replaced")
        logger.error("MODEL STUCK: %s; exiting in %.0f s with status %d", self.stuck, STUCK_EXIT_S, EXIT_MODEL_STUCK)
        MODEL_EVENTS.labels(alias=getattr(self.selection, "alias", None) or "", event="stuck").inc()
        for slot in slots:
            slot.batcher.abandon(ModelStuck(self.stuck))
        loop.call_later(STUCK_EXIT_S, _exit_stuck)

    async def __is_ready__(self) -> bool:
        """/readyz: 503 once the model is stuck (the worker is about to exit)."""
        return self.stuck is None

    @bentoml.on_shutdown
    async def _stop_following(self) -> None:
        for task in self._tasks:
            task.cancel()
        for proc in list(_SYNCS):  # a sync in flight: its store lock is released with it
            proc.terminate()
        if self._decode_pool is not None:
            self._decode_pool.close()
        if busy_board() is not None:
            busy_board().remove()

    def _start(self, engine: Any, description: dict, max_latency_ms: Optional[float] = None) -> None:
        """Serve ``engine`` (``spec``: its ``PreprocessSpec``; ``logits(float32 [N, C, H, W]) -> [N, classes]``)
        described by ``description``."""
        self._max_latency_ms = CONFIG.max_latency_ms if max_latency_ms is None else max_latency_ms
        self._slot = Slot(engine, description, self._max_latency_ms)
        self._decode_pool: Optional[DecodePool] = None
        self._retiring: list[Slot] = []  # swapped-out models still finishing their requests
        self.stuck: Optional[str] = None  # why the worker stopped serving (a stuck model call)
        for name in ("selection", "follower", "shadow", "shadow_follower"):  # set by __init__; absent for a bare _start
            setattr(self, name, getattr(self, name, None))
        self._tasks = getattr(self, "_tasks", [])

    def _swap(self, model: tuple[Any, dict], entry: dict) -> None:
        """Serve a newly loaded model from the next request on (one assignment: atomic on the loop)."""
        engine, description = model
        old, self._slot = self._slot, Slot(engine, description, self._max_latency_ms)
        self._retiring.append(old)
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._tasks = [t for t in self._tasks if not t.done()] + [task]

    async def _retire(self, slot: Slot) -> None:
        try:
            await slot.retire()
        finally:
            self._retiring.remove(slot)

    def _swap_shadow(self, model: tuple[Any, dict], entry: dict) -> None:
        assert self.shadow is not None
        self.shadow.engine, self.shadow.description = model

    @property
    def engine(self) -> Any:
        return self._slot.engine

    @property
    def batcher(self) -> MicroBatcher:
        return self._slot.batcher

    def _decode(self, uploads: list, spec: PreprocessSpec, budget: DecodeBudget,
                cancelled: Optional[threading.Event] = None) -> tuple[list, list]:
        """Every upload -> ``uint8 [C, H, W]``, or its error entry; stops early once ``cancelled``."""
        arrays, errors = [], []
        for upload in uploads:
            if cancelled is not None and cancelled.is_set():
                break  # nobody waits for the result any more
            try:
                arrays.append(spec_to_array(upload.data, spec, max_pixels=budget.image_pixels))
            except ImageError as err:
                errors.append(_image_error(upload, err))
            except Exception as err:  # never let a decoder bug become a 500 for one bad file
                logger.exception("unexpected error decoding %s", upload.name)
                errors.append({"index": upload.index, "file": upload.name, "reason": "corrupt",
                               "status": 400, "error": f"cannot decode image: {type(err).__name__}: {err}"})
        return arrays, errors

    async def _decode_request(self, uploads: list, slot: Slot) -> "list[np.ndarray] | Response":
        """The request's images decoded within the slot's budget (service.decoding), or the error.
        Small requests (bytes and canvas) stay on the event loop; anything else, header reading
        included (Pillow parses chunks and markers in Python), runs in the decode pool."""
        budget, blobs = slot.budget, [u.data for u in uploads]
        capacity = DECODE_QUEUE_REQUESTS * budget.request_pixels
        small = sum(map(len, blobs)) <= INLINE_BYTES
        headers = budget.headers(blobs) if small else await self._in_pool(lambda _: budget.headers(blobs), 0, capacity)
        if isinstance(headers, Response):
            return headers
        errors = [_image_error(u, h) for u, h in zip(uploads, headers) if isinstance(h, ImageError)]
        if errors:
            return _errors_response(errors, len(uploads))
        refusal = _over_budget(budget, headers, capacity)
        if refusal is not None:
            return refusal
        if small and canvas_pixels(headers) <= INLINE_PIXELS:
            arrays, errors = self._decode(uploads, slot.spec, budget)  # cheaper than a thread hop
        else:
            done = await self._in_pool(functools.partial(self._decode, uploads, slot.spec, budget),
                                       decode_cost(headers), capacity)
            if isinstance(done, Response):
                return done
            arrays, errors = done
        return _errors_response(errors, len(uploads)) if errors else arrays

    async def _in_pool(self, work: Any, cost: int, capacity: int) -> Any:
        try:
            return await self._pool().run(work, cost, capacity)
        except DecodeBusy as err:  # 429, not 503: the senders of large images are the ones to slow down
            return error_response(429, f"this worker is busy decoding large images ({err}); retry later or "
                                  "send smaller images", "decode_busy", headers={"Retry-After": "1"})

    def _pool(self) -> DecodePool:
        if self._decode_pool is None:
            self._decode_pool = DecodePool(max(1, CONFIG.cpu_count // max(1, CONFIG.workers)))
        return self._decode_pool

    async def _infer(self, batch: np.ndarray, slot: Optional[Slot] = None) -> "np.ndarray | Response":
        slot = slot or self._slot
        step = CONFIG.max_batch_size
        chunks = [batch[i:i + step] for i in range(0, len(batch), step)]
        started = time.perf_counter()
        try:
            parts = await asyncio.gather(*(slot.batcher.submit(chunk) for chunk in chunks))
        except Overloaded as err:
            return error_response(
                503, f"the model server is overloaded ({err}; CLASSIFIER_MAX_LATENCY_MS={CONFIG.max_latency_ms}); "
                "retry later", "overloaded", headers={"Retry-After": "1"})
        except ModelStuck as err:
            return _stuck_response(str(err))
        MODEL_SECONDS.labels(model="champion").observe(time.perf_counter() - started)
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), np.float32)

    async def _classify(self, uploads: Any, top_k: Any, slot: Optional[Slot] = None) -> Any:
        slot = slot or self._slot
        if isinstance(uploads, Rejection):
            return uploads.response()
        if isinstance(top_k, Rejection):
            return top_k.response()
        if len(uploads) > CONFIG.max_images:
            return _too_many(len(uploads)).response()
        spec = slot.spec
        arrays = await self._decode_request(uploads, slot)
        if isinstance(arrays, Response):
            return arrays
        batch = normalize(np.stack(arrays), spec.mean, spec.std)
        logits = await self._infer(batch, slot)
        if isinstance(logits, Response):
            return logits
        if self.shadow is not None:
            self.shadow.offer(batch, logits)
        k = top_k if isinstance(top_k, int) else CONFIG.top_k
        return predictions(logits, spec.classes, k)

    async def _answer(self, images: Any, top_k: Any) -> Any:
        if self.stuck is not None:
            return _stuck_response(self.stuck)
        slot = self._slot  # this request's model, whatever a swap does meanwhile
        slot.users += 1
        try:
            return _ready_response(await self._classify(images, top_k, slot), slot)
        finally:
            slot.users -= 1

    @bentoml.api(route="/classify", input_spec=ClassifyMultipart)
    async def classify(self, images: Any, top_k: Any = None) -> list[Prediction]:
        """Classify images sent as ``multipart/form-data`` files in the repeatable field ``images``.

        Returns one prediction per image, in request order: ``label``, ``index``, ``score`` (softmax
        probability) and ``top_k`` (the k most probable classes; k from the ``top_k`` form field or
        ``CLASSIFIER_TOP_K``). The ``X-Model-Version`` header names the registry version that answered.
        """
        return await self._answer(images, top_k)

    @bentoml.api(route="/classify_base64", input_spec=ClassifyBase64)
    async def classify_base64(self, images: Any, top_k: Any = None) -> list[Prediction]:
        """Classify base64-encoded images sent as JSON ``{"images": ["<base64>", ...], "top_k": 5}``.

        Same response as ``/classify``; items that fail are named ``images[i]`` in errors.
        """
        return await self._answer(images, top_k)

    @bentoml.api(route="/metadata", input_spec=NoInput)
    async def metadata(self) -> dict:
        """The model served (store tag, registry version, MLflow run, classes, input shape,
        normalization, active execution providers), the alias it follows and when it was loaded, the
        last registry check, refusals, shadow statistics, batching and request limits (also ``GET /metadata``)."""
        return self.metadata_dict()

    def metadata_dict(self) -> dict:
        description = self._slot.description
        serving = self.follower.status if self.follower else {"alias": None, "model_tag": description.get("model_tag")}
        return {
            **description,
            "registry_alias": getattr(self.selection, "alias", None),
            "pinned_by": getattr(self.selection, "pinned_by", None),
            "serving": serving,
            "shadow": self._shadow_status(),
            "execution_providers": description.get("active_providers"),
            "limits": {
                "max_images": CONFIG.max_images,
                "max_request_bytes": CONFIG.max_request_bytes,
                "max_image_pixels": self._slot.budget.image_pixels,
                "max_request_pixels": self._slot.budget.request_pixels,
                "jpeg_draft_to": self._slot.budget.draft_to,
                "model_stall_s": CONFIG.model_stall_s,
                "max_concurrency": CONFIG.max_concurrency,
                "request_timeout_s": CONFIG.request_timeout_s,
                "body_timeout_s": CONFIG.body_timeout_s,
            },
            "top_k_default": CONFIG.top_k,
        }

    def _shadow_status(self) -> Optional[dict]:
        if self.shadow is None or self.shadow_follower is None:
            return None
        model = getattr(self.shadow, "description", None) or {}
        return {**self.shadow.status, "alias": CONFIG.shadow_alias, "model_tag": model.get("model_tag"),
                "registry_version": model.get("registry_version"), "follow": self.shadow_follower.status}


def _image_error(upload: Upload, err: ImageError) -> dict:
    return {"index": upload.index, "file": upload.name, "reason": err.reason, "status": err.status, "error": err.message}


def _errors_response(errors: list[dict], count: int) -> Response:
    """One answer for a request with bad images: the first one's status and reason, every entry listed."""
    first = errors[0]
    summary = "1 image" if len(errors) == 1 else f"{len(errors)} of {count} images"
    return error_response(first["status"], f"{summary} could not be used; first: {first['file']}: {first['error']}",
                          first["reason"], file=first["file"], index=first["index"], errors=errors)


def _over_budget(budget: DecodeBudget, headers: list, capacity: int) -> Optional[Response]:
    """413 when the request's images decode to more pixels than a request may, or would take longer
    to decode than the whole decode queue holds (huge JPEG canvases: their decode cost follows the
    canvas, not the reduced size)."""
    total = budget.over_request_budget(headers)
    if total:
        return error_response(413, f"the request's images decode to {total} pixels, more than the limit of "
                              f"{budget.request_pixels} per request (CLASSIFIER_MAX_REQUEST_PIXELS); split it",
                              "too_many_pixels", limit=budget.request_pixels)
    cost = decode_cost(headers)
    if cost > capacity:
        return error_response(413, f"the request's images would cost {cost} pixel-equivalents to decode, more than "
                              f"the limit of {capacity}; split it or send smaller images", "too_many_pixels",
                              limit=capacity)
    return None


def _exit_stuck() -> None:
    """Leave at once (a stuck thread would block a clean exit), telling Prometheus' multiprocess
    collector first that this process' live gauges are gone (BentoML does it in a __del__)."""
    mark_metrics_process_dead()
    os._exit(EXIT_MODEL_STUCK)


def _stuck_response(why: str) -> Response:
    return error_response(503, f"the model is not answering: {why}; retry on another worker", "model_stuck",
                          headers={"Retry-After": "5"})


def _record_shadow(outcome: str, images: int, seconds: Optional[float]) -> None:
    SHADOW_IMAGES.labels(outcome=outcome).inc(images)
    if seconds is not None:
        MODEL_SECONDS.labels(model="shadow").observe(seconds)


if CONFIG.refusal_rate > 0:  # outside BentoML's layers: a held-back request holds no concurrency slot
    patch_outermost_middleware(
        PenaltyBoxMiddleware, penalty=RefusalPenalty(CONFIG.refusal_rate, CONFIG.refusal_burst,
                                                     CONFIG.refusal_max_delay_s),
        exempt=PROBE_PATHS, on_delay=PENALTY_DELAYS.observe)
Classifier.add_asgi_middleware(JsonErrorsMiddleware)  # routing's 404/405 and BentoML's errors in the API's shape
Classifier.add_asgi_middleware(RequestSizeLimitMiddleware, max_bytes=CONFIG.max_request_bytes,
                               body_timeout_s=CONFIG.body_timeout_s)
Classifier.add_asgi_middleware(CancelOnDisconnectMiddleware)  # a gone client's decoding and model work is dropped
if CONFIG.workers > 1:  # spread keep-alive connections over the workers (see the middleware)
    Classifier.add_asgi_middleware(ConnectionRecycleMiddleware, every=CONFIG.keepalive_requests)
Classifier.add_asgi_middleware(ServerTimingMiddleware)  # Server-Timing: app;dur=<ms> (shown by /ui)


class PredictionsResponse(JSONResponse):
    """JSON by orjson: the same values as Starlette's compact ``json.dumps`` (UTF-8, shortest round-trip
    floats, key order kept), ~6 -> ~1 us per prediction with top_k 5 (bench/serve_phases.py)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _ready_response(result: Any, slot: Slot) -> Any:
    """Predictions as a ready JSON response naming the model that answered: BentoML would otherwise
    rebuild the output type's JSON schema (to pick a media type) and validate every item with
    pydantic on each request, about 30% of the public process' CPU for single-image requests
    (bench/serve.py --profile)."""
    return PredictionsResponse(result, headers=slot.headers) if isinstance(result, list) else result


patch_media_types(Classifier)  # each API's response media type computed once, not per response

#: paths with their own /metrics label; any other path is counted as `other` (service.patches)
SERVED_PATHS = frozenset({*(api.route for api in Classifier.apis.values()), *(r.path for r in _metadata_app.routes),
                          "/", "/docs", "/docs.json", "/schema.json", "/metrics", "/livez", "/readyz", "/healthz"})
patch_metrics_paths(SERVED_PATHS.__contains__)
