"""Digits as people send them, over real HTTP to a model declaring ``input_transform: digit``
(conftest.digit_server), and a model from before the key (conftest.server) served as before.

The photos are MNIST test digits rendered as dark ink on uneven, grainy paper, off-centre, as
JPEG and PNG (tests/test_input_transform.on_paper); bench/real_inputs.py measures the same over a
larger corpus."""
from __future__ import annotations

import numpy as np
import pytest
import svc_images
from PIL import Image
from test_service_http import files

from service.contract import normalize, softmax
from service.engine import OnnxClassifier
from service.preprocessing import (
    decode_image,
    preprocess_batch,
    resize_image,
    to_chw_uint8,
)
from tests.test_input_transform import on_paper

httpx = pytest.importorskip("httpx")
pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def digits(digit_server):
    with httpx.Client(base_url=digit_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def photos(mnist) -> list[tuple[str, bytes, int]]:
    """16 MNIST test digits photographed on paper: (name, bytes, label)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(16):
        img = on_paper(mnist.test_images[i], rng, canvas=(int(rng.integers(300, 1400)), int(rng.integers(300, 1000))),
                       height=int(rng.integers(60, 280)), gradient=float(rng.uniform(0, 60)))
        fmt = "JPEG" if i % 2 else "PNG"
        data = svc_images.encode(img.convert("RGB") if i % 4 == 1 else img, fmt, **({"quality": 75} if i % 2 else {}))
        out.append((f"photo{i}.{fmt.lower()}", data, int(mnist.test_labels[i])))
    return out


def scores(body: list[dict], classes: int = 10) -> np.ndarray:
    out = np.zeros((len(body), classes))
    for row, pred in enumerate(body):
        for entry in pred["top_k"]:
            out[row, entry["index"]] = entry["score"]
    return out


def test_metadata_declares_the_transform(digits, server):
    assert digits.get("/metadata").json()["input_transform"] == "digit"
    with httpx.Client(base_url=server.url, timeout=30) as old:
        assert old.get("/metadata").json()["input_transform"] == "resize"


def test_photos_of_digits_on_paper_are_read_right(digits, photos, digit_onnx_model):
    resp = digits.post("/classify", files=files(*((n, d) for n, d, _ in photos)), data={"top_k": "10"})
    assert resp.status_code == 200, resp.text
    labels = np.array([label for *_, label in photos])
    got = np.array([p["index"] for p in resp.json()])
    assert (got == labels).mean() >= 14 / 16, list(zip(got, labels))
    # the service's pixels are service.preprocessing's: the same probabilities offline
    offline = OnnxClassifier(digit_onnx_model, providers="cpu", intra_op_threads=1)
    expected = softmax(offline.logits(preprocess_batch([d for _, d, _ in photos], offline.spec)))
    np.testing.assert_allclose(scores(resp.json()), expected, atol=1e-5)


def test_the_model_that_predates_the_key_misreads_them_as_before(server, photos, tiny_onnx_model):
    """The old-contract model is served unchanged: squashed pixels, its old (poor) answers."""
    with httpx.Client(base_url=server.url, timeout=60) as old:
        resp = old.post("/classify", files=files(*((n, d) for n, d, _ in photos)), data={"top_k": "10"})
    assert resp.status_code == 200, resp.text
    offline = OnnxClassifier(tiny_onnx_model, providers="cpu", intra_op_threads=1)
    squashed = np.stack([to_chw_uint8(resize_image(decode_image(d, 1, draft_to=112), 28)) for _, d, _ in photos])
    expected = softmax(offline.logits(normalize(squashed, offline.spec.mean, offline.spec.std)))
    np.testing.assert_allclose(scores(resp.json()), expected, atol=1e-5)


@pytest.mark.parametrize("blank", ["white", "black", "paper", "noise"])
def test_a_blank_image_is_a_422_no_ink_never_a_digit(digits, blank):
    rng = np.random.default_rng(1)
    arrays = {
        "white": np.full((400, 300), 255, np.uint8), "black": np.zeros((28, 28), np.uint8),
        "paper": np.clip(225 - np.linspace(0, 40, 640)[None, :] + rng.normal(0, 4, (480, 640)), 0, 255),
        "noise": rng.integers(0, 256, (100, 100)),
    }
    data = svc_images.encode(Image.fromarray(arrays[blank].astype(np.uint8)), "JPEG" if blank == "paper" else "PNG")
    resp = digits.post("/classify", files=files((f"{blank}.png", data)))
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["reason"] == "no_ink" and "no ink found" in body["error"]
    assert body["errors"] == [{"index": 0, "file": f"{blank}.png", "reason": "no_ink", "status": 422,
                               "error": body["errors"][0]["error"]}]


def test_a_blank_among_digits_names_the_blank(digits, photos):
    blank = svc_images.encode(Image.new("L", (64, 64), 250), "PNG")
    items = [(n, d) for n, d, _ in photos[:3]] + [("empty-page.png", blank)]
    resp = digits.post("/classify", files=files(*items))
    assert resp.status_code == 422
    assert [(e["index"], e["file"], e["reason"]) for e in resp.json()["errors"]] == [(3, "empty-page.png", "no_ink")]
    assert digits.get("/readyz").status_code == 200
