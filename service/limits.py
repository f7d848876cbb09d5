"""Pure-ASGI middleware: a request-body size limit (BentoML has none; over it -> 413 with a JSON
body), connection recycling (``ConnectionRecycleMiddleware``), cancelling the work of requests whose
client has gone (``CancelOnDisconnectMiddleware``) and one JSON shape for every error response
(``JsonErrorsMiddleware``).

A ``Content-Length`` over the limit is refused before the body is read. A body without a length
(chunked upload) is counted as it streams; once it passes the limit the application's own response
(it sees a failed read) is replaced by the 413.
"""
from __future__ import annotations

import asyncio
import json
import random
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["CancelOnDisconnectMiddleware", "ConnectionRecycleMiddleware", "JsonErrorsMiddleware",
           "RequestSizeLimitMiddleware", "error_response", "json_error_body", "send_json"]


def json_error_body(status: int, error: str, reason: str, **extra: Any) -> bytes:
    """The API's one error shape, ``{"error", "reason", "status", ...extra}``, as compact JSON: every
    error answer of the service, its middleware and its BentoML patches is built here."""
    return json.dumps({"error": error, "reason": reason, "status": status, **extra}, separators=(",", ":")).encode()


async def send_json(send: Send, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """A whole JSON response (``json_error_body``'s bytes) sent straight through ASGI, for the
    middleware that answers without reaching the application."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def error_response(status: int, error: str, reason: str, headers: dict | None = None, **extra: Any) -> Any:
    """``json_error_body`` as a Starlette response (imported here only: the middleware is pure ASGI)."""
    from starlette.responses import Response

    return Response(json_error_body(status, error, reason, **extra), status_code=status, headers=headers,
                    media_type="application/json")


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


#: every byte received extends a body's deadline by 1/this many seconds: a 10 MB photo over a
#: 5 Mbit/s uplink (~16 s) is fine, a slowloris byte a second gains nothing
MIN_BODY_BYTES_PER_S = 32 * 1024


class RequestSizeLimitMiddleware:
    """413 for a body over ``max_bytes``; 408 for one still incomplete ``body_timeout_s`` after the
    request began, plus 1 s per ``min_rate`` bytes received (a slowloris client sending a byte a second would otherwise hold one of the
    worker's CLASSIFIER_MAX_CONCURRENCY slots until the request timeout, and get a 504 for it)."""

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout_s: float = 10.0,
                 min_rate: float = MIN_BODY_BYTES_PER_S) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.body_timeout_s = float(body_timeout_s)
        self.min_rate = float(min_rate)

    async def _reply(self, send: Send, status: int, body: bytes) -> None:
        await send_json(send, status, body, ((b"connection", b"close"),))

    def _too_large(self, length: int | None = None) -> bytes:
        detail = f"request body of {length} bytes" if length is not None else "request body"
        return json_error_body(
            413,
            f"{detail} is larger than the limit of {self.max_bytes} bytes",
            "body_too_large",
            limit_bytes=self.max_bytes,
        )

    def _length_refusal(self, scope: Scope) -> tuple[int, bytes] | None:
        """(status, body) of a 400/413 decided by the Content-Length header alone, before any body is read."""
        header = next((value for name, value in scope.get("headers", []) if name == b"content-length"), None)
        if header is None:
            return None
        try:
            length = int(header)
            if length < 0:
                raise ValueError
        except ValueError:
            return 400, json_error_body(400, "invalid Content-Length header", "bad_request")
        return (413, self._too_large(length)) if length > self.max_bytes else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._length_refusal(scope)
        if refusal is not None:
            await self._reply(send, *refusal)
            return
        received = 0
        exceeded: tuple[int, bytes] | None = None  # (status, body) of the answer that replaces the app's
        response_started = False
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded, body_done
            if body_done:  # later reads wait for a disconnect: no deadline
                return await receive()
            remaining = deadline + received / self.min_rate - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, remaining))
            except asyncio.TimeoutError:
                exceeded = 408, self._too_slow(received)
                raise BodyTooSlow() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    exceeded = 413, self._too_large()
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:  # drop whatever the app answers to its failed read; the 413 goes out instead
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except (BodyTooLarge, BodyTooSlow):
            pass
        if exceeded is not None and not response_started:
            await self._reply(send, *exceeded)

    def _too_slow(self, received: int) -> bytes:
        return json_error_body(408, f"the request body was not complete {self.body_timeout_s:g} s after the request "
                               f"began ({received} bytes arrived; CLASSIFIER_BODY_TIMEOUT_S)", "body_timeout",
                               limit_s=self.body_timeout_s)


class ConnectionRecycleMiddleware:
    """Ask HTTP/1.1 clients to reconnect now and then (``Connection: close`` on ~1 in ``every`` responses).

    The workers share one listening socket and the worker that wakes first accepts every pending
    connection, so a client opening its keep-alive connections in a burst (a load balancer's pool,
    ``wrk``) can pin them all on one worker while the others idle (BentoML issue #5426). A closed
    connection is re-opened by the client, and the reconnect is accepted by whichever worker is
    waiting for work: the load spreads within a few ``every`` requests per connection. nginx does the
    same for its upstreams (``keepalive_requests``). A reconnect costs one local TCP handshake.
    """

    def __init__(self, app: ASGIApp, every: int, rng: Callable[[], float] | None = None) -> None:
        self.app = app
        self.chance = 1.0 / every if every > 0 else 0.0
        self.rng = rng or random.random

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.chance or scope.get("http_version") == "2":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.rng() < self.chance:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


class CancelOnDisconnectMiddleware:
    """Stop working on a request whose client has gone.

    ASGI servers report a closed connection only to an application that calls ``receive()`` again
    after the body; a handler that is decoding or waiting for the model never does, so without this
    it finishes work nobody will read (measured: decoding went on for 30-50 s after flooding clients
    gave up). Once the body has been read, a listener waits for ``http.disconnect`` and cancels the
    handler; the cancellation reaches the decode pool and the micro-batcher, which drop the work.
    An application that itself calls ``receive()`` after the body gets what the listener got.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        listener: asyncio.Future | None = None

        async def wrapped_receive() -> Message:
            nonlocal listener
            if listener is not None:
                return await asyncio.shield(listener)
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                listener = asyncio.ensure_future(receive())
                listener.add_done_callback(lambda done: answered or _cancel_on_disconnect(done, handler))
            return message

        answered = False  # once the response is complete, a "disconnect" is just the end of the exchange

        async def watched_send(message: Message) -> None:
            nonlocal answered
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True

        handler = asyncio.ensure_future(self.app(scope, wrapped_receive, watched_send))
        try:
            await asyncio.shield(handler)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # we were cancelled (the server's timeout)
                handler.cancel()
                raise
            # else the client went away and the listener cancelled the handler: nobody to answer
        finally:
            if listener is not None and not listener.done():
                listener.cancel()


def _cancel_on_disconnect(listener: asyncio.Future, handler: asyncio.Future) -> None:
    if listener.cancelled() or listener.exception() is not None:
        return
    if listener.result().get("type") == "http.disconnect" and not handler.done():
        handler.cancel()


#: reason codes for error responses the application did not shape itself (routing, BentoML)
DEFAULT_REASONS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
                   415: "unsupported_media_type", 429: "too_many_requests", 503: "unavailable", 504: "timeout"}


class JsonErrorsMiddleware:
    """Every error response in the API's JSON shape (``error``, ``reason``, ``status``).

    Routing's plain-text 404/405 and BentoML's ``{"error": ...}`` bodies are rewritten (they are
    small: only error bodies are buffered); responses that already carry a ``reason`` pass as they are.
    """

    def __init__(self, app: ASGIApp, max_body: int = 64 * 1024) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def shaping_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await _send_shaped(send, start, b"".join(chunks), self.max_body)

        await self.app(scope, receive, shaping_send)


async def _send_shaped(send: Send, start: Message, body: bytes, max_body: int) -> None:
    status = start["status"]
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
    content_type = dict(start.get("headers", [])).get(b"content-type", b"")
    if content_type.startswith(b"application/json") and b'"reason"' in body[:max_body]:
        await send(start)  # the API's own error (the common case): as it is
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return
    try:
        parsed = json.loads(body) if len(body) <= max_body else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "reason" in parsed:
        shaped = body
    else:
        message = parsed.get("error") or parsed.get("detail") if isinstance(parsed, dict) else None
        text = str(message or body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}")
        shaped = json_error_body(status, text, DEFAULT_REASONS.get(status, "internal_error" if status >= 500 else "bad_request"))
    await send({**start, "headers": [*headers, (b"content-type", b"application/json"),
                                      (b"content-length", str(len(shaped)).encode())]})
    await send({"type": "http.response.body", "body": shaped, "more_body": False})
