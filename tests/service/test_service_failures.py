"""The public service's handling of runtime failures, in-process with a fake runtime (no server)."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

import svc_images

svc_module = pytest.importorskip("service.service")
from bentoml.exceptions import BentoMLException, ServiceUnavailable  # noqa: E402

DESCRIPTION = {
    "in_channels": 1, "image_size": 28, "resize": "bilinear", "classes": [str(i) for i in range(10)],
    "normalization": {"mean": [0.1307], "std": [0.3081]}, "active_providers": ["CPUExecutionProvider"],
}


class FakeAsync:
    def __init__(self, failures):
        self.failures = list(failures)
        self.calls = 0

    async def describe(self):
        return DESCRIPTION

    async def predict(self, batch):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return np.tile(np.arange(10, dtype=np.float32), (len(batch), 1))


class FakeRuntime:
    def __init__(self, failures=()):
        self.to_async = FakeAsync(failures)


def make_service(failures=()):
    svc = svc_module.Classifier.inner()
    svc.runtime = FakeRuntime(failures)  # shadows the bentoml.depends descriptor
    return svc


def uploads(n=2):
    png = svc_images.sample_images()["png_gray"]
    return [svc_module.Upload(i, f"img{i}.png", png) for i in range(n)]


def run(coro):
    return asyncio.run(coro)


def body(resp):
    return json.loads(resp.body)


def test_success_path_and_top_k():
    out = run(make_service()._classify(uploads(3), 2))
    assert [p["label"] for p in out] == ["9"] * 3 and len(out[0]["top_k"]) == 2


def test_adaptive_batching_overload_becomes_503_with_retry_after():
    resp = run(make_service([ServiceUnavailable("process is overloaded", error_code=503)])._classify(uploads(), None))
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert body(resp)["reason"] == "overloaded"


def test_connection_errors_are_retried():
    import aiohttp

    svc = make_service([aiohttp.ServerDisconnectedError(), ConnectionResetError()])
    out = run(svc._classify(uploads(1), None))
    assert out[0]["label"] == "9" and svc.runtime.to_async.calls == 3


def test_runtime_down_becomes_503():
    svc = make_service([ConnectionRefusedError()] * 5)
    resp = run(svc._classify(uploads(1), None))
    assert resp.status_code == 503 and body(resp)["reason"] == "runtime_unavailable"


def test_runtime_bug_is_a_500_not_masked():
    svc = make_service([BentoMLException("boom")])
    with pytest.raises(BentoMLException):
        run(svc._classify(uploads(1), None))


def test_bad_files_are_all_reported():
    svc = make_service()
    items = uploads(3)
    items[1] = svc_module.Upload(1, "empty.png", b"")
    items[2] = svc_module.Upload(2, "text.png", b"hello")
    resp = run(svc._classify(items, None))
    data = body(resp)
    assert resp.status_code == 400 and data["file"] == "empty.png" and data["index"] == 1
    assert [(e["file"], e["reason"]) for e in data["errors"]] == [("empty.png", "empty"), ("text.png", "not_an_image")]
    assert svc.runtime.to_async.calls == 0


def test_big_requests_are_split_into_max_batch_size_chunks():
    svc = make_service()
    n = svc_module.CONFIG.max_batch_size * 2 + 1
    batch = np.zeros((n, 1, 28, 28), np.float32)
    out = run(svc._infer(batch))
    assert out.shape == (n, 10) and svc.runtime.to_async.calls == 3
