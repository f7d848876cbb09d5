"""A penalty box for clients whose requests keep being refused.

Refusing a crafted request is cheap but not free: ~1-3 ms of CPU through the Python HTTP stack
(uvicorn, BentoML's metrics, access-log, timeout and concurrency layers, ours). A client that sends
bombs back to back on many connections turns those milliseconds into a saturated worker, and the
loop then serves everyone in arrival order: ordinary p99 went 10.5 -> 73 ms (bench/abuse.py, flood).
The answer nginx (``limit_req ... delay``) and fail2ban give is the one used here: slow the client
down, not the service.

Policy (per worker; ``RefusalPenalty``, a GCRA "virtual scheduling" meter per client address):

- every answer in 400-499 except 429 (a full worker is not the client's fault), and every request
  whose client left before it was answered, costs its client one refusal;
- a client may have ``burst`` refusals outstanding, and they drain at ``rate`` per second: within
  that, nothing changes (a user correcting a bad upload never notices);
- beyond it, each of that client's new requests waits ``(debt - burst) / rate`` seconds, at most
  ``max_delay_s``, *before* the application sees it. The wait holds no concurrency slot and reads no
  body, so a flooding client's connections do at most one request per ``max_delay_s`` each, and its
  refusals stop costing the worker CPU;
- requests that are answered normally cost nothing, so a penalised address's good requests are only
  slowed, never refused, and other addresses are untouched;
- probe and metrics paths (``exempt``) are never delayed.

The client address is ASGI's ``scope["client"]``: uvicorn rewrites it from ``X-Forwarded-For`` for
proxies listed in ``FORWARDED_ALLOW_IPS`` (default 127.0.0.1), so behind an ingress on another host
set that, or every client shares the ingress's address. At most ``max_clients`` addresses are
tracked (oldest forgotten first): memory is bounded whatever the number of addresses.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Collection, Optional

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

__all__ = ["PenaltyBoxMiddleware", "RefusalPenalty", "is_refusal"]


def is_refusal(status: Optional[int]) -> bool:
    """A refusal is the client's doing: a 4xx other than 429, or no answer at all (it left)."""
    return status is None or (400 <= status < 500 and status != 429)


class RefusalPenalty:
    """Per-address refusal meter. ``delay(addr)``: seconds a new request waits; ``refused(addr)``: count one."""

    def __init__(self, rate: float, burst: int, max_delay_s: float, max_clients: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / rate  # seconds one refusal takes to drain
        self.tolerance = burst * self.interval  # debt (seconds) allowed before any delay
        self.max_delay_s = float(max_delay_s)
        self.max_clients = int(max_clients)
        self.clock = clock
        self._due: OrderedDict[str, float] = OrderedDict()  # addr -> time its debt has drained (GCRA's TAT)

    def _debt(self, addr: str, now: float) -> float:
        due = self._due.get(addr)
        if due is None or due <= now:
            self._due.pop(addr, None)  # drained: forget the address
            return 0.0
        return due - now

    def delay(self, addr: str) -> float:
        wait = self._debt(addr, self.clock()) - self.tolerance
        return min(self.max_delay_s, wait) if wait > 1e-3 else 0.0  # under a ms: float noise, not a penalty

    def refused(self, addr: str) -> None:
        now = self.clock()
        # the debt never grows past what the longest delay can work off: a client that stops
        # flooding is back to normal within tolerance + max_delay_s seconds
        debt = min(self._debt(addr, now) + self.interval, self.tolerance + self.max_delay_s + self.interval)
        self._due[addr] = now + debt
        self._due.move_to_end(addr)
        while len(self._due) > self.max_clients:
            self._due.popitem(last=False)

    def __len__(self) -> int:
        return len(self._due)


class PenaltyBoxMiddleware:
    """Outermost ASGI layer applying ``RefusalPenalty`` (see the module's docstring)."""

    def __init__(self, app: ASGIApp, penalty: RefusalPenalty, exempt: Collection[str] = (),
                 on_delay: Callable[[float], None] | None = None) -> None:
        self.app = app
        self.penalty = penalty
        self.exempt = frozenset(exempt)
        self.on_delay = on_delay

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        client = scope.get("client")
        if scope["type"] != "http" or not client or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        addr = str(client[0])
        wait = self.penalty.delay(addr)
        if wait > 0:
            if self.on_delay is not None:
                self.on_delay(wait)
            await asyncio.sleep(wait)
        status: list[int] = []

        async def send_noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, send_noting_status)
        except Exception:  # a server error is not the client's doing (a cancellation, its leaving, is)
            failed = not status
            raise
        finally:
            if not failed and is_refusal(status[0] if status else None):
                self.penalty.refused(addr)
