"""`imgcls predict` against the real service: the same labels and scores for every file, over HTTP and
offline; and `imgcls serve` starts that service.

The folder is real MNIST test digits written as PNGs in ImageFolder layout (class subfolders), plus a
blank page (a digit model refuses it: 422 ``no_ink`` over HTTP, the same reason offline) and a file that
is not an image. ``digit_server`` serves ``digit_onnx_model``; predict runs that same ONNX file.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.harness import bentoml_env, free_port, mnist_image_folder, running

pytestmark = [pytest.mark.slow, pytest.mark.integration]
IMGCLS = str(Path(sys.executable).with_name("imgcls"))
PER_CLASS = 30


@pytest.fixture(scope="module")
def digit_folder(mnist, tmp_path_factory) -> Path:
    root = mnist_image_folder(mnist, tmp_path_factory.mktemp("mnist-png") / "digits", PER_CLASS)
    Image.new("L", (28, 28), 235).save(root / "3" / "blank-page.png")
    (root / "5" / "notes.png").write_text("not an image")
    return root


def imgcls(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([IMGCLS, *args], capture_output=True, text=True, timeout=timeout)


def http_answers(server, files: list[Path]) -> dict[str, dict]:
    """Each file alone over HTTP: its prediction, or its error entry."""
    import httpx

    out = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path in files:
            resp = client.post("/classify", files=[("images", (path.name, path.read_bytes()))], data={"top_k": "3"})
            out[str(path)] = resp.json()[0] if resp.status_code == 200 else {"status": resp.status_code, **resp.json()}
    return out


def test_predict_gives_the_services_labels_and_scores_for_every_file(digit_server, digit_onnx_model, digit_folder, tmp_path):
    out = tmp_path / "predictions.jsonl"
    done = imgcls("predict", str(digit_folder), "--model", str(digit_onnx_model), "-o", str(out), "--top-k", "3",
                  "--batch-size", "64", "--metrics", str(tmp_path / "metrics.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["path"]: row for row in map(json.loads, out.read_text().splitlines())}
    files = sorted(p for p in digit_folder.rglob("*.png"))
    assert sorted(rows) == sorted(map(str, files))
    served = http_answers(digit_server, files)
    for path, row in rows.items():
        answer = served[path]
        if "label" not in answer:  # the service refused it: predict skipped it, for the same reason
            assert row.get("reason") == answer["reason"] and "label" not in row, (path, row, answer)
            continue
        assert row["label"] == answer["label"], (path, row, answer)
        assert [t["label"] for t in row["top_k"]] == [t["label"] for t in answer["top_k"]], path
        assert np.allclose([t["score"] for t in row["top_k"]], [t["score"] for t in answer["top_k"]], atol=1e-5), path
    assert rows[str(digit_folder / "3" / "blank-page.png")]["reason"] == "no_ink"
    assert rows[str(digit_folder / "5" / "notes.png")]["reason"] == "not_an_image"
    assert "skipped" in done.stderr and "notes.png" in done.stderr  # reported per file, the run went on
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["classified"] == 10 * PER_CLASS and metrics["skipped"] == 2
    right = sum(row["label"] == row["true_label"] for row in rows.values() if "label" in row)
    assert metrics["accuracy"] == right / metrics["labelled"] > 0.8
    assert "accuracy" in done.stdout and "true/pred" in done.stdout  # the confusion matrix, on stdout with -o


def test_imgcls_serve_starts_the_service_and_rejects_a_bad_port(bento_home, digit_folder, tmp_path):
    import httpx

    home, _ = bento_home
    bad = imgcls("serve", "--port", "70000")
    assert bad.returncode == 2 and "70000" in bad.stderr
    port = free_port()
    env = {**bentoml_env(home), "CLASSIFIER_REGISTRY_POLL_S": "0", "CLASSIFIER_WORKERS": "1"}
    with running([IMGCLS, "serve", "--host", "127.0.0.1", "--port", str(port)], port, env, tmp_path / "serve.log") as srv:
        digit = next((digit_folder / "7").glob("*.png"))
        resp = httpx.post(f"{srv.url}/classify", files=[("images", (digit.name, digit.read_bytes()))], timeout=30)
        assert resp.status_code == 200 and resp.json()[0]["label"] in [str(i) for i in range(10)]
