"""bench/smoke.py (standard library only) against the session's real server, and against nothing."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import svc_images
from tests.harness import REPO, free_port

pytestmark = [pytest.mark.integration]
SMOKE = REPO / "bench" / "smoke.py"


def smoke(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    # -I: isolated mode, so the script cannot lean on the project's packages or PYTHONPATH
    return subprocess.run([sys.executable, "-I", str(SMOKE), *args], capture_output=True, text=True, timeout=timeout)


def test_smoke_passes_against_the_server(server):
    proc = smoke(server.url + "/", "--timeout", "20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ("GET /livez", "GET /readyz", "GET /metadata", "POST /classify"):
        assert f"PASS  {name}" in out
    assert "image-classifier version 7 alias champion" in out and server.tag in out
    assert "generated 28x28 gray digit '1'" in out and "server " in out
    assert out.rstrip().endswith("OK: 4 checks passed")


def test_smoke_with_an_image_and_expected_label(server, mnist, tmp_path):
    path = tmp_path / "seven.png"
    path.write_bytes(svc_images.encode(Image.fromarray(mnist.test_images[0]), "PNG"))
    label = str(mnist.test_labels[0])
    ok = smoke(server.url, "--image", str(path), "--expect-label", label)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"-> {label} (" in ok.stdout
    wrong = smoke(server.url, "--image", str(path), "--expect-label", "not-a-class")
    assert wrong.returncode == 1 and "expected 'not-a-class'" in wrong.stdout


def test_smoke_reports_api_errors(server, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    proc = smoke(server.url, "--image", str(path))
    assert proc.returncode == 1
    line = next(l for l in proc.stdout.splitlines() if "POST /classify" in l)
    assert line.lstrip().startswith("FAIL") and "HTTP 4" in line and "reason=" in line and "file=notes.txt" in line
    assert "FAILED: 1 of 4 checks failed" in proc.stdout
    missing = smoke(server.url, "--image", str(tmp_path / "absent.png"))
    assert missing.returncode == 1 and "cannot read --image" in missing.stdout


def test_smoke_fails_fast_when_nothing_listens():
    started = time.monotonic()
    proc = smoke(f"http://127.0.0.1:{free_port()}", "--timeout", "2")
    assert proc.returncode == 1
    assert proc.stdout.count("  FAIL  ") == 4 and "cannot reach" in proc.stdout
    assert time.monotonic() - started < 30


def test_smoke_usage_errors():
    assert smoke("localhost:3000").returncode == 2
    assert smoke("http://localhost:3000", "--timeout", "0").returncode == 2


def test_generated_digit_is_a_valid_png():
    sys.path.insert(0, str(SMOKE.parent))
    try:
        import smoke as smoke_module
    finally:
        sys.path.remove(str(SMOKE.parent))
    import io

    for channels, mode in ((1, "L"), (3, "RGB")):
        img = Image.open(io.BytesIO(smoke_module.png_bytes(smoke_module.digit_pixels(32), channels)))
        img.load()
        arr = np.asarray(img)
        assert img.mode == mode and img.size == (32, 32) and arr.max() == 255 and arr.min() == 0
