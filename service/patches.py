"""A fix for one BentoML 1.4 defect that costs this service its tail latency.

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
import logging
from typing import Any

from starlette.responses import JSONResponse

logger = logging.getLogger("bentoml.classifier")


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
    try:
        await waiter
    except asyncio.TimeoutError:
        if task.cancel():
            await JSONResponse(
                {"error": f"not able to process the request in {self.timeout:g} s (CLASSIFIER_REQUEST_TIMEOUT_S)",
                 "reason": "timeout", "status": 504}, status_code=504)(scope, receive, send)
    else:
        await task
    finally:
        timer.cancel()


def patch_timeout_middleware() -> bool:
    """Install the fix; False (and a warning) when BentoML's middleware is not the one it fixes."""
    try:
        from bentoml._internal.server.http.traffic import TimeoutMiddleware
    except ImportError:
        TimeoutMiddleware = None
    if TimeoutMiddleware is None or not hasattr(TimeoutMiddleware, "_set_timer_out"):
        logger.warning("BentoML's TimeoutMiddleware changed; its per-request timers are left as they are")
        return False
    TimeoutMiddleware.__call__ = _timeout_call
    return True
