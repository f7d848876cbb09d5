"""Fixes for BentoML 1.4 defects, each checked against the class it was written for (1.4.x).

1. ``TimeoutMiddleware``'s timers (tail latency, below).
2. ``RunnerTrafficMetricsMiddleware`` labels its metrics with the raw request path, so every random
   URL a scanner tries becomes a new Prometheus series that lives until the worker restarts (100,000
   probes -> 300,000 series, a /metrics answer of tens of MB). ``patch_metrics_paths`` maps paths the
   service does not serve to one label, ``other``.
3. ``MaxConcurrencyMiddleware`` answers 429 with ``{"error": "Too many requests"}`` and no
   ``Retry-After``; ``patch_concurrency_limit`` answers in the API's error shape with ``Retry-After``.
4. ``AccessLogMiddleware`` decodes the request's ``Content-Type``/``Content-Length`` as UTF-8 after
   the response headers went out, so one ``\xff`` byte in them cut every response off with an empty
   body and a traceback (found by tests/service/test_service_fuzz.py). ``patch_access_log`` hands it
   those two headers with non-ASCII bytes escaped (``\xff``); they are invalid either way.
5. ``Service.add_asgi_middleware`` can only add layers inside BentoML's own, so a request a layer
   of ours delays would hold a concurrency slot; ``patch_outermost_middleware`` puts one outside.
6. BentoML derives each API's response media type from its output's JSON schema, regenerated on
   every response unless ``media_type`` is set; ``patch_media_types`` computes it once.
7. A worker that exits without BentoML's ``__del__`` leaves its live Prometheus gauges counted;
   ``mark_metrics_process_dead`` tells the multiprocess collector first.

Each is written against BentoML ``TESTED_BENTOML`` and listed in ``WORKAROUNDS`` with its upstream
report; ``check_bentoml_version`` warns at start-up when another minor release is installed, and
each patch checks the class it replaces and leaves it alone (with a warning) when it changed.
Elsewhere: ``service.limits.ConnectionRecycleMiddleware`` (BentoML #5426).

The first, in detail:

``bentoml._internal.server.http.traffic.TimeoutMiddleware`` (added for ``traffic.timeout``, which
BentoML requires to be > 0) schedules ``loop.call_later(timeout, ...)`` for every request and never
cancels it. The timer keeps the request's waiter future and its ``contextvars`` context (with the
OpenTelemetry span) alive for the whole timeout: at 1,500 requests/s and a 30 s timeout that is
~45,000 requests' worth of objects, and each of Python's full cyclic-GC collections walked all of
them, stalling the event loop 40-90 ms every second or two (measured with ``gc.callbacks``; p99 at
concurrency 32 went from ~110 ms to ~30 ms with the collections gone).

``patch_timeout_middleware`` replaces its ``__call__`` with the same logic that cancels the timer
when the request is done, and answers a timeout with this service's JSON error shape. It only
patches the class it was written against (checked by its attributes) and says so in the log
otherwise.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
from typing import Any, Callable

from .limits import error_response

logger = logging.getLogger("bentoml.classifier")

#: the BentoML release these workarounds were written and tested against (pyproject: bentoml>=1.4,<1.5)
TESTED_BENTOML = "1.4.40"
#: workaround -> its upstream report ("not filed": none found in BentoML's issues on 2026-12-01)
WORKAROUNDS = {
    "patch_timeout_middleware": "not filed",
    "patch_metrics_paths": "not filed (the usual fix: label by route template, `other` for unmatched)",
    "patch_concurrency_limit": "not filed",
    "patch_access_log": "not filed",
    "patch_outermost_middleware": "not filed (a missing feature: outer middleware)",
    "patch_media_types": "not filed",
    "mark_metrics_process_dead": "not filed",
    "service.limits.ConnectionRecycleMiddleware": "https://github.com/bentoml/BentoML/issues/5426",
}


def check_bentoml_version(installed: str | None = None) -> bool:
    """False, and a warning naming the workarounds, when BentoML's minor release is not TESTED_BENTOML's."""
    if installed is None:
        import bentoml

        installed = bentoml.__version__
    if installed.split(".")[:2] == TESTED_BENTOML.split(".")[:2]:
        return True
    logger.warning("BentoML %s is installed; service/patches.py's workarounds (%s) were written for %s: check "
                   "that each is still needed and still fits", installed, ", ".join(WORKAROUNDS), TESTED_BENTOML)
    return False


async def _timeout_call(self: Any, scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()  # done when the response starts, or failed at the timeout
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def send_started(message: Any) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    task = asyncio.ensure_future(self.app(scope, receive, send_started))
    # an app that returns without answering (its client left) or raises ends the wait too
    task.add_done_callback(lambda _: waiter.done() or waiter.set_result(None))
    try:
        await waiter
    except asyncio.TimeoutError:
        if task.done():
            task.result()  # it ended just as the timer fired: its own outcome (or exception) stands
        elif task.cancel():
            await error_response(504, f"not able to process the request in {self.timeout:g} s "
                                 "(CLASSIFIER_REQUEST_TIMEOUT_S)", "timeout")(scope, receive, send)
    else:
        await task
    finally:
        timer.cancel()


def _bentoml_class(module: str, name: str) -> Any:
    """A BentoML internal class, or None where this BentoML version has none."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def patch_timeout_middleware() -> bool:
    """Install the fix; False (and a warning) when BentoML's middleware is not the one it fixes."""
    TimeoutMiddleware = _bentoml_class("bentoml._internal.server.http.traffic", "TimeoutMiddleware")
    if TimeoutMiddleware is None or not hasattr(TimeoutMiddleware, "_set_timer_out"):
        logger.warning("BentoML's TimeoutMiddleware changed; its per-request timers are left as they are")
        return False
    TimeoutMiddleware.__call__ = _timeout_call
    return True


#: the metrics label of every path the service does not serve
OTHER_PATH = "other"
_REAL_PATH = "classifier.real_path"


class _RestorePath:
    """Inside the metrics middleware: hand the application the request's real path back."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if _REAL_PATH in scope:
            scope = {**scope, "path": scope[_REAL_PATH]}
        await self.app(scope, receive, send)


def patch_metrics_paths(known: Callable[[str], bool]) -> bool:
    """Label requests whose path is not ``known(path)`` as ``other`` in BentoML's traffic metrics."""
    Metrics = _bentoml_class("bentoml._internal.server.http.instruments", "RunnerTrafficMetricsMiddleware")
    original = getattr(Metrics, "__call__", None)
    if Metrics is None or getattr(original, "_classifier_patched", False):
        return Metrics is not None
    if not hasattr(Metrics, "_setup"):
        logger.warning("BentoML's RunnerTrafficMetricsMiddleware changed; its path labels are left as they are")
        return False

    async def call(self: Any, scope: dict, receive: Any, send: Any) -> None:
        if not isinstance(self.app, _RestorePath):
            self.app = _RestorePath(self.app)
        path = scope.get("path", "")
        if scope.get("type") in ("http", "websocket") and not known(path):
            scope = {**scope, "path": OTHER_PATH, _REAL_PATH: path}
        await original(self, scope, receive, send)

    call._classifier_patched = True  # type: ignore[attr-defined]
    Metrics.__call__ = call
    return True


def patch_concurrency_limit(retry_after_s: int = 1) -> bool:
    """Answer BentoML's per-worker concurrency limit with the API's JSON error and ``Retry-After``."""
    Limit = _bentoml_class("bentoml._internal.server.http.traffic", "MaxConcurrencyMiddleware")
    if Limit is None or not hasattr(Limit, "BYPASS_PATHS"):
        logger.warning("BentoML's MaxConcurrencyMiddleware changed; its 429 answer is left as it is")
        return False

    async def call(self: Any, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.skip_paths:
            return await self.app(scope, receive, send)
        if self._semaphore.locked():
            await error_response(429, "too many requests in flight on this worker (CLASSIFIER_MAX_CONCURRENCY); "
                                 "retry later", "too_many_requests",
                                 headers={"Retry-After": str(retry_after_s)})(scope, receive, send)
            return
        async with self._semaphore:
            await self.app(scope, receive, send)

    Limit.__call__ = call
    return True


_LOGGED_HEADERS = (b"content-type", b"content-length")


def _ascii_headers(headers: list) -> list:
    return [(k, v.decode("latin-1").encode("ascii", "backslashreplace")) if k in _LOGGED_HEADERS and not v.isascii()
            else (k, v) for k, v in headers]


def patch_access_log() -> bool:
    """Escape non-ASCII bytes of Content-Type/Content-Length before BentoML's access log decodes them."""
    Access = _bentoml_class("bentoml._internal.server.http.access", "AccessLogMiddleware")
    original = getattr(Access, "__call__", None)
    if Access is None or getattr(original, "_classifier_patched", False):
        return Access is not None

    async def call(self: Any, scope: dict, receive: Any, send: Any) -> None:
        headers = scope.get("headers") or []
        if any(k in _LOGGED_HEADERS and not v.isascii() for k, v in headers):
            scope = {**scope, "headers": _ascii_headers(headers)}
        await original(self, scope, receive, send)

    call._classifier_patched = True  # type: ignore[attr-defined]
    Access.__call__ = call
    return True


def patch_outermost_middleware(middleware: type, **options: Any) -> bool:
    """Put ``middleware`` outside all of BentoML's own layers (``add_asgi_middleware`` puts it inside
    metrics, tracing, access log, timeout and the concurrency limit)."""
    Factory = _bentoml_class("_bentoml_impl.server.app", "ServiceAppFactory")
    prop = getattr(Factory, "middlewares", None)
    if Factory is None or not isinstance(prop, property):
        logger.warning("BentoML's ServiceAppFactory changed; %s is not installed", middleware.__name__)
        return False
    from starlette.middleware import Middleware

    def middlewares(self: Any) -> list:
        return [Middleware(middleware, **options),
                *(m for m in prop.fget(self) if m.cls is not middleware)]

    Factory.middlewares = property(middlewares)
    return True


def patch_media_types(*services: Any) -> None:
    """Compute each API's response media type once (item 6 above)."""
    for svc in services:
        for method in svc.apis.values():
            spec = method.output_spec
            if getattr(spec, "media_type", None) is None:
                spec.media_type = spec.mime_type()


def mark_metrics_process_dead() -> None:
    """Before ``os._exit``: this process' live gauges are gone (item 7; BentoML does it in a ``__del__``)."""
    try:
        container = _bentoml_class("bentoml._internal.container", "BentoMLContainer")
        container.metrics_client.get().mark_process_dead()
    except Exception:  # best effort: the exit matters more
        logger.exception("could not mark this worker's metrics dead")
