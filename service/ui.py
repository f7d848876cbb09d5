"""The browser page at ``GET /ui`` and the ``Server-Timing`` response header it reads.

The page is one static file, ``service/static/ui.html`` (plain HTML + CSS + JavaScript, nothing
fetched from elsewhere, so it works offline); ``bentofile.yaml`` ships it (``include: service/static/*``).
It calls the service's own ``GET /metadata`` and ``POST /classify`` with relative URLs.

``ServerTimingMiddleware`` adds ``Server-Timing: app;dur=<ms>`` to every HTTP response: the time
from the request entering the service's innermost middleware to the response headers (for
``/classify``: reading the body, decoding, preprocessing, the model call). The page shows it next
to the latency it measures itself.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from .limits import error_response

STATIC_DIR = Path(__file__).resolve().parent / "static"
UI_FILE = STATIC_DIR / "ui.html"

# the page is self-contained: inline style/script only, it talks to this origin only
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'self'"
    ),
}


async def ui_page(request: Request) -> Response:
    try:
        html = UI_FILE.read_text(encoding="utf-8")
    except OSError as err:  # a Bento built without `service/static/*` in bentofile.yaml's include
        return error_response(404, f"the web page is not installed ({UI_FILE.name}: {err.strerror or err})",
                              "ui_missing")
    return HTMLResponse(html, headers=_HEADERS)


def ui_routes() -> list[Route]:
    """``GET /ui`` and ``GET /ui/`` (HEAD too), to mount next to the service's other plain routes."""
    return [
        Route("/ui", ui_page, methods=["GET"]),
        Route("/ui/", ui_page, methods=["GET"]),
    ]


Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ServerTimingMiddleware:
    """Pure ASGI: ``Server-Timing: app;dur=<ms>`` on each HTTP response (W3C Server Timing)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - started) * 1000.0
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", f"app;dur={ms:.1f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)
