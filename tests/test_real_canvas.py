"""bench/real_canvas.py without a browser: the strokes, the multipart body, the cache, the skip.

The drawing itself, in headless Chromium on a real server, is tests/service/test_service_ui_canvas_corpus.py.
"""
from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
from PIL import Image

from bench import real_canvas, real_corpus
from bench.real_corpus import Item


@pytest.fixture(autouse=True)
def no_browser(monkeypatch, tmp_path):
    """No Chromium here (settings() asks it its version): these tests never start a browser."""
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "no-chromium"))


def test_strokes_are_the_drawn_parts_jittered_templates_and_deterministic_per_seed():
    drawings = real_canvas.plan(30, seed=3)
    assert drawings == real_canvas.plan(30, seed=3)
    assert drawings != real_canvas.plan(30, seed=4)
    assert real_canvas.plan(12, seed=3) == drawings[:12]  # drawing i depends on (seed, i) only
    assert [d for d, _, _ in drawings] == [i % 10 for i in range(30)]
    step = real_canvas.STEP_PX / real_canvas.PAD_SIDE
    for digit, strokes, note in drawings:
        variant = int(note.split()[0].removeprefix("variant"))
        assert len(strokes) == len(real_corpus.STROKES[digit][variant]), (digit, note)
        assert 0.35 <= float(note.split()[1].removeprefix("box")) <= 0.9
        for stroke in strokes:
            p = np.asarray(stroke)
            assert len(p) >= 2 and ((p >= real_canvas.EDGE - 1e-9) & (p <= 1 - real_canvas.EDGE + 1e-9)).all()
            gaps = np.hypot(*np.diff(p, axis=0).T)
            assert gaps.max() <= step + 1e-4 and gaps.min() > 0.2 * step, gaps  # evenly spaced mouse moves
    # jittered: the same digit never twice the same, and not the bare template
    ones = [strokes for d, strokes, _ in drawings if d == 1]
    assert all(a != b for k, a in enumerate(ones) for b in ones[k + 1:])
    # a digit drawn big, one small: the drawn part's 35-90 % of the pad
    extents = [np.ptp(np.concatenate([np.asarray(s) for s in strokes]), axis=0).max() for _, strokes, _ in drawings]
    assert min(extents) < 0.5 and max(extents) > 0.7, extents


def test_resample_keeps_the_ends_and_spaces_the_points_evenly():
    points = np.asarray([(0.0, 0.0), (0.001, 0.0), (0.5, 0.0), (0.5, 0.5)])
    out = real_canvas.resample(points, 0.1)
    np.testing.assert_allclose(out[0], points[0])
    np.testing.assert_allclose(out[-1], points[-1])
    gaps = np.hypot(*np.diff(out, axis=0).T)
    assert len(out) == 11 and np.allclose(gaps[:4], 0.1)  # 1.0 long: 10 steps of 0.1 (the corner cut)
    assert len(real_canvas.resample(np.asarray([(0.2, 0.2), (0.2, 0.2)]), 0.1)) == 2  # a dot: two points


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (280, 280), (0, 0, 0, 255)).save(buf, format="PNG")
    return buf.getvalue()


def test_multipart_body_of_the_pads_request():
    httpx = pytest.importorskip("httpx")
    data = png_bytes() + b"\r\n--tricky\r\n"  # the file's bytes may look like anything
    request = httpx.Request("POST", "http://x/classify", files=[("images", ("drawing.png", data, "image/png"))],
                            data={"top_k": "5"})
    body, content_type = request.read(), request.headers["content-type"]
    parts = real_canvas.multipart(body, content_type)
    assert set(parts) == {"images", "top_k"}
    headers, got = parts["images"]
    assert got == data and 'filename="drawing.png"' in headers and "image/png" in headers.lower()
    assert parts["top_k"][1] == b"5"
    assert real_canvas.sent_png(body, content_type) == data
    # a quoted boundary (what browsers may send)
    quoted = content_type.replace("boundary=", 'boundary="') + '"'
    assert real_canvas.multipart(body, quoted)["images"][1] == data


def test_multipart_refusals():
    httpx = pytest.importorskip("httpx")
    with pytest.raises(ValueError, match="not a multipart"):
        real_canvas.multipart(b"x", "application/json")
    with pytest.raises(ValueError, match="malformed"):
        real_canvas.multipart(b"--b\r\nname-only\r\n--b--\r\n", "multipart/form-data; boundary=b")
    with pytest.raises(real_canvas.CanvasError, match="no body"):
        real_canvas.sent_png(None, "multipart/form-data; boundary=b")
    request = httpx.Request("POST", "http://x/", files=[("images", ("a.jpg", b"\xff\xd8\xff", "image/jpeg"))])
    with pytest.raises(real_canvas.CanvasError, match="PNG"):
        real_canvas.sent_png(request.read(), request.headers["content-type"])
    request = httpx.Request("POST", "http://x/", files=[("other", ("a.png", png_bytes(), "image/png"))])
    with pytest.raises(real_canvas.CanvasError, match="no images field"):
        real_canvas.sent_png(request.read(), request.headers["content-type"])


def fake_drawings(folder, count: int, seed: int) -> list[Item]:
    """A canvas folder as real_canvas.build leaves it, without a browser."""
    folder.mkdir(parents=True)
    items = []
    for k in range(count):
        path = folder / f"canvas-{k:05d}.png"
        path.write_bytes(png_bytes())
        items.append(Item("canvas", path, str(k % 10), "PNG", "RGBA", f"fake {k}", 280, 280))
    real_canvas.write_labels(folder, items)
    (folder / "manifest.json").write_text(json.dumps(real_canvas.settings(count, seed)))
    return items


def test_cached_drawings_are_reused_only_for_the_same_settings(tmp_path, monkeypatch):
    page = tmp_path / "ui.html"
    page.write_text("<canvas id=pad>")
    monkeypatch.setattr(real_canvas, "UI_PAGE", page)
    folder = tmp_path / "corpus" / "canvas"
    items = fake_drawings(folder, 4, seed=1)
    assert real_canvas.cached(folder, 4, 1) == items
    assert real_canvas.cached(folder, 5, 1) is None  # another count
    assert real_canvas.cached(folder, 4, 2) is None  # another seed
    page.write_text("<canvas id=pad> changed")  # the page changed: drawn again
    assert real_canvas.cached(folder, 4, 1) is None
    page.write_text("<canvas id=pad>")
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "another-chromium"))  # another browser
    assert real_canvas.cached(folder, 4, 1) is None
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "no-chromium"))
    items[2].path.unlink()  # a drawing lost
    assert real_canvas.cached(folder, 4, 1) is None
    assert real_canvas.cached(tmp_path / "nothing", 4, 1) is None


def bench_args(tmp_path, canvas: int) -> argparse.Namespace:
    return argparse.Namespace(canvas=canvas, seed=0, work=tmp_path)


def test_the_bench_skips_the_part_in_one_line_without_a_browser(tmp_path, capsys):
    from bench import real_inputs

    assert real_inputs.REPORT_PARTS == ("handwritten", "typed", "drawn", "canvas", "mnist", "blank")
    assert real_canvas.unavailable() is not None
    for canvas, why in ((50, "no-chromium"), (0, "--canvas 0")):
        info, draw = real_inputs.canvas_part(bench_args(tmp_path, canvas), tmp_path / "canvas")
        assert draw is None and info["items"] == [] and why in info["skipped"]
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 1 and out[0].startswith("real inputs: canvas part skipped: ") and why in out[0], out


def test_the_bench_reuses_drawings_without_a_browser_and_reports_the_part(tmp_path, capsys):
    from bench import real_inputs

    folder = tmp_path / "canvas"
    items = fake_drawings(folder, 10, seed=0)
    info, draw = real_inputs.canvas_part(bench_args(tmp_path, 10), folder)
    assert draw is None and info["items"] == items and info["reused"]
    # the part is summarized and in the table like the others, with no target
    answers = [{"status": 200, "label": item.label if k < 8 else str((k + 1) % 10), "score": 0.9}
               for k, item in enumerate(items)]
    summary = real_inputs.summarize(items, answers)
    assert summary["canvas"]["accuracy"] == 0.8 and summary["canvas"]["n"] == 10
    model = {"name": "m", "metadata": {}, "summary": summary, "images_per_s": 1.0}
    table = "\n".join(real_inputs.table([model]))
    assert "| **canvas** (n=10): accuracy | **80.0 %** |" in table
    assert not [name for name in real_inputs.verdict([model])["checks"] if "canvas" in name]
