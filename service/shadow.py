"""Shadow a challenger on live traffic, off the response path (no framework coupling).

Policy: after the champion has answered a request, :meth:`Shadow.offer` may run the same
preprocessed batch through the challenger, in a task the response never waits for. Sampling is
deterministic, every ``round(1 / rate)``-th offered request (rate 0.1 -> every 10th), so the load is
even rather than bursty. At most ONE shadow call runs per worker, in its own thread with a
one-thread ONNX Runtime session: a sampled request that finds it busy is skipped and counted, so
the shadow costs at most one core-thread and never queues work behind the champion. That thread
runs at the lowest CPU priority (nice 19, Linux): the kernel gives it only what the champion's
threads leave idle (at nice 0 it added ~13 % to the champion's p99 at c=32 on 2 cores; bench/shadow.py).
Outcomes go to
``on_result(outcome, shadow_seconds)`` with outcome ``agree`` / ``disagree`` (top-1 per image) /
``skipped`` / ``error``; a failing challenger never affects the champion's answers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import numpy as np

logger = logging.getLogger("bentoml.classifier.shadow")


def _lowest_priority() -> None:
    """Nice 19 for the calling thread only (Linux keeps a nice value per thread)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class Shadow:
    def __init__(self, rate: float, on_result: Callable[[str, int, Optional[float]], None]) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"shadow sampling rate must be in (0, 1], got {rate}")
        self.every = max(1, round(1 / rate))
        self.engine: Any = None  # logits(float32 [N, C, H, W]) -> [N, classes]; None until a challenger loads
        self._on_result = on_result
        self._offered = 0
        self._busy = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow", initializer=_lowest_priority)
        self._tasks: set[asyncio.Task] = set()
        self.counts = {"agree": 0, "disagree": 0, "skipped": 0, "error": 0}

    def offer(self, batch: np.ndarray, champion_logits: np.ndarray) -> None:
        """Maybe shadow this request (returns at once)."""
        if self.engine is None:
            return
        self._offered += 1
        if self._offered % self.every:
            return
        if self._busy:
            self._record("skipped", len(batch), None)
            return
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._run(self.engine, batch, champion_logits.argmax(1)))
        self._tasks.add(task)  # a reference, so the task is not collected mid-flight
        task.add_done_callback(self._tasks.discard)

    async def _run(self, engine: Any, batch: np.ndarray, champion_top1: np.ndarray) -> None:
        started = time.perf_counter()
        try:
            logits = await asyncio.get_running_loop().run_in_executor(self._executor, engine.logits, batch)
        except Exception as err:  # noqa: BLE001  (a broken challenger is the challenger's problem)
            logger.warning("shadow model failed: %s: %s", type(err).__name__, err)
            self._record("error", len(batch), None)
            return
        finally:
            self._busy = False
        seconds = time.perf_counter() - started
        agree = int((np.asarray(logits).argmax(1) == champion_top1).sum())
        if agree:
            self._record("agree", agree, seconds)
        if len(batch) - agree:
            self._record("disagree", len(batch) - agree, seconds if not agree else None)

    def _record(self, outcome: str, images: int, seconds: Optional[float]) -> None:
        self.counts[outcome] += images
        self._on_result(outcome, images, seconds)

    @property
    def status(self) -> dict:
        compared = self.counts["agree"] + self.counts["disagree"]
        return {"sample_every": self.every, "active": self.engine is not None, "images": dict(self.counts),
                "agreement": round(self.counts["agree"] / compared, 6) if compared else None}
