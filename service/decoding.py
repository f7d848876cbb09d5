"""The decode budget: which images a request may decode, and where the decoding runs.

Policy, per worker process:

* **Decided from headers.** Before any pixel is decoded, every image's header is read (~0.1 ms;
  :func:`service.preprocessing.read_header`). An image that would decode to more than
  ``image_pixels`` (derived from the model's input size unless configured) and a request whose
  images together exceed ``request_pixels`` are refused at once with 413: a 1.7 KB WebP whose canvas
  is 40 MP costs ~0.4 s of CPU to decode, and 30 of them in a 56 KB request used to occupy a worker
  for 12 s. Large JPEGs decode at reduced scale (``Image.draft``) and count at that scale.
* **Small work inline, large work in the pool.** A request of at most :data:`INLINE_BYTES` bytes
  whose headers add up to at most :data:`INLINE_PIXELS` canvas pixels decodes on the event loop (a
  28x28 PNG takes ~30 us, less than a thread hand-off); anything larger goes to the worker's decode
  threads, and so do the header reads of requests over :data:`INLINE_BYTES`. The work is priced by
  :func:`decode_cost`; a request costing more than the whole queue may hold is refused (413).
* **Decode threads are bounded and yield.** The pool has a few threads at nice
  :data:`DECODE_NICE` (Linux keeps a nice value per thread), so that under a flood of large images
  the kernel runs the event loop and the model thread first: ordinary small requests keep their
  latency. The cost queued or running are capped (``capacity``); a request that would
  pass the cap while others wait is refused with :class:`DecodeBusy` (the API answers 429 and
  ``Retry-After``: the senders of large images are asked to slow down) instead of queueing into a
  timeout.
* **Abandoned work stops.** When the awaiting request is cancelled (its client went away, or its
  timeout fired) a queued job never starts, and a running one stops before its next image.
"""
from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from service.contract import PreprocessSpec
from service.preprocessing import ImageError, ImageHeader, draft_side, pixel_limit, read_header

T = TypeVar("T")

#: canvas pixels a request may decode on the event loop (256x256: ~2 ms for PNGs)
INLINE_PIXELS = 256 * 256
#: bytes a request may have for its headers to be read, and its images decoded, on the event loop:
#: Pillow parses PNG chunks and JPEG markers in Python (~5 us each), so bytes bound that work
INLINE_BYTES = 64 * 1024
#: a JPEG decoded at reduced scale still parses and transforms its whole canvas' coefficients: ~1/16
#: of a full decode's time (12 MP: 91 ms full, 5.7 ms at 1/8 scale)
DRAFTED_CANVAS_SHARE = 16
#: nice value of the decode threads (0 = normal, 19 = lowest); 10 gives them ~1/10 of a contended
#: core's time slices against nice-0 threads (CFS weights 110 vs 1024)
DECODE_NICE = 10
#: default per-request budget in per-image limits
REQUEST_IMAGES_OF_PIXELS = 4


@dataclass(frozen=True)
class DecodeBudget:
    """Pixel limits for one model: per image (decoded pixels), per request (decoded pixels, all
    images), and the size JPEGs are drafted to."""

    image_pixels: int
    request_pixels: int
    draft_to: int

    @classmethod
    def for_model(cls, spec: PreprocessSpec, image_pixels: int = 0, request_pixels: int = 0) -> "DecodeBudget":
        """Configured limits, 0 meaning "derive from the model's input size"."""
        image = image_pixels or pixel_limit(spec.image_size)
        return cls(image, request_pixels or REQUEST_IMAGES_OF_PIXELS * image, draft_side(spec.image_size, spec.input_transform))

    def headers(self, blobs: Sequence[bytes]) -> list["ImageHeader | ImageError"]:
        """Each image's header, or the :class:`ImageError` that refuses it (per-image limit included)."""
        out: list[ImageHeader | ImageError] = []
        for data in blobs:
            try:
                out.append(read_header(data, max_pixels=self.image_pixels, draft_to=self.draft_to))
            except ImageError as err:
                out.append(err)
        return out

    def over_request_budget(self, headers: Sequence["ImageHeader | ImageError"]) -> int:
        """Decoded pixels of the request when over ``request_pixels``, else 0."""
        total = sum(h.decoded_pixels for h in headers if isinstance(h, ImageHeader))
        return total if total > self.request_pixels else 0


def canvas_pixels(headers: Sequence["ImageHeader | ImageError"]) -> int:
    """The request's images' canvas pixels (what the headers say)."""
    return sum(h.pixels for h in headers if isinstance(h, ImageHeader))


def decode_cost(headers: Sequence["ImageHeader | ImageError"]) -> int:
    """A request's decode work in pixel-equivalents: its decoded pixels, plus a share of the canvas of
    images decoded at reduced scale."""
    return sum(h.decoded_pixels + (h.pixels - h.decoded_pixels) // DRAFTED_CANVAS_SHARE
               for h in headers if isinstance(h, ImageHeader))


class DecodeBusy(Exception):
    """The decode threads already hold as many pixels as they may."""

    def __init__(self, pending: int, cost: int, capacity: int) -> None:
        super().__init__(f"{pending} pixels are being decoded; {cost} more would pass the limit of {capacity}")


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[int], None], arg: int) -> None:
    try:
        loop.call_soon_threadsafe(callback, arg)
    except RuntimeError:  # the loop closed (shutdown) while the job ran
        pass


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)
    except (AttributeError, OSError):  # not Linux: threads share the process' priority
        pass


class DecodePool:
    """``await pool.run(work, cost, capacity)``: ``work(cancelled: threading.Event) -> T`` in a
    decode thread, unless ``cost`` more pixels would take the pool past ``capacity`` while others wait."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self.pending_pixels = 0
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="decode", initializer=_lower_priority)

    async def run(self, work: Callable[[threading.Event], T], cost: int, capacity: int) -> T:
        if self.pending_pixels and self.pending_pixels + cost > capacity:
            raise DecodeBusy(self.pending_pixels, cost, capacity)
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()
        self.pending_pixels += cost
        job = self._executor.submit(work, cancelled)
        # released when the job really ends (a cancelled job still finishes its current image)
        job.add_done_callback(lambda _: _call_soon(loop, self._release, cost))
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            cancelled.set()  # wrap_future cancelled the job if it had not started
            raise

    def _release(self, cost: int) -> None:
        self.pending_pixels -= cost

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
