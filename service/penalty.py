"""A penalty box for client addresses whose requests keep being refused.

Refusing a crafted request is cheap but not free: ~1-3 ms of CPU through the Python HTTP stack
(uvicorn, BentoML's metrics, access-log, timeout and concurrency layers, ours). A client that sends
bombs back to back on many connections turns those milliseconds into a saturated worker, and the
loop then serves everyone in arrival order: ordinary p99 went 8 -> 64 ms (bench/abuse.py, flood; 22 ms with the box).
The answer nginx (``limit_req ... delay``) and fail2ban give is the one used here: slow the client
down, not the service.

Policy (per worker; ``RefusalPenalty``, a GCRA "virtual scheduling" meter per client address):

- every answer in 400-499 except 429 (a full worker is not the client's fault), and every request
  whose client left before it was answered, costs its address one refusal; a normal answer costs
  nothing;
- an address may have ``burst`` refusals outstanding, and they drain at ``rate`` per second: within
  that, nothing changes (a user correcting a bad upload never notices);
- beyond it the address waits ``(debt - burst) / rate`` seconds, at most ``max_delay_s``:
  - its **refusals are answered late** (the answer is held after the application is done with it,
    outside BentoML's concurrency limit), so a client that waits for its answers, on however many
    connections, gets at most one refusal per connection every ``max_delay_s``;
  - an address whose recent refusals outnumber its normal answers (both counted with a decay of
    ``GRACE_S``: an abuser, not a proxy or NAT shared with real users; an abuser that mixes in a few
    valid requests is still one) also has its new requests held **before** they are read, so a client
    that does not wait for answers (fire and close) is slowed too, and at most ``MAX_HELD`` of its
    requests wait at once; more get 429 with ``Retry-After`` and ``Connection: close`` at once,
    without reaching the application;
- an address that gets at least as many normal answers as refusals (many users behind one proxy)
  never has a good request delayed: only its refusals come late;
- probe and metrics paths (``exempt``) are neither counted nor delayed.

The address is ASGI's ``scope["client"]``, an IPv6 client's /64 (one subscriber's whole prefix):
uvicorn rewrites it from ``X-Forwarded-For`` for the proxies listed in ``FORWARDED_ALLOW_IPS``
(default ``127.0.0.1,::1``), so behind an ingress on another host list it there. At most ``max_clients``
addresses are tracked (oldest forgotten first): memory is bounded whatever the number of addresses.
"""
from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Collection, Optional

from .limits import json_error_body, send_json

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

__all__ = ["GRACE_S", "PenaltyBoxMiddleware", "RefusalPenalty", "client_key", "is_refusal"]

#: seconds over which an address' normal answers and refusals are weighed (exponential decay): while
#: the answers are at least as many, its requests are not held back before they are read
GRACE_S = 10.0
#: most requests of one address held before they are read, per worker: each holds a connection and
#: up to uvicorn's 64 KB read buffer (256 -> at most 16 MB). Past it the answer is an immediate 429,
#: which a client that retries at once turns into a busy loop: high enough that only a client with
#: hundreds of connections from one address reaches it
MAX_HELD = 256


def is_refusal(status: Optional[int]) -> bool:
    """A refusal is the client's doing: a 4xx other than 429, or no answer at all (it left)."""
    return status is None or (400 <= status < 500 and status != 429)


def client_key(host: str) -> str:
    """The address a client is counted under: IPv4 as is, IPv6 by its /64."""
    if ":" not in host:
        return host
    try:
        return str(ipaddress.ip_network(f"{host}/64", strict=False))
    except ValueError:
        return host


@dataclass
class _Address:
    due: float = 0.0  # when its refusals have drained (GCRA's theoretical arrival time)
    answers: float = 0.0  # normal answers, decayed to `seen`
    refusals: float = 0.0  # refusals, decayed to `seen`
    seen: float = 0.0  # when the two counts were last brought up to date
    held: int = 0  # its requests waiting before they are read, now

    def decay(self, now: float) -> None:
        factor = math.exp(-(now - self.seen) / GRACE_S)
        self.answers, self.refusals, self.seen = self.answers * factor, self.refusals * factor, now


class RefusalPenalty:
    """Per-address refusal meter: ``late(addr)`` and ``hold(addr)`` say how long to wait, ``refused``
    and ``answered`` record outcomes."""

    def __init__(self, rate: float, burst: int, max_delay_s: float, max_clients: int = 65536,
                 max_held: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / rate  # seconds one refusal takes to drain
        self.tolerance = burst * self.interval  # debt (seconds) allowed before any delay
        self.max_delay_s = float(max_delay_s)
        self.max_clients = int(max_clients)
        self.max_held = int(max_held if max_held is not None else MAX_HELD)
        self.clock = clock
        self._addresses: OrderedDict[str, _Address] = OrderedDict()

    def _entry(self, addr: str) -> _Address:
        entry = self._addresses.get(addr)
        if entry is None:
            entry = self._addresses[addr] = _Address()
            while len(self._addresses) > self.max_clients:
                self._addresses.popitem(last=False)
        self._addresses.move_to_end(addr)
        return entry

    def late(self, addr: str) -> float:
        """Seconds a refusal for ``addr`` is held before it is answered (0 within the burst)."""
        entry = self._addresses.get(addr)
        if entry is None:
            return 0.0
        wait = entry.due - self.clock() - self.tolerance
        return min(self.max_delay_s, wait) if wait > 1e-3 else 0.0  # under a ms: float noise, not a penalty

    def hold(self, addr: str) -> float:
        """Seconds a new request from ``addr`` waits before it is read: only for an address in debt
        whose recent refusals outnumber its normal answers."""
        entry = self._addresses.get(addr)
        if entry is None:
            return 0.0
        entry.decay(self.clock())
        return self.late(addr) if entry.refusals > entry.answers else 0.0

    def refused(self, addr: str) -> None:
        now = self.clock()
        entry = self._entry(addr)
        entry.decay(now)
        entry.refusals += 1
        # the debt never grows past what the longest delay can work off: a client that stops
        # refusing is back to normal within tolerance + max_delay_s seconds
        debt = min(max(entry.due - now, 0.0) + self.interval, self.tolerance + self.max_delay_s + self.interval)
        entry.due = now + debt

    def answered(self, addr: str) -> None:
        entry = self._entry(addr)
        entry.decay(self.clock())
        entry.answers += 1

    def held(self, addr: str, change: int) -> int:
        """Count a request entering (+1) or leaving (-1) the wait before it is read; the new count."""
        entry = self._entry(addr)
        entry.held += change
        return entry.held

    def forget_drained(self) -> None:
        now = self.clock()
        for addr in [a for a, e in self._addresses.items()
                     if e.due <= now and not e.held and now - e.seen >= 5 * GRACE_S]:  # counts decayed to <1 %
            del self._addresses[addr]

    def __len__(self) -> int:
        return len(self._addresses)


class PenaltyBoxMiddleware:
    """Outermost ASGI layer applying ``RefusalPenalty`` (see the module's docstring)."""

    def __init__(self, app: ASGIApp, penalty: RefusalPenalty, exempt: Collection[str] = (),
                 on_delay: Callable[[float], None] | None = None) -> None:
        self.app = app
        self.penalty = penalty
        self.exempt = frozenset(exempt)
        self.on_delay = on_delay or (lambda seconds: None)
        self._seen = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        client = scope.get("client")
        if scope["type"] != "http" or not client or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        addr = client_key(str(client[0]))
        wait = self.penalty.hold(addr)
        if wait > 0 and not await self._hold(addr, wait, send):
            return
        try:
            status = await self._answer(addr, scope, receive, send, may_answer_late=wait <= 0)
        except asyncio.CancelledError:  # its client left (a server error, any other exception, is not counted)
            self.penalty.refused(addr)
            raise
        if is_refusal(status):
            self.penalty.refused(addr)
        elif status is not None and status < 400:
            self.penalty.answered(addr)
        self._seen += 1
        if self._seen % 4096 == 0:  # drained, quiet addresses go: the table holds those in debt or vouched for
            self.penalty.forget_drained()

    async def _hold(self, addr: str, wait: float, send: Any) -> bool:
        """Wait before the request is read; False when too many of the address' requests wait
        already (then it got its 429 here)."""
        try:
            if self.penalty.held(addr, +1) > self.penalty.max_held:
                body = json_error_body(429, "too many requests from this address are held back after refusals; "
                                       "retry later", "penalty_box", retry_after_s=math.ceil(wait))
                await send_json(send, 429, body, ((b"retry-after", str(math.ceil(wait)).encode()),
                                                  (b"connection", b"close")))
                return False
            self.on_delay(wait)
            await asyncio.sleep(wait)
            return True
        finally:
            self.penalty.held(addr, -1)

    async def _answer(self, addr: str, scope: Scope, receive: Any, send: Any, may_answer_late: bool) -> Optional[int]:
        """Run the application; a refusal past the burst is held back ``late(addr)`` seconds before
        it goes out (its messages are buffered meanwhile). The status sent, None if none was."""
        status: list[int] = []
        held: list[Message] = []

        async def send_maybe_late(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
                if may_answer_late and is_refusal(status[0]) and self.penalty.late(addr) > 0:
                    held.append(message)
                    return
            if held:
                held.append(message)
                return
            await send(message)

        await self.app(scope, receive, send_maybe_late)
        if held:
            wait = self.penalty.late(addr)
            self.on_delay(wait)
            await asyncio.sleep(wait)
            for message in held:
                await send(message)
        return status[0] if status else None
