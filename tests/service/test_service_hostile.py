"""Hostile input: property-based tests of the preprocessing, schemathesis against the real server's
OpenAPI document, and uploads whose file names or extra fields try to reach the filesystem or pick
the model.

- preprocessing (hypothesis, no server): any image (1x1 .. ~1 MP, every Pillow mode the contract
  names, every accepted format), any bytes and any mutation of a valid file either give
  ``uint8 [C, size, size]`` or raise :class:`ImageError`, never anything else, and deterministically;
- schemathesis (``st run`` CLI on the session server's ``/docs.json``): no 5xx on any operation;
- file names / request-chosen paths: see the last section.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hypothesis")  # dev extra (pyproject [dev]); schemathesis is checked in its test
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

import svc_images
from svc_support import per_model
from service.preprocessing import RESAMPLE_FILTERS, ImageError, image_to_array
from tests.harness import REPO

#: HOSTILE_MAX_EXAMPLES=2000 for a longer hunt; the default keeps the three properties at a few seconds
PROPERTY_SETTINGS = settings(max_examples=int(os.environ.get("HOSTILE_MAX_EXAMPLES", "80")), deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- preprocessing: arbitrary images ----------------------------------------------------------------

#: the modes the issue lists; bytes per pixel for Image.frombytes ("1" is packed 8 pixels per byte)
MODES = {"1": None, "L": 1, "LA": 2, "P": 1, "PA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "I;16": 2, "I": 4, "F": 4}
FORMATS = {
    "PNG": {},
    "JPEG": {"quality": 90},
    "WEBP": {"lossless": True},
    "WEBP-lossy": {"quality": 80},
    "BMP": {},
    "TIFF": {},
    "TIFF-deflate": {"compression": "tiff_deflate"},
    "GIF": {},
}


def make_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """Random pixels (random palette for P/PA; random float32 bit patterns, NaN/inf included, for F)."""
    rng = np.random.default_rng(seed)
    nbytes = ((width + 7) // 8) * height if mode == "1" else width * height * MODES[mode]
    img = Image.frombytes(mode, (width, height), rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    if mode in ("P", "PA"):
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return img


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt.split("-")[0], **FORMATS[fmt])
    return buf.getvalue()


@lru_cache(maxsize=None)
def formats_for(mode: str) -> tuple[str, ...]:
    """The formats this Pillow can write an image of ``mode`` in (probed once on a 3x2 image)."""
    ok = []
    for fmt in FORMATS:
        try:
            encode(make_image(mode, 3, 2, 0), fmt)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        ok.append(fmt)
    return tuple(ok)


def sizes() -> st.SearchStrategy[tuple[int, int]]:
    small = st.tuples(st.integers(1, 64), st.integers(1, 64))
    large = st.tuples(st.integers(1, 4000), st.integers(1, 4000)).filter(lambda wh: wh[0] * wh[1] <= 1_000_000)
    return st.one_of(small, small, large)


def outcome(data: bytes, **kwargs):
    """``("ok", array)`` or ``("error", reason)``; any other exception propagates (and fails the test)."""
    try:
        return "ok", image_to_array(data, **kwargs)
    except ImageError as err:
        assert err.reason in ImageError.STATUS and err.message
        return "error", err.reason


def check_output(result, channels: int, size: int) -> None:
    kind, value = result
    if kind == "ok":
        assert value.dtype == np.uint8 and value.shape == (channels, size, size) and value.flags.c_contiguous


def test_every_listed_mode_has_a_format():
    assert all(formats_for(mode) for mode in MODES), {mode: formats_for(mode) for mode in MODES}


@pytest.mark.filterwarnings("error::RuntimeWarning")  # e.g. numpy casts of NaN floats: handled, not warned
@PROPERTY_SETTINGS
@given(data=st.data(), mode=st.sampled_from(sorted(MODES)), wh=sizes(), seed=st.integers(0, 2**32 - 1),
       channels=st.sampled_from([1, 3]), size=st.sampled_from([1, 2, 7, 28, 32, 64, 224]),
       resample=st.sampled_from(sorted(RESAMPLE_FILTERS)))
def test_any_valid_image_becomes_uint8_chw(data, mode, wh, seed, channels, size, resample):
    fmt = data.draw(st.sampled_from(formats_for(mode)), label="format")
    encoded = encode(make_image(mode, *wh, seed), fmt)
    kwargs = dict(channels=channels, size=size, resample=resample)
    first = outcome(encoded, **kwargs)
    # a file Pillow wrote itself, in an accepted format, under the pixel limit, must be usable
    assert first[0] == "ok", (mode, fmt, wh, first)
    check_output(first, channels, size)
    second = outcome(encoded, **kwargs)
    np.testing.assert_array_equal(first[1], second[1])  # deterministic


def decoded_pixels(fmt: str, width: int, height: int, draft_to: int) -> int:
    """Pixels a decode produces: JPEGs at the largest libjpeg scale 1/s (s in 8, 4, 2) that keeps both
    sides >= draft_to (service.preprocessing.DRAFT_OVERSAMPLE x the model's side), else the canvas."""
    if fmt == "JPEG":
        for s in (8, 4, 2):
            if min(width // draft_to, height // draft_to) >= s:
                return -(-width // s) * -(-height // s)
    return width * height


@PROPERTY_SETTINGS
@given(data=st.data(), mode=st.sampled_from(sorted(MODES)), wh=sizes(), limit=st.integers(1, 1_000_000))
def test_pixel_limit_is_exact(data, mode, wh, limit):
    fmt = data.draw(st.sampled_from(formats_for(mode)), label="format")
    encoded = encode(make_image(mode, *wh, 0), fmt)
    kind, value = outcome(encoded, channels=1, size=8, max_pixels=limit)
    if decoded_pixels(fmt, *wh, draft_to=4 * 8) > limit:
        assert (kind, value) == ("error", "too_many_pixels")
    else:
        assert kind == "ok"


# --- preprocessing: arbitrary and mutated bytes -----------------------------------------------------

@lru_cache(maxsize=1)
def seeds() -> tuple[bytes, ...]:
    """Valid files to mutate: every sample format/mode plus a few of the generated ones."""
    extra = [encode(make_image(mode, 37, 23, 1), formats_for(mode)[-1]) for mode in MODES]
    return tuple(sorted(svc_images.sample_images().values())) + tuple(extra)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 256))]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Corrupt EXIF data" and the like: expected here
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@PROPERTY_SETTINGS
@given(blob=st.one_of(st.binary(max_size=4096), mutated()), channels=st.sampled_from([1, 3]),
       size=st.sampled_from([1, 28, 64]), resample=st.sampled_from(sorted(RESAMPLE_FILTERS)))
def test_arbitrary_bytes_only_raise_image_error(blob, channels, size, resample):
    kwargs = dict(channels=channels, size=size, resample=resample, max_pixels=2_000_000)
    first = outcome(blob, **kwargs)
    check_output(first, channels, size)
    second = outcome(blob, **kwargs)
    assert first[0] == second[0]
    if first[0] == "ok":
        np.testing.assert_array_equal(first[1], second[1])
    else:
        assert first[1] == second[1]


# --- schemathesis against the real server -----------------------------------------------------------

SCHEMATHESIS_MAX_EXAMPLES = 60


@pytest.mark.integration
@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server, tmp_path):
    """`st run` (all phases that apply: coverage, fuzzing; the document has no examples and no links)
    with only the `not_a_server_error` check: BentoML documents 200/400/404/500 only, while the
    service answers 413/415/429 with JSON, so the conformance checks would report those by design.

    Every operation of /docs.json is tested (none excluded): /classify, /classify_base64, POST
    /metadata and BentoML's /healthz, /livez, /readyz, /metrics. GET /metadata is a mounted ASGI
    route, absent from the document; test_request_cannot_choose_the_model covers it.
    """
    st_bin = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if st_bin is None:
        pytest.skip("schemathesis is not installed")
    report = tmp_path / "schemathesis.json"
    log_start = len(server.log())  # the session's server: other tests' 503s (overload) are theirs
    cmd = [st_bin, "run", f"{server.url}/docs.json", "--checks", "not_a_server_error",
           "--max-examples", str(SCHEMATHESIS_MAX_EXAMPLES), "--seed", "20261122", "--workers", "2",
           "--request-timeout", "30", "--generation-database", "none", "--no-color",
           "--report", "json", "--report-json-path", str(report)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert report.is_file(), proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(report.read_text())
    summary = proc.stdout[-3000:]
    assert result["exit_code"] == 0 and proc.returncode == 0, summary
    assert result["operations"]["tested"] == result["operations"]["selected"] >= 7, summary
    assert result["test_cases"]["generated"] >= 100 and result["test_cases"]["with_failures"] == 0, summary
    assert result["failures"] == [] and result["errors"] == [], summary
    assert "status=5" not in server.log()[log_start:]


# --- uploads never touch the filesystem; requests never choose the model ----------------------------

GOOD = svc_images.encode(Image.fromarray(np.full((28, 28), 255, np.uint8)), "PNG")


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"hostile-boundary") -> tuple[bytes, dict]:
    """A hand-built multipart body: (Content-Disposition header value, payload) per part, bytes as given."""
    body = b""
    for disposition, payload in parts:
        body += (b"--" + boundary + b"\r\nContent-Disposition: " + disposition
                 + b"\r\nContent-Type: application/octet-stream\r\n\r\n" + payload + b"\r\n")
    body += b"--" + boundary + b"--\r\n"
    return body, {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}


def file_part(filename: bytes, payload: bytes = GOOD) -> tuple[bytes, bytes]:
    return b'form-data; name="images"; filename="' + filename + b'"', payload


def snapshot(*folders: Path) -> set[str]:
    """Every path under the folders (names only; the OS temp dir is shared, so compare sets)."""
    found = set()
    for folder in folders:
        for root, dirs, files in os.walk(folder, onerror=lambda e: None):
            dirs[:] = [d for d in dirs if d not in (".git", ".venv", "__pycache__", ".hypothesis", ".pytest_cache")]
            found.update(os.path.join(root, name) for name in files + dirs)
    return found


HOSTILE_NAMES = {
    "traversal": (b"../../etc/passwd", "passwd"),
    "absolute": (b"/etc/passwd", "passwd"),
    "windows_traversal": (b"..\\..\\windows\\win.ini", "win.ini"),
    "nul_inside": (b"evil\x00.png", "evil.png"),
    "control_chars": (b"a\x01\x1b[31mred\x7f.png", "a[31mred.png"),
    "dot_dot_only": (b"..", "images[0]"),
    "long": (b"x" * 3000 + b".png", None),  # truncated, checked below
    "utf8": ("caf\u00e9 \u65e5\u672c.png".encode(), "caf\u00e9 \u65e5\u672c.png"),
}


@pytest.mark.integration
@pytest.mark.slow
def test_hostile_file_names_touch_no_file(server, tmp_path):
    import httpx

    watched = [Path(tempfile.gettempdir()), REPO, Path("/etc")]
    before = snapshot(*watched)
    passwd = Path("/etc/passwd").read_bytes() if Path("/etc/passwd").exists() else None
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for case, (raw, shown) in HOSTILE_NAMES.items():
            good, headers = multipart([file_part(raw)])
            resp = client.post("/classify", content=good, headers=headers)
            assert resp.status_code == 200, (case, resp.text)
            # the same name on a bad file: the name is echoed in the error, sanitized
            bad, headers = multipart([file_part(raw, b"not an image at all")])
            resp = client.post("/classify", content=bad, headers=headers)
            assert resp.status_code == 415, (case, resp.text)
            echoed = resp.json()["file"]
            assert resp.json()["errors"][0]["file"] == echoed
            assert "/" not in echoed and "\\" not in echoed and all(ch.isprintable() for ch in echoed)
            assert len(echoed) <= 100
            if shown is not None:
                assert echoed == shown, case
            else:
                assert echoed.startswith("xxx") and echoed.endswith("...")
            assert len(resp.content) < 2000  # a 3 kB name is not echoed back in full
        # over 1 MB starlette spools an upload to an anonymous temporary file: still no named file
        noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
        big = svc_images.encode(Image.fromarray(noise), "PNG")
        assert 1 << 20 < len(big) < 4 << 20
        body, headers = multipart([file_part(b"../../../tmp/evil-big.png", big)])
        resp = client.post("/classify", content=body, headers=headers)
        assert resp.status_code == 200, resp.text
        # python-multipart caps a part's header line at 4224 bytes: a longer name is a clean 400
        huge, headers = multipart([file_part(b"y" * 20_000 + b".png")])
        resp = client.post("/classify", content=huge, headers=headers)
        assert resp.status_code == 400 and resp.json()["reason"] == "bad_multipart" and len(resp.content) < 500
    after = snapshot(*watched)
    created = sorted(p for p in after - before if "passwd" in p or "win.ini" in p or "evil" in p
                     or "red.png" in p or "xxxx" in p or "yyyy" in p or "caf" in p or "/etc/" in p)
    assert created == [], created
    if passwd is not None:
        assert Path("/etc/passwd").read_bytes() == passwd
    log = server.log()
    assert "\x00" not in log and "\x1b[31m" not in log


@pytest.mark.integration
@pytest.mark.slow
def test_request_cannot_choose_the_model(server):
    """No model path, name or URL is taken from a request: extra fields are refused, query params ignored."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as client:
        meta = client.get("/metadata").json()
        hostile = {"model": "/etc/passwd", "path": "../../models/other/model.onnx",
                   "model_tag": "other:latest", "url": "http://127.0.0.1:1/evil.onnx"}
        # query parameters are ignored everywhere
        baseline = client.post("/classify", files=[("images", ("a.png", GOOD, "image/png"))]).json()
        resp = client.post("/classify", params=hostile, files=[("images", ("a.png", GOOD, "image/png"))])
        assert resp.status_code == 200 and resp.json() == baseline
        b64 = base64.b64encode(GOOD).decode()
        resp = client.post("/classify_base64", params=hostile, json={"images": [b64]})
        assert resp.status_code == 200 and resp.json() == baseline
        assert per_model(client.get("/metadata", params=hostile).json()) == per_model(meta)
        assert per_model(client.post("/metadata", params=hostile, json=hostile).json()) == per_model(meta)
        # as form fields / JSON keys they are refused, naming the field
        for key, value in hostile.items():
            resp = client.post("/classify", data={key: value}, files=[("images", ("a.png", GOOD, "image/png"))])
            assert resp.status_code == 400 and resp.json()["reason"] == "unexpected_field", resp.text
            assert resp.json()["field"] == key
            resp = client.post("/classify_base64", json={"images": [b64], key: value})
            assert resp.status_code == 400 and resp.json()["reason"] == "unexpected_field", resp.text
        # a file sent under another field name is not read from anywhere either
        resp = client.post("/classify", files=[("model", ("model.onnx", b"\x08\x01", "application/octet-stream"))])
        assert resp.status_code == 400 and resp.json()["reason"] == "unexpected_field"
        assert per_model(client.get("/metadata").json()) == per_model(meta)
