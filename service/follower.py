"""Keep a worker serving what its registry alias points to (no framework coupling; asyncio only).

Policy:

- Every ``check_s`` (1 s) read the store's alias pointer (``service/model_source.py``; a small JSON
  file). When it names another store entry than the one served, ``load(tag)`` runs in a thread (an
  ONNX Runtime session + warm-up, beside the old one, which keeps answering), then ``swap`` installs
  it in one assignment on the event loop: requests already running finish on the old model, new ones
  get the new one. Nothing is answered with an error because of a swap.
- Every ``registry_poll_s`` (default 10 s; 0 = never) ``peek()`` asks the registry which version the
  alias points to (a SQLite read or one REST call: mlflow itself stays out of the worker). When it
  differs from the pointer's, ``sync()`` brings it into the store and moves the pointer (a
  subprocess, ``python -m pipeline.serving``); ``sync`` returns False without running when another
  worker is already syncing (the pointer move reaches every worker anyway).
- A version that cannot be served (``sync`` raises :class:`Unservable`: corrupt file, wrong
  contract, failed parity; or ``load`` fails) is refused: the old model keeps serving, the refusal
  is logged, kept in :attr:`status` and counted (``on_event("refused")``), and that version is not
  tried again until the alias moves elsewhere or ``check_now(retry_refused=True)``.
- A registry or store that cannot be reached (``peek`` or ``sync`` raise anything else) never
  stops serving and refuses nothing: :attr:`status` says since when, and the next poll tries again.
  ``check_now()`` does a poll at once (``POST /admin/reload``); while a check runs it returns the
  status marked ``busy`` instead of waiting.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Optional

logger = logging.getLogger("bentoml.classifier.follower")


class Unservable(Exception):
    """``sync`` found that the alias' version can never be served (the message says why)."""


def _utc(ts: Optional[float]) -> Optional[str]:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class AliasFollower:
    """Follows ``alias``: ``run()`` forever (a task per worker), ``check_now()`` on demand.

    ``read_pointer() -> entry | None``; ``load(tag) -> model`` (slow, thread); ``swap(model, entry)``;
    ``peek() -> registry version | None`` (thread; raises when the registry is unreachable);
    ``sync() -> bool`` (thread; raises with the reason when the version cannot be put in the store).
    """

    def __init__(self, alias: str, serving: Optional[dict], *, read_pointer: Callable[[], Optional[dict]],
                 load: Callable[[str], Any], swap: Callable[[Any, dict], None],
                 peek: Optional[Callable[[], Optional[str]]] = None, sync: Optional[Callable[[], bool]] = None,
                 check_s: float = 1.0, registry_poll_s: float = 10.0,
                 on_event: Optional[Callable[[str], None]] = None) -> None:
        self.alias = alias
        self._read_pointer, self._load, self._swap = read_pointer, load, swap
        self._peek, self._sync = peek, sync
        self.check_s, self.registry_poll_s = check_s, registry_poll_s
        self._on_event = on_event or (lambda kind: None)
        self.serving = dict(serving or {})  # the pointer entry of the model served (tag, registry_version, ...)
        self.loaded_at: Optional[float] = time.time() if serving else None
        self.refused: Optional[dict] = None
        self._refused_keys: set[str] = set()
        self.registry: dict[str, Any] = {"checked_at": None, "ok": None, "version": None, "error": None,
                                         "unreachable_since": None}
        self._lock = asyncio.Lock()
        self._last_poll = 0.0

    # --- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001  (never let the follower die; it is what keeps us current)
                logger.exception("alias follower step failed; trying again in %.0f s", self.check_s)
            await asyncio.sleep(self.check_s)

    async def step(self) -> None:
        due = self.registry_poll_s > 0 and time.monotonic() - self._last_poll >= self.registry_poll_s
        await self._check(poll_registry=due)

    async def check_now(self, retry_refused: bool = False) -> dict:
        """Poll the registry and the pointer now; the resulting status."""
        if self._lock.locked():
            return {**self.status, "busy": True}
        if retry_refused:
            self._refused_keys.clear()
        await self._check(poll_registry=True)
        return self.status

    async def _check(self, poll_registry: bool) -> None:
        async with self._lock:
            if poll_registry and self._peek is not None:
                await self._poll_registry()
            await self._follow_pointer()

    # --- registry -> store ------------------------------------------------------------------------

    async def _poll_registry(self) -> None:
        self._last_poll = time.monotonic()
        now = time.time()
        try:
            version = await asyncio.to_thread(self._peek)
        except Exception as err:  # noqa: BLE001  (any store problem: keep serving, say so)
            if self.registry["ok"] is not False:
                logger.warning("alias %r: registry unreachable, still serving %s: %s", self.alias,
                               self.serving.get("tag") or "nothing yet", err)
                self._on_event("registry_error")
            self.registry.update(checked_at=now, ok=False, error=str(err)[:300],
                                 unreachable_since=self.registry["unreachable_since"] or now)
            return
        self.registry.update(checked_at=now, ok=True, version=version, error=None, unreachable_since=None)
        pointer = self._read_pointer() or {}
        key = f"registry:{version}"
        if version is None or version == str(pointer.get("registry_version")) or key in self._refused_keys:
            return
        if self._sync is None:
            return
        try:
            await asyncio.to_thread(self._sync)
        except Unservable as err:
            self._refuse(key, {"registry_version": version}, f"cannot be put in the store: {err}")
        except Exception as err:  # noqa: BLE001  (store or registry down mid-sync: try again next poll)
            logger.warning("alias %r: could not fetch registry v%s yet (%s); trying again", self.alias, version, err)
            self.registry.update(ok=False, error=f"sync of v{version}: {str(err)[:300]}",
                                 unreachable_since=self.registry["unreachable_since"] or now)

    # --- store pointer -> served model ------------------------------------------------------------

    async def _follow_pointer(self) -> None:
        entry = self._read_pointer()
        if not entry or entry.get("tag") == self.serving.get("tag"):
            return
        key = f"tag:{entry['tag']}"
        if key in self._refused_keys:
            return
        started = time.perf_counter()
        try:
            model = await asyncio.to_thread(self._load, entry["tag"])
        except Exception as err:  # noqa: BLE001  (corrupt file, wrong contract, missing entry ...)
            self._refuse(key, entry, f"cannot be loaded: {type(err).__name__}: {err}")
            return
        previous = self.serving.get("tag")
        self._swap(model, entry)
        self.serving, self.loaded_at, self.refused = dict(entry), time.time(), None
        self._refused_keys.clear()  # the alias moved on: a refused version may be promoted again
        self._on_event("loaded")
        logger.info("alias %r: now serving %s (registry v%s) instead of %s; loaded and warmed in %.2f s",
                    self.alias, entry["tag"], entry.get("registry_version"), previous,
                    time.perf_counter() - started)

    def refuse_entry(self, entry: dict, reason: str) -> None:
        """Record that the pointer's ``entry`` could not be served (a worker that fell back at start-up)."""
        self._refuse(f"tag:{entry.get('tag')}", entry, reason)

    def _refuse(self, key: str, entry: dict, reason: str) -> None:
        self._refused_keys.add(key)
        self.refused = {"tag": entry.get("tag"), "registry_version": entry.get("registry_version"),
                        "reason": reason[:1000], "time": _utc(time.time())}
        self._on_event("refused")
        logger.error("alias %r: REFUSED registry v%s (%s): %s; still serving %s", self.alias,
                     entry.get("registry_version"), entry.get("tag") or "not stored", reason,
                     self.serving.get("tag") or "nothing yet")

    @property
    def status(self) -> dict:
        reg = self.registry
        return {
            "alias": self.alias,
            "model_tag": self.serving.get("tag"),
            "registry_version": self.serving.get("registry_version"),
            "loaded_at": _utc(self.loaded_at),
            "registry_poll_s": self.registry_poll_s if self._peek is not None else 0,
            "last_registry_check": {"time": _utc(reg["checked_at"]), "ok": reg["ok"], "version": reg["version"],
                                    "error": reg["error"], "unreachable_since": _utc(reg["unreachable_since"])},
            "refused": self.refused,
        }
