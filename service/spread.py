"""A large model call spread over the idle cores, on the worker's one ONNX Runtime session.

Policy. Each worker's session has one intra-op thread: with one worker per core, the workers' calls
under load already fill the CPUs, and sessions of several threads each would oversubscribe them
(64-image ResNet-18 calls in two 2-thread workers at once: -35 % images/s, 2 cores). But a lone large
request then ran on one core while the others idled. So a call of ``n`` images is cut into ``k``
chunks run at once from ``k`` threads on the same session (ONNX Runtime's ``Run`` is thread-safe and
releases the GIL; one copy of the weights), where

    k = min(idle cores, n // min_chunk)

* **idle cores**: the usable CPUs minus the cores the other workers' calls hold right now, read from
  a :class:`BusyBoard` (one byte per worker in a shared file: the cores its call in progress uses).
  Under load every worker runs its calls whole; two workers both splitting 64-image ResNet-18 calls
  lost 7 % against running them whole (2 cores).
* **min_chunk**: the images that take ``min_chunk_s`` (``CLASSIFIER_SPLIT_MIN_MS``, default 2 ms) on
  one core, by the worker's measured seconds per image: a shorter chunk does not pay for the thread
  hand-offs (~0.1 ms in all). The tiny MNIST ``cnn`` (~10 us per image) is never split; ResNet-18
  (~6 ms per image) is from 2 images.

Only a CPU session of one intra-op thread is split: a GPU provider runs one call at a time anyway,
and a session configured with more threads (``CLASSIFIER_ORT_THREADS``) already uses them.
"""
from __future__ import annotations

import mmap
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

__all__ = ["BusyBoard", "Spreader", "chunk_count"]

#: workers a board has room for (a byte each)
BOARD_SLOTS = 256
#: weight of the newest call in the running average of seconds per image
EWMA_WEIGHT = 0.2
#: calls of fewer images do not update it
MIN_TIMED_IMAGES = 8


def chunk_count(images: int, idle_cores: int, seconds_per_image: Optional[float], min_chunk_s: float) -> int:
    """The chunks a call of ``images`` is cut into (1 = run it whole)."""
    if images < 2 or idle_cores < 2 or not seconds_per_image or min_chunk_s <= 0:
        return 1
    min_chunk = max(1, int(np.ceil(min_chunk_s / seconds_per_image)))
    return max(1, min(idle_cores, images // min_chunk))


class BusyBoard:
    """Cores each worker's model call holds now: byte ``index`` of a small shared file, one per worker.

    Advisory and lock-free between workers: a reader may see a call that has just ended, which costs
    at most one call run whole. Within a worker the byte is a count that every call adds its cores to
    and takes them back from (two models' calls overlap during a swap). A worker that dies mid-call
    leaves its byte set until its replacement (the same index) clears it at start."""

    def __init__(self, path: Path, index: int) -> None:
        if not 0 <= index < BOARD_SLOTS:
            raise ValueError(f"worker index {index} outside 0..{BOARD_SLOTS - 1}")
        self.path, self.index = Path(path), index
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < BOARD_SLOTS:
                os.ftruncate(fd, BOARD_SLOTS)  # zero-filled; a no-op race between workers
            self._map = mmap.mmap(fd, BOARD_SLOTS)
        finally:
            os.close(fd)
        self._held, self._lock = 0, threading.Lock()
        self._map[self.index] = 0

    @classmethod
    def for_service(cls, name: str, index: Optional[int]) -> Optional["BusyBoard"]:
        """The board the workers of one ``bentoml serve`` share (keyed by their parent, the arbiter), or
        None outside a numbered worker (tests, tools) or where the file cannot be made. It lives in
        BentoML's metrics folder, which ``bentoml serve`` empties at start: a killed service's board
        does not outlive the next start (elsewhere: /dev/shm, else the temporary folder)."""
        if index is None:
            return None
        metrics = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or "/nonexistent")
        shm = Path("/dev/shm")
        folder = metrics if metrics.is_dir() else shm if shm.is_dir() else Path(tempfile.gettempdir())
        try:
            return cls(folder / f"imgcls-{name}-{os.getppid()}.busy", index)
        except (OSError, ValueError):
            return None

    def hold(self, cores: int) -> None:
        """Add ``cores`` (negative: give them back) to this worker's count."""
        with self._lock:
            self._held = max(0, self._held + cores)
            self._map[self.index] = min(255, self._held)

    def remove(self) -> None:
        """Delete the file when the service stops (the workers' mappings stay valid until they exit)."""
        self.path.unlink(missing_ok=True)

    def others(self) -> int:
        """Cores held by the other workers' calls."""
        held = self._map[:]
        return sum(held) - held[self.index]


class Spreader:
    """``logits(batch)`` of ``engine``, cut into chunks over the idle cores (the module's policy)."""

    def __init__(self, engine: Any, cpus: int, board: Optional[BusyBoard] = None,
                 seconds_per_image: Optional[float] = None, min_chunk_s: float = 0.002,
                 on_call: Optional[Callable[[int], None]] = None) -> None:
        self.engine, self.cpus, self.board, self.min_chunk_s = engine, max(1, cpus), board, min_chunk_s
        self.splits = engine_splits(engine) and self.cpus > 1 and min_chunk_s > 0
        self._on_call = on_call  # told the chunks of every call (the /metrics histogram)
        #: one core's seconds per image, from the warm-up until calls are timed (None: run whole)
        self.seconds_per_image = seconds_per_image
        self.cores_of_last_call = 1  # the micro-batcher times calls in core-seconds (predicted as if whole)
        self._pool = ThreadPoolExecutor(self.cpus - 1, thread_name_prefix="model-chunk") if self.splits else None
        self._lock = threading.Lock()  # one call at a time (the micro-batcher's rule; tools may call from threads)

    def idle_cores(self) -> int:
        return self.cpus - (self.board.others() if self.board is not None else 0)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            # decided and held at once: the gap in which another worker could decide the same is short
            k = chunk_count(len(batch), self.idle_cores(), self.seconds_per_image, self.min_chunk_s) if self.splits else 1
            self.cores_of_last_call = k
            if self.board is not None:
                self.board.hold(k)
            started = time.perf_counter()
            try:
                out = self._run(batch, k)
            finally:
                if self.board is not None:
                    self.board.hold(-k)
            self._learn((time.perf_counter() - started) * k, len(batch))
        if self._on_call is not None:
            self._on_call(k)
        return out

    def _run(self, batch: np.ndarray, k: int) -> np.ndarray:
        if k == 1:
            return self.engine.logits(batch)
        first, *rest = np.array_split(batch, k)
        assert self._pool is not None
        futures = [self._pool.submit(self.engine.logits, part) for part in rest]
        try:
            head = self.engine.logits(first)  # this thread runs a chunk too
        finally:
            wait(futures)  # no chunk outlives the call (its cores are given back next)
        return np.concatenate([head, *(f.result() for f in futures)])

    def _learn(self, core_seconds: float, images: int) -> None:
        if images < MIN_TIMED_IMAGES:  # a call of a few images is mostly fixed cost, not per image
            return
        per_image = core_seconds / images
        if self.seconds_per_image is None:
            self.seconds_per_image = per_image
        else:
            self.seconds_per_image += EWMA_WEIGHT * (per_image - self.seconds_per_image)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def engine_splits(engine: Any) -> bool:
    """Whether calls of ``engine`` may be split: a CPU-only session of one intra-op thread."""
    return (getattr(engine, "intra_op_threads", None) == 1
            and list(getattr(engine, "active_providers", ())) == ["CPUExecutionProvider"])
