"""Continuous micro-batching of model calls inside one worker process.

Concurrent requests each submit a ``float32 [n, C, H, W]`` array; one model call runs at a time (in a
dedicated thread, so the event loop keeps parsing and decoding requests while ONNX Runtime, which
releases the GIL, computes). When a call ends, everything queued meanwhile (up to ``max_batch_size``
images) goes into the next call. Nothing waits on a timer: an idle server runs a lone request at
once, a busy one forms batches as large as the load makes them. This is what BentoML's adaptive
batching does across processes, without the extra process hop (serialization, a Unix socket, a
second event loop) that cost more CPU than the tiny models themselves (bench/serve.py --profile).

Overload: a request whose predicted wait (images ahead of it and its own x the measured seconds
per image) exceeds ``max_latency_ms`` is refused at once with :class:`Overloaded` (the API answers
503 + Retry-After) instead of queueing into a timeout. A request that finds nothing ahead of it is
never refused. Seconds per image = a running average of call seconds / a running average of images
per call, so one slow call of a single image (a scheduler hiccup) does not condemn a queue.

A model call that never returns cannot be interrupted (ONNX Runtime holds the thread): the owner
watches :meth:`MicroBatcher.running_for` and, past its limit, calls :meth:`MicroBatcher.abandon`,
which fails every waiting request at once; the process must then be replaced.
"""
from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np

#: weight of the newest call in the running averages of call seconds and images per call
EWMA_WEIGHT = 0.1


class Overloaded(Exception):
    """The queue ahead of a request would take longer than the latency budget."""

    def __init__(self, predicted_ms: float, budget_ms: float) -> None:
        super().__init__(f"predicted wait {predicted_ms:.0f} ms > budget {budget_ms:.0f} ms")
        self.predicted_ms, self.budget_ms = predicted_ms, budget_ms


class MicroBatcher:
    """``await batcher.submit(images)`` -> the model's output rows for those images.

    ``infer``: ``float32 [N, ...] -> [N, ...]``, called with ``N <= max_batch_size``, one call at a
    time. ``on_batch(images_in_call)`` is told the size of every call (for the /metrics histogram).
    """

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_latency_ms: float,
                 on_batch: Optional[Callable[[int], None]] = None,
                 call_cores: Callable[[], int] = lambda: 1) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.max_latency_ms = float(max_latency_ms)
        self._infer = infer
        self._on_batch = on_batch
        #: cores the last call ran on (service.spread): calls are timed in core-seconds, so the wait is
        #: predicted as if every call ran whole, which is what happens under load
        self._call_cores = call_cores
        self._queue: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self._queued_images = 0
        self._running_images = 0
        self._call_seconds: Optional[float] = None  # running averages over the calls made so far
        self._call_images = 0.0
        self._wakeup: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._running: list[tuple[np.ndarray, asyncio.Future]] = []  # the call in progress
        self._call_started: Optional[float] = None  # loop.time() when it began
        self._abandoned: Optional[Exception] = None
        self.calls = 0
        self.images = 0

    def predicted_wait_ms(self, extra_images: int = 0) -> float:
        """Milliseconds until ``extra_images`` more would be done; 0 until a call has been timed."""
        if self._call_seconds is None or self._call_images <= 0:
            return 0.0
        ahead = self._queued_images + self._running_images + extra_images
        return 1000.0 * ahead * self._call_seconds / self._call_images

    async def submit(self, images: np.ndarray) -> np.ndarray:
        if self._abandoned is not None:
            raise self._abandoned
        count = len(images)
        if count == 0:
            return self._infer(images)
        if count > self.max_batch_size:
            raise ValueError(f"{count} images > max_batch_size {self.max_batch_size}: split the request")
        predicted = self.predicted_wait_ms(count)
        if predicted > self.max_latency_ms and (self._queued_images or self._running_images):
            raise Overloaded(predicted, self.max_latency_ms)
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = loop.create_task(self._run(), name="micro-batcher")
        future: asyncio.Future = loop.create_future()
        self._queue.append((images, future))
        self._queued_images += count
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    def running_for(self, now: float) -> float:
        """Seconds the model call in progress has run (``now``: the loop's clock); 0 when idle."""
        return 0.0 if self._call_started is None else now - self._call_started

    def abandon(self, err: Exception) -> None:
        """Fail every request in the running call and the queue with ``err``; accept nothing more."""
        for _, future in [*self._running, *self._queue]:
            if not future.done():
                future.set_exception(err)
        self._queue.clear()
        self._queued_images = 0
        self._abandoned = err
        self.close()

    def close(self) -> None:
        """Stop the model thread once nothing will be submitted any more (a retired model's batcher)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False)

    def _take_batch(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        """The queued requests that fit in one call, oldest first (always at least one)."""
        taken, size = [], 0
        while self._queue and (not taken or size + len(self._queue[0][0]) <= self.max_batch_size):
            images, future = self._queue.popleft()
            self._queued_images -= len(images)
            if future.cancelled():  # the client went away while queued
                continue
            taken.append((images, future))
            size += len(images)
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                taken = self._take_batch()
                if not taken:
                    continue
                batch = taken[0][0] if len(taken) == 1 else np.concatenate([images for images, _ in taken])
                self._running_images, self._running = len(batch), taken
                started = self._call_started = loop.time()
                try:
                    outputs = await loop.run_in_executor(self._executor, self._infer, batch)
                except Exception as err:  # every request of the call gets the error (a 500: a model bug)
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(err)
                    continue
                finally:
                    self._running_images, self._running, self._call_started = 0, [], None
                self._learn((loop.time() - started) * self._call_cores(), len(batch))
                offset = 0
                for images, future in taken:
                    part = outputs[offset:offset + len(images)]
                    offset += len(images)
                    if not future.done():
                        future.set_result(part)

    def _learn(self, seconds: float, images: int) -> None:
        self.calls += 1
        self.images += images
        if self._on_batch is not None:
            self._on_batch(images)
        if self._call_seconds is None:
            self._call_seconds, self._call_images = seconds, float(images)
        else:
            self._call_seconds += EWMA_WEIGHT * (seconds - self._call_seconds)
            self._call_images += EWMA_WEIGHT * (images - self._call_images)
