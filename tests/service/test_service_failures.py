"""The service's request path and its micro-batcher in-process, with a fake model (no server).

The fake engine stands in for ONNX Runtime only so that model failures and slow calls can be forced;
everything else (decoding, the batcher, error responses) is the real code. The real session behind a
real `bentoml serve` is tested in test_service_http.py.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

import svc_images

svc_module = pytest.importorskip("service.service")
from service.batcher import MicroBatcher, Overloaded  # noqa: E402
from service.preprocessing import PreprocessSpec  # noqa: E402

DESCRIPTION = {
    "in_channels": 1, "image_size": 28, "resize": "bilinear", "classes": [str(i) for i in range(10)],
    "normalization": {"mean": [0.1307], "std": [0.3081]}, "active_providers": ["CPUExecutionProvider"],
}


class FakeEngine:
    """``logits``: class 9 wins for every image; raises the queued failures first; can be slow."""

    spec = PreprocessSpec(channels=1, image_size=28, mean=(0.1307,), std=(0.3081,), resize="bilinear",
                          classes=tuple(str(i) for i in range(10)))

    def __init__(self, failures=(), seconds_per_call: float = 0.0):
        self.failures = list(failures)
        self.seconds_per_call = seconds_per_call
        self.gate: threading.Event | None = None  # when set by a test, the first call waits for it
        self.sizes: list[int] = []
        self.threads: set[str] = set()

    @property
    def calls(self) -> int:
        return len(self.sizes)

    def logits(self, batch):
        self.sizes.append(len(batch))
        self.threads.add(threading.current_thread().name)
        if self.gate is not None and len(self.sizes) == 1:
            assert self.gate.wait(10)
        if self.seconds_per_call:
            time.sleep(self.seconds_per_call)
        if self.failures:
            raise self.failures.pop(0)
        return np.tile(np.arange(10, dtype=np.float32), (len(batch), 1))


def make_service(failures=(), seconds_per_call: float = 0.0, max_latency_ms=None):
    cls = svc_module.Classifier.inner
    svc = cls.__new__(cls)  # no model store: the fake engine is handed in
    svc._start(FakeEngine(failures, seconds_per_call), DESCRIPTION, max_latency_ms=max_latency_ms)
    return svc


def uploads(n=2):
    png = svc_images.sample_images()["png_gray"]
    return [svc_module.Upload(i, f"img{i}.png", png) for i in range(n)]


def run(coro):
    return asyncio.run(coro)


def body(resp):
    return json.loads(resp.body)


def test_success_path_and_top_k():
    svc = make_service()
    out = run(svc._classify(uploads(3), 2))
    assert [p["label"] for p in out] == ["9"] * 3 and len(out[0]["top_k"]) == 2
    assert svc.engine.sizes == [3] and svc.engine.threads == {"model_0"}  # off the event loop


def test_concurrent_requests_share_model_calls():
    svc = make_service()

    async def main():
        return await asyncio.gather(*(svc._classify(uploads(1), None) for _ in range(8)))

    outs = run(main())
    assert all(out[0]["label"] == "9" for out in outs)
    assert svc.engine.sizes == [8]  # queued while none ran: one call


def test_requests_queued_during_a_call_go_into_the_next_one():
    svc = make_service()
    svc.engine.gate = threading.Event()

    async def main():
        first = asyncio.ensure_future(svc._classify(uploads(1), None))
        while svc.engine.calls == 0:
            await asyncio.sleep(0.001)  # the first call is running (held at the gate)
        rest = [asyncio.ensure_future(svc._classify(uploads(2), None)) for _ in range(5)]
        await asyncio.sleep(0.01)
        svc.engine.gate.set()
        return [await first, *await asyncio.gather(*rest)]

    outs = run(main())
    assert [len(o) for o in outs] == [1, 2, 2, 2, 2, 2]
    assert svc.engine.sizes == [1, 10]


def test_overload_is_a_503_with_retry_after_before_queueing():
    svc = make_service(seconds_per_call=0.05, max_latency_ms=20)

    async def main():
        first = await svc._classify(uploads(1), None)  # nothing ahead: runs, and times the model
        running = asyncio.ensure_future(svc._classify(uploads(2), None))
        while svc.engine.calls < 2:
            await asyncio.sleep(0.001)  # the second call is running: ~50 ms per image ahead
        refused = await svc._classify(uploads(1), None)
        return first, await running, refused

    first, second, refused = run(main())
    assert first[0]["label"] == "9" and len(second) == 2
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert body(refused)["reason"] == "overloaded" and "CLASSIFIER_MAX_LATENCY_MS" in body(refused)["error"]
    assert svc.engine.calls == 2  # refused without touching the model


def test_model_bug_is_a_500_not_masked_and_the_next_request_works():
    svc = make_service([RuntimeError("boom")])

    async def main():
        with pytest.raises(RuntimeError, match="boom"):
            await svc._classify(uploads(1), None)
        return await svc._classify(uploads(1), None)

    assert run(main())[0]["label"] == "9"


def test_bad_files_are_all_reported():
    svc = make_service()
    items = uploads(3)
    items[1] = svc_module.Upload(1, "empty.png", b"")
    items[2] = svc_module.Upload(2, "text.png", b"hello")
    resp = run(svc._classify(items, None))
    data = body(resp)
    assert resp.status_code == 400 and data["file"] == "empty.png" and data["index"] == 1
    assert [(e["file"], e["reason"]) for e in data["errors"]] == [("empty.png", "empty"), ("text.png", "not_an_image")]
    assert svc.engine.calls == 0


def test_big_requests_are_split_into_max_batch_size_chunks():
    svc = make_service()
    step = svc_module.CONFIG.max_batch_size
    batch = np.arange(2 * step + 1, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 28, 28), np.float32)
    out = run(svc._infer(batch))
    assert out.shape == (2 * step + 1, 10) and svc.engine.sizes == [step, step, 1]


# --- the batcher on its own --------------------------------------------------------------------------

def echo(batch):
    return batch * 2


def test_batcher_returns_each_request_its_own_rows_in_order():
    batcher = MicroBatcher(echo, max_batch_size=5, max_latency_ms=1000)

    async def main():
        parts = [np.full((n, 3), float(i), np.float32) for i, n in enumerate([2, 3, 1, 4])]
        return parts, await asyncio.gather(*(batcher.submit(p) for p in parts))

    parts, outs = run(main())
    for part, out in zip(parts, outs):
        np.testing.assert_array_equal(out, part * 2)
    assert (batcher.calls, batcher.images) == (2, 10)  # [2+3] and [1+4]: never more than 5 per call


def test_batcher_refuses_oversized_requests_and_skips_cancelled_ones():
    seen = []
    batcher = MicroBatcher(lambda b: (seen.append(len(b)), b)[1], max_batch_size=4, max_latency_ms=1000)

    async def main():
        with pytest.raises(ValueError, match="max_batch_size"):
            await batcher.submit(np.zeros((5, 1), np.float32))
        doomed = asyncio.ensure_future(batcher.submit(np.zeros((3, 1), np.float32)))
        kept = asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32)))
        await asyncio.sleep(0)  # both queued, no call yet
        doomed.cancel()
        return await kept

    assert run(main()).tolist() == [[1.0]] and seen == [1]


def test_batcher_predicts_waits_from_measured_calls():
    batcher = MicroBatcher(lambda b: (time.sleep(0.002 * len(b)), b)[1], max_batch_size=8, max_latency_ms=50)
    assert batcher.predicted_wait_ms(100) == 0.0  # nothing measured: never refuses blind

    async def main():
        await batcher.submit(np.zeros((8, 1), np.float32))
        learnt = batcher.predicted_wait_ms(1)
        alone = await batcher.submit(np.zeros((8, 1), np.float32))  # over budget? nothing ahead: runs
        with pytest.raises(Overloaded) as refused:
            await asyncio.gather(*(batcher.submit(np.zeros((8, 1), np.float32)) for _ in range(8)))
        return learnt, alone, refused.value

    learnt, alone, refused = run(main())
    assert 1.5 <= learnt <= 20 and len(alone) == 8  # ~2 ms per image, measured on the first call
    assert refused.predicted_ms > refused.budget_ms == 50
