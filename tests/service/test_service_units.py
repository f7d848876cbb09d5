"""Fast unit tests: postprocessing, configuration, the ASGI middleware (request size, connection
recycling, the patched BentoML timeout), provider selection."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from service.config import ENV_VARS, ServiceConfig
from tests.harness import REPO
from service.limits import ConnectionRecycleMiddleware, RequestSizeLimitMiddleware
from service.contract import softmax
from service.postprocessing import predictions


# --- postprocessing --------------------------------------------------------------------------------

def test_softmax_rows_sum_to_one_and_survive_large_logits():
    logits = np.array([[1000.0, 1000.0, -1000.0], [0.0, 1.0, 2.0]], dtype=np.float32)
    probs = softmax(logits)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs[0], [0.5, 0.5, 0.0], atol=1e-7)
    e = np.exp([0.0, 1.0, 2.0])
    np.testing.assert_allclose(probs[1], e / e.sum(), rtol=1e-6)


def test_predictions_shape_order_and_k_cap():
    classes = ["a", "b", "c", "d"]
    logits = np.array([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    out = predictions(logits, classes, k=3)
    assert [p["label"] for p in out] == ["b", "a"]
    assert [t["index"] for t in out[0]["top_k"]] == [1, 3, 2]
    assert out[0]["score"] == out[0]["top_k"][0]["score"]
    assert set(out[0]) == {"label", "index", "score", "top_k"}
    assert all(set(t) == {"label", "index", "score"} for t in out[0]["top_k"])
    assert len(predictions(logits, classes, k=99)[0]["top_k"]) == 4
    assert len(predictions(logits, classes, k=0)[0]["top_k"]) == 1
    # ties: lower index first
    assert [t["index"] for t in out[1]["top_k"]] == [0, 1, 2]
    json.dumps(out)  # plain Python types only
    with pytest.raises(ValueError):
        predictions(logits, classes[:3], k=1)


# --- configuration ---------------------------------------------------------------------------------

def test_config_defaults():
    cfg = ServiceConfig.from_env({})
    assert (cfg.model_name, cfg.model_version, cfg.model_alias) == ("image-classifier", "", "champion")
    assert (cfg.registry_poll_s, cfg.shadow_alias, cfg.admin_token) == (10.0, "", "")
    assert (cfg.providers, cfg.top_k, cfg.max_batch_size) == ("auto", 5, 64)
    assert cfg.workers == cfg.cpu_count  # one worker (session + batcher) per CPU
    assert cfg.intra_op_threads == 1
    documented = (REPO / "docs" / "deployment.md").read_text()
    for name, (default, doc) in ENV_VARS.items():
        assert name.startswith("CLASSIFIER_") and doc
        assert f"| `{name}` | {default or '(empty)'} |" in documented, f"{name} is not in docs/deployment.md's table"
    assert (cfg.refusal_rate, cfg.refusal_burst, cfg.refusal_max_delay_s) == (10.0, 50, 5.0)


def test_config_from_env_and_errors():
    cfg = ServiceConfig.from_env({
        "CLASSIFIER_MODEL_NAME": "digits", "CLASSIFIER_MODEL_VERSION": "abc123", "CLASSIFIER_ORT_THREADS": "3",
        "CLASSIFIER_MAX_BATCH_SIZE": "16", "CLASSIFIER_PROVIDERS": "cpu",
    })
    assert (cfg.model_version, cfg.intra_op_threads, cfg.max_batch_size, cfg.providers) == ("abc123", 3, 16, "cpu")
    assert ServiceConfig.from_env({}).access_log and not ServiceConfig.from_env({"CLASSIFIER_ACCESS_LOG": "0"}).access_log
    assert not ServiceConfig.from_env({}).tracing and ServiceConfig.from_env({"CLASSIFIER_TRACING": "1"}).tracing
    two = ServiceConfig.from_env({"CLASSIFIER_WORKERS": "2"})
    assert two.workers == 2 and two.intra_op_threads == max(1, two.cpu_count // 2)
    for env, match in [
        ({"CLASSIFIER_MAX_BATCH_SIZE": "0"}, "CLASSIFIER_MAX_BATCH_SIZE"),
        ({"CLASSIFIER_WORKERS": "-1"}, "CLASSIFIER_WORKERS"),
        ({"CLASSIFIER_API_WORKERS": "2"}, "CLASSIFIER_API_WORKERS is not a setting.*did you mean CLASSIFIER_WORKERS"),
        ({"CLASSIFIER_MAX_BATCH": "2"}, "CLASSIFIER_MAX_BATCH is not a setting.*did you mean CLASSIFIER_MAX_BATCH_SIZE"),
        ({"CLASSIFIER_FROBNICATE_EVERYTHING": "1"}, "CLASSIFIER_FROBNICATE_EVERYTHING is not a setting.*docs/deployment.md"),
        ({"CLASSIFIER_ACCESS_LOG": "maybe"}, "CLASSIFIER_ACCESS_LOG"),
        ({"CLASSIFIER_TOP_K": "five"}, "CLASSIFIER_TOP_K"),
        ({"CLASSIFIER_MODEL_NAME": "a:b"}, "CLASSIFIER_MODEL_NAME"),
        ({"CLASSIFIER_MAX_IMAGES": "0"}, "CLASSIFIER_MAX_IMAGES"),
        ({"CLASSIFIER_REGISTRY_POLL_S": "-1"}, "CLASSIFIER_REGISTRY_POLL_S"),
        ({"CLASSIFIER_SHADOW_RATE": "2"}, "CLASSIFIER_SHADOW_RATE"),
        ({"CLASSIFIER_SHADOW_ALIAS": "champion"}, "CLASSIFIER_SHADOW_ALIAS"),
    ]:
        with pytest.raises(ValueError, match=match):
            ServiceConfig.from_env(env)


# --- request size limit ----------------------------------------------------------------------------

def _call(app, headers, chunks):
    sent = []
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": headers}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


async def _reading_app(scope, receive, send):
    total = 0
    try:
        while True:
            message = await receive()
            total += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        status, body = 200, str(total).encode()
    except Exception:
        status, body = 500, b"app saw an error"
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_limit_passes_small_bodies():
    app = RequestSizeLimitMiddleware(_reading_app, max_bytes=1000)
    assert _call(app, [(b"content-length", b"600")], [b"x" * 300, b"x" * 300]) == (200, b"600")
    assert _call(app, [], [b"x" * 1000]) == (200, b"1000")


def test_limit_refuses_declared_length_without_reading():
    app = RequestSizeLimitMiddleware(_reading_app, max_bytes=1000)
    status, body = _call(app, [(b"content-length", b"1001")], [b"x" * 1001])
    assert status == 413 and json.loads(body)["reason"] == "body_too_large"
    assert _call(app, [(b"content-length", b"nope")], [b""])[0] == 400


def test_limit_refuses_streamed_bodies_and_hides_the_apps_error():
    app = RequestSizeLimitMiddleware(_reading_app, max_bytes=1000)
    status, body = _call(app, [], [b"x" * 600, b"x" * 600])
    assert status == 413 and json.loads(body)["limit_bytes"] == 1000


# --- execution providers ---------------------------------------------------------------------------

def test_resolve_providers():
    from service.engine import ProviderError, resolve_providers

    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert resolve_providers("auto", [cuda, cpu], gpu=False) == ([cpu], False)
    assert resolve_providers("auto", [cuda, cpu], gpu=True) == ([cuda, cpu], False)
    assert resolve_providers("auto", [cpu], gpu=True) == ([cpu], False)
    assert resolve_providers("cpu", [cpu]) == ([cpu], True)
    assert resolve_providers("CUDA", [cuda, cpu]) == ([cuda, cpu], False)  # falls back to CPU (loudly)
    assert resolve_providers("cuda", [cpu]) == ([cuda, cpu], False)  # even without the CUDA provider
    assert resolve_providers("cuda-only", [cuda, cpu]) == ([cuda, cpu], True)
    assert resolve_providers(f"{cuda}, {cpu}", [cuda, cpu]) == ([cuda, cpu], True)
    with pytest.raises(ProviderError):
        resolve_providers("cuda-only", [cpu])
    with pytest.raises(ProviderError):
        resolve_providers("TensorrtExecutionProvider", [cpu])


# --- connection recycling ----------------------------------------------------------------------------

def _response_headers(app, scope_extra=None):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "http_version": "1.1", **(scope_extra or {})}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return dict(start["headers"])


async def _ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"connection", b"keep-alive")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_connection_recycling_closes_about_one_in_every_n_responses():
    draws = iter([0.9, 0.04, 0.5, 0.049, 0.051])
    app = ConnectionRecycleMiddleware(_ok_app, every=20, rng=lambda: next(draws))  # closes when draw < 0.05
    closes = [_response_headers(app).get(b"connection") for _ in range(5)]
    assert closes == [b"keep-alive", b"close", b"keep-alive", b"close", b"keep-alive"]  # one header, never two
    never = ConnectionRecycleMiddleware(_ok_app, every=0, rng=lambda: 0.0)
    assert _response_headers(never)[b"connection"] == b"keep-alive"
    h2 = ConnectionRecycleMiddleware(_ok_app, every=1, rng=lambda: 0.0)  # HTTP/2 has no Connection header
    assert _response_headers(h2, {"http_version": "2"})[b"connection"] == b"keep-alive"


# --- BentoML's timeout middleware, patched (service.patches) ----------------------------------------------

def _timeout_middleware(app, timeout):
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from service.patches import patch_timeout_middleware

    assert patch_timeout_middleware()
    return TimeoutMiddleware(app, timeout=timeout)


def test_patched_timeout_middleware_cancels_its_timer_per_request():
    middleware = _timeout_middleware(_ok_app, timeout=30)

    async def main():
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        for _ in range(50):
            await middleware({"type": "http", "path": "/"}, receive, send)
        loop = asyncio.get_running_loop()
        # BentoML's own version leaves one live 30 s timer (holding the request's context) per request
        return [h for h in loop._scheduled if not h.cancelled()], sent

    live, sent = asyncio.run(main())
    assert live == [] and sum(m["type"] == "http.response.start" for m in sent) == 50


def test_patched_timeout_middleware_answers_504_in_the_api_error_shape():
    async def slow_app(scope, receive, send):
        await asyncio.sleep(5)

    status, body = _call(_timeout_middleware(slow_app, timeout=0.05), [], [b""])
    assert status == 504
    assert json.loads(body)["reason"] == "timeout" and "CLASSIFIER_REQUEST_TIMEOUT_S" in json.loads(body)["error"]


def test_prediction_responses_are_the_json_starlette_would_send():
    """orjson renders the same JSON as Starlette's JSONResponse (compact json.dumps, UTF-8): the same
    values, float for float (both write shortest round-trip floats; orjson spells 2.2e-05 as
    0.000022), key order and non-ASCII labels."""
    from starlette.responses import JSONResponse

    from service.postprocessing import predictions
    from service.service import PredictionsResponse

    logits = np.random.default_rng(0).normal(scale=30, size=(64, 10)).astype(np.float32)
    for classes in ([str(i) for i in range(10)], ["T-shirt/top", "Trouser", "Ärmel", "靴", "ß\"q\\", *"abcde"]):
        body = predictions(logits, classes, 5)
        ours, starlettes = PredictionsResponse(body).body, JSONResponse(body).body
        assert json.loads(ours) == json.loads(starlettes) == body
        assert [list(p) for p in json.loads(ours)] == [list(p) for p in body]  # key order
        assert "靴".encode() in ours or "靴" not in classes
