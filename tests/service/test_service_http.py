"""Integration tests against ONE real `bentoml serve service.service:Classifier` (see conftest.server)."""
from __future__ import annotations

import asyncio
import base64
import re
import time

import numpy as np
import pytest
from PIL import Image

import svc_images
from svc_support import SERVER_ENV, per_model
from service.engine import OnnxClassifier
from service.contract import softmax
from service.preprocessing import preprocess_batch
from svc_support import cuda_usable, requires_gpu

httpx = pytest.importorskip("httpx")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_IMAGES = int(SERVER_ENV["CLASSIFIER_MAX_IMAGES"])
MAX_BYTES = int(SERVER_ENV["CLASSIFIER_MAX_REQUEST_BYTES"])
MAX_PIXELS = int(SERVER_ENV["CLASSIFIER_MAX_IMAGE_PIXELS"])
TOP_K = int(SERVER_ENV["CLASSIFIER_TOP_K"])
FIGURES: dict[str, object] = {}


def png(arr: np.ndarray) -> bytes:
    return svc_images.encode(Image.fromarray(arr), "PNG")


def files(*items: tuple[str, bytes]) -> list:
    return [("images", (name, data, "application/octet-stream")) for name, data in items]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def offline(tiny_onnx_model):
    return OnnxClassifier(tiny_onnx_model, providers="cpu", intra_op_threads=1)


def assert_alive(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


def parse_batch_stats(metrics_text: str) -> dict[str, float]:
    """Sum the service's micro-batch histogram (``classifier_batch_size``) over its label sets.

    ``calls``: model calls (histogram count); ``merged``: images they served (histogram sum: the
    images of every request merged into each call); ``singles``: calls that served one image.
    """
    stats = {"calls": 0.0, "merged": 0.0, "singles": 0.0}
    for line in metrics_text.splitlines():
        if not line.startswith("classifier_batch_size_"):
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("classifier_batch_size_count"):
            stats["calls"] += value
        elif line.startswith("classifier_batch_size_sum"):
            stats["merged"] += value
        elif line.startswith("classifier_batch_size_bucket") and 'le="1.0"' in line:
            stats["singles"] += value
    return stats


def adaptive_batch_stats(client) -> dict[str, float]:
    return parse_batch_stats(client.get("/metrics").text)


# --- health, docs, metadata ------------------------------------------------------------------------

def test_health_docs_and_metrics(client, server):
    assert_alive(client)
    paths = client.get("/docs.json").json()["paths"]
    assert {"/classify", "/classify_base64", "/metadata"} <= set(paths)
    assert "multipart/form-data" in paths["/classify"]["post"]["requestBody"]["content"]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "bentoml_" in metrics.text
    FIGURES["server_startup_s"] = round(server.startup_s, 1)


def test_metadata(client, server):
    meta = client.get("/metadata").json()
    assert per_model(client.post("/metadata").json()) == per_model(meta)
    assert meta["model_name"] == "image-classifier" and meta["model_tag"] == server.tag
    assert (meta["registry_version"], meta["registry_alias"], meta["mlflow_run_id"]) == ("7", "champion", "test-run-0000")
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["input_shape"] == [None, 1, 28, 28]
    assert meta["normalization"]["mean"] == [0.1307] and meta["normalization"]["std"] == [0.3081]
    assert meta["resize"] == "bilinear" and meta["top_k_default"] == TOP_K
    assert meta["limits"]["max_images"] == MAX_IMAGES
    expected = "CUDAExecutionProvider" if cuda_usable() else "CPUExecutionProvider"
    assert meta["execution_providers"][0] == expected
    assert re.search(r"ACTIVE \['" + expected, server.log())  # the startup log names the active providers


# --- correctness -------------------------------------------------------------------------------------

def test_http_accuracy_equals_offline_onnxruntime(client, mnist, offline):
    n = 320
    images = [png(a) for a in mnist.test_images[:n]]
    labels = mnist.test_labels[:n]
    started = time.perf_counter()
    got = []
    for i in range(0, n, MAX_IMAGES):
        chunk = images[i:i + MAX_IMAGES]
        resp = client.post("/classify", files=files(*((f"t{i + j}.png", d) for j, d in enumerate(chunk))))
        assert resp.status_code == 200, resp.text
        got += [p["index"] for p in resp.json()]
    elapsed = time.perf_counter() - started
    http_pred = np.array(got)
    offline_pred = offline.logits(preprocess_batch(images, offline.spec)).argmax(1)
    np.testing.assert_array_equal(http_pred, offline_pred)
    http_acc = float((http_pred == labels).mean())
    assert http_acc == float((offline_pred == labels).mean()) and http_acc > 0.9
    FIGURES["http_accuracy_320"] = http_acc
    FIGURES["sequential_32_image_requests_img_per_s"] = round(n / elapsed)


def test_preprocessing_parity_across_formats(client, offline):
    """Same pixels through HTTP and through service.preprocessing + onnxruntime give the same probabilities."""
    samples = svc_images.sample_images()
    names = sorted(samples)[:MAX_IMAGES]
    big = svc_images.encode(svc_images.rgb_image(300, 200), "JPEG", quality=90)
    items = [(name, samples[name]) for name in names] + [("big.jpg", big)]
    items = items[:MAX_IMAGES]
    resp = client.post("/classify", files=files(*items), data={"top_k": "10"})
    assert resp.status_code == 200, resp.text
    http_probs = np.zeros((len(items), 10))
    for row, pred in enumerate(resp.json()):
        assert len(pred["top_k"]) == 10
        assert pred["index"] == pred["top_k"][0]["index"] and pred["label"] == str(pred["index"])
        for entry in pred["top_k"]:
            http_probs[row, entry["index"]] = entry["score"]
    expected = softmax(offline.logits(preprocess_batch([d for _, d in items], offline.spec)))
    np.testing.assert_allclose(http_probs, expected, atol=1e-5)
    np.testing.assert_allclose(http_probs.sum(1), 1.0, atol=1e-5)


def test_response_shape_order_and_default_top_k(client, mnist):
    order = [3, 0, 1, 2]  # digits 0, 7, 2, 1 in MNIST test order
    resp = client.post("/classify", files=files(*((f"d{i}.png", png(mnist.test_images[i])) for i in order)))
    body = resp.json()
    assert resp.status_code == 200 and isinstance(body, list) and len(body) == 4
    assert [p["label"] for p in body] == [str(mnist.test_labels[i]) for i in order]
    for p in body:
        assert set(p) == {"label", "index", "score", "top_k"} and len(p["top_k"]) == TOP_K
        assert 0 < p["score"] <= 1 and p["top_k"][0] == {"label": p["label"], "index": p["index"], "score": p["score"]}
        assert all(a["score"] >= b["score"] for a, b in zip(p["top_k"], p["top_k"][1:]))


def test_base64_endpoint_matches_multipart(client, mnist):
    data = [png(mnist.test_images[i]) for i in range(3)]
    multipart = client.post("/classify", files=files(*((f"{i}.png", d) for i, d in enumerate(data)))).json()
    encoded = [base64.b64encode(d).decode() for d in data]
    encoded[1] = "data:image/png;base64," + encoded[1]
    encoded[2] = base64.urlsafe_b64encode(data[2]).decode().rstrip("=")
    resp = client.post("/classify_base64", json={"images": encoded})
    assert resp.status_code == 200, resp.text
    assert resp.json() == multipart
    assert len(client.post("/classify_base64", json={"images": encoded[:1], "top_k": 1}).json()[0]["top_k"]) == 1


def test_every_format_and_mode_is_accepted(client):
    samples = svc_images.sample_images()
    resp = client.post("/classify", files=files(*((f"{k}.img", v) for k, v in sorted(samples.items()))))
    assert resp.status_code == 200, resp.text
    assert len(resp.json()) == len(samples)


def test_sync_http_client(server, tmp_path, mnist):
    import bentoml

    paths = []
    for i in range(2):
        path = tmp_path / f"digit{i}.png"
        path.write_bytes(png(mnist.test_images[i]))
        paths.append(path)
    with bentoml.SyncHTTPClient(server.url) as c:
        result = c.classify(images=paths, top_k=2)
        assert [r["label"] for r in result] == [str(mnist.test_labels[0]), str(mnist.test_labels[1])]
        assert len(result[0]["top_k"]) == 2
        b64 = c.classify_base64(images=[base64.b64encode(paths[0].read_bytes()).decode()])
        assert b64[0]["label"] == result[0]["label"]
        assert c.metadata()["registry_alias"] == "champion"


# --- bad input: never a 5xx, always JSON naming the file and the reason -----------------------------

GOOD = png(np.zeros((28, 28), np.uint8))


def _bad_cases():
    big_real = svc_images.encode(Image.new("L", (2000, MAX_PIXELS // 2000 + 1)), "PNG")
    unsupported = svc_images.unsupported_images()
    b64 = lambda d: base64.b64encode(d).decode()  # noqa: E731
    return {
        # name: (route, request kwargs, status, reason, file)
        "empty_file": ("/classify", {"files": files(("empty.png", b""))}, 400, "empty", "empty.png"),
        "not_an_image": ("/classify", {"files": files(("notes.txt", b"just some text\n" * 20))}, 415, "not_an_image", "notes.txt"),
        "truncated_png": ("/classify", {"files": files(("cut.png", svc_images.truncated(svc_images.encode(svc_images.rgb_image(200, 150), "PNG"))))}, 400, "truncated", "cut.png"),
        "truncated_jpeg": ("/classify", {"files": files(("cut.jpg", svc_images.truncated(svc_images.encode(svc_images.rgb_image(200, 150), "JPEG"))))}, 400, "truncated", "cut.jpg"),
        "corrupt_png": ("/classify", {"files": files(("crc.png", svc_images.corrupt_png_crc(GOOD)))}, 400, "corrupt", "crc.png"),
        "unsupported_ico": ("/classify", {"files": files(("icon.ico", unsupported["ico"]))}, 415, "unsupported_format", "icon.ico"),
        "unsupported_ppm": ("/classify", {"files": files(("pic.ppm", unsupported["ppm"]))}, 415, "unsupported_format", "pic.ppm"),
        "decompression_bomb": ("/classify", {"files": files(("bomb.png", svc_images.png_bomb()))}, 413, "too_many_pixels", "bomb.png"),
        "over_pixel_limit": ("/classify", {"files": files(("huge.png", big_real))}, 413, "too_many_pixels", "huge.png"),
        "one_bad_among_good": ("/classify", {"files": files(("a.png", GOOD), ("b.png", b"\x00\x01"), ("c.png", GOOD))}, 415, "not_an_image", "b.png"),
        "too_many_images": ("/classify", {"files": files(*((f"{i}.png", GOOD) for i in range(MAX_IMAGES + 1)))}, 413, "too_many_images", None),
        "body_too_large": ("/classify", {"files": files(("big.png", b"\x89PNG" + bytes(MAX_BYTES)))}, 413, "body_too_large", None),
        # httpx puts form fields before files: the text "images" field comes first
        "text_instead_of_file": ("/classify", {"data": {"images": "http://example.com/cat.png"}, "files": files(("a.png", GOOD))}, 400, "not_a_file", "images[0]"),
        "unexpected_field": ("/classify", {"files": [("image", ("x.png", GOOD, "image/png"))]}, 400, "unexpected_field", None),
        "form_urlencoded": ("/classify", {"data": {"images": "x"}}, 415, "unsupported_media_type", None),
        "no_body": ("/classify", {"headers": {"content-type": "multipart/form-data; boundary=xyz"}, "content": b"--xyz--\r\n"}, 400, "no_images", None),
        "malformed_multipart": ("/classify", {"headers": {"content-type": "multipart/form-data"}, "content": b"garbage"}, 400, "bad_multipart", None),
        "json_to_multipart_route": ("/classify", {"json": {"images": [b64(GOOD)]}}, 415, "unsupported_media_type", None),
        "bad_top_k": ("/classify", {"files": files(("a.png", GOOD)), "data": {"top_k": "0"}}, 400, "bad_top_k", None),
        "b64_invalid": ("/classify_base64", {"json": {"images": [b64(GOOD), "not base64!!"]}}, 400, "bad_base64", "images[1]"),
        "b64_not_image": ("/classify_base64", {"json": {"images": [b64(b"plain text, not an image")]}}, 415, "not_an_image", "images[0]"),
        "b64_empty_list": ("/classify_base64", {"json": {"images": []}}, 400, "no_images", None),
        "b64_too_many": ("/classify_base64", {"json": {"images": [b64(GOOD)] * (MAX_IMAGES + 1)}}, 413, "too_many_images", None),
        "b64_bad_json": ("/classify_base64", {"headers": {"content-type": "application/json"}, "content": b"{not json"}, 400, "bad_json", None),
        "b64_wrong_shape": ("/classify_base64", {"json": ["a", "b"]}, 400, "bad_json", None),
        "b64_multipart": ("/classify_base64", {"files": files(("a.png", GOOD))}, 415, "unsupported_media_type", None),
    }


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_a_clear_4xx(client, case):
    route, kwargs, status, reason, file = BAD_CASES[case]
    resp = client.post(route, **kwargs)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["reason"] == reason and body["status"] == status and body["error"]
    if file is not None:
        assert body["file"] == file
    assert_alive(client)


def test_streamed_body_over_the_limit(client):
    """No Content-Length (chunked upload): counted while streaming, still a 413."""
    payload = (b"--xyz\r\nContent-Disposition: form-data; name=\"images\"; filename=\"big.png\"\r\n\r\n"
               + bytes(MAX_BYTES + 1000) + b"\r\n--xyz--\r\n")
    chunks = (payload[i:i + 65536] for i in range(0, len(payload), 65536))
    resp = client.post("/classify", content=chunks, headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert resp.status_code == 413 and resp.json()["reason"] == "body_too_large"
    assert_alive(client)


def test_other_methods_and_internal_formats_are_refused(client):
    assert client.get("/classify").status_code == 405
    resp = client.post("/classify", content=b"\x80\x05.", headers={"content-type": "application/vnd.bentoml+pickle"})
    assert resp.status_code == 415
    assert_alive(client)


# --- batching and overload ---------------------------------------------------------------------------

def test_many_images_in_one_request_are_one_model_call(client):
    before = adaptive_batch_stats(client)
    resp = client.post("/classify", files=files(*((f"{i}.png", GOOD) for i in range(MAX_IMAGES))))
    assert resp.status_code == 200 and len(resp.json()) == MAX_IMAGES
    after = adaptive_batch_stats(client)
    assert after["calls"] - before["calls"] == 1


def test_concurrent_requests_are_batched(server, mnist):
    """Single-image requests from 12 concurrent clients are merged into shared model calls."""
    images = [png(mnist.test_images[i]) for i in range(12)]

    async def main():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            before = parse_batch_stats((await c.get("/metrics")).text)
            codes: list[int] = []

            async def worker(k):
                for _ in range(8):
                    r = await c.post("/classify", files=files((f"{k}.png", images[k])))
                    codes.append(r.status_code)

            started = time.perf_counter()
            await asyncio.gather(*(worker(k) for k in range(12)))
            elapsed = time.perf_counter() - started
            after = parse_batch_stats((await c.get("/metrics")).text)
            return codes, before, after, elapsed

    codes, before, after, elapsed = asyncio.run(main())
    assert codes.count(200) == len(codes) == 96, sorted(set(codes))
    calls = after["calls"] - before["calls"]
    merged = after["merged"] - before["merged"]
    assert merged == 96 and calls < merged  # some model calls served several requests
    FIGURES["concurrent_12x8_single_image_req_per_s"] = round(96 / elapsed, 1)
    FIGURES["concurrent_requests_per_model_call"] = round(merged / calls, 2)
    FIGURES["concurrent_model_calls_of_size_1"] = int(after["singles"] - before["singles"])


def test_overload_answers_429_never_hangs(server, client):
    """More simultaneous requests than CLASSIFIER_MAX_CONCURRENCY: the excess gets 429 at once."""
    heavy = svc_images.encode(svc_images.rgb_image(400, 400), "JPEG", quality=90)
    body = files(*((f"{i}.jpg", heavy) for i in range(MAX_IMAGES)))
    n = 4 * int(SERVER_ENV["CLASSIFIER_MAX_CONCURRENCY"])

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=n + 4)) as c:
            return await asyncio.gather(*(c.post("/classify", files=body) for _ in range(n)))

    started = time.perf_counter()
    responses = asyncio.run(main())
    elapsed = time.perf_counter() - started
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429, 503}, sorted(set(codes))
    assert 429 in codes and 200 in codes
    for r in responses:
        if r.status_code != 200:
            assert r.json()["error"]
    assert elapsed < 60
    FIGURES["overload_codes"] = {c: codes.count(c) for c in sorted(set(codes))}
    assert_alive(client)


@pytest.mark.gpu
@requires_gpu
def test_gpu_provider_is_active(client):
    assert client.get("/metadata").json()["execution_providers"][0] == "CUDAExecutionProvider"


def test_overload_is_a_clear_503(tmp_path):
    """A second server, with a model slow enough (~1 ms+ per image) for requests to queue behind it and
    a 5 ms queueing budget: the micro-batcher refuses what it predicts will wait longer, as 503 + JSON."""
    from conftest import build_slow_onnx_model
    from svc_support import serve, store_test_model

    home = tmp_path / "bentoml_home"
    tag = store_test_model(build_slow_onnx_model(tmp_path / "slow.onnx"), home)
    env = {"CLASSIFIER_MAX_LATENCY_MS": "5", "CLASSIFIER_MAX_CONCURRENCY": "500"}
    data = png(np.zeros((28, 28), np.uint8))
    with serve(home, tmp_path / "tight.log", tag, env) as tight:
        async def main():
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(base_url=tight.url, timeout=60, limits=limits) as c:
                results = []
                for _ in range(3):  # the batcher learns its per-image time from the first calls
                    results += await asyncio.gather(*(c.post("/classify", files=files(*[("a.png", data)] * 8)) for _ in range(96)))
                    if any(r.status_code == 503 for r in results):
                        break
                return results, (await c.get("/livez")).status_code

        responses, livez = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 503 in codes, sorted(set(codes))
    shed = next(r for r in responses if r.status_code == 503)
    assert shed.json()["reason"] == "overloaded" and shed.headers["retry-after"] == "1"
    assert livez == 200
    FIGURES["tight_latency_budget_codes"] = {c: codes.count(c) for c in sorted(set(codes))}


def test_zz_report_figures(server, client, capsys):
    """Print what was measured (run with -s to see it) and check the server outlived everything."""
    assert_alive(client)
    assert server.proc.poll() is None
    assert "status=500" not in server.log()  # no request of the whole session got a 500
    with capsys.disabled():
        print("\nservice figures:", FIGURES)
