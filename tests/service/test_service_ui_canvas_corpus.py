"""bench/real_canvas.py on the session's server: the real inputs corpus' ``canvas`` part, drawn with the
mouse on the /ui pad in headless Chromium, is the PNGs the page sent, with ink where the strokes went.

Skips, saying why, where Chromium or playwright is missing (like test_service_ui.py)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench import real_canvas

pytestmark = [pytest.mark.integration]

PEN_PX = real_canvas.PAD_SIDE / 13  # the page's PAD_INK


def distance_to(strokes, side: int) -> np.ndarray:
    """Each pixel centre's distance (px) to the nearest stroke segment, on a `side` px square."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    best = np.full((side, side), np.inf, np.float32)
    for stroke in strokes:
        p = np.asarray(stroke, np.float32) * side
        for (ax, ay), (bx, by) in zip(p[:-1], p[1:]):
            dx, dy = bx - ax, by - ay
            t = np.clip(((x - ax) * dx + (y - ay) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
            best = np.minimum(best, np.hypot(x - ax - t * dx, y - ay - t * dy))
    return best


def test_digits_drawn_on_the_pad_are_the_pngs_the_page_sent(server, tmp_path):
    reason = real_canvas.unavailable()
    if reason:
        pytest.skip(reason)
    drawings = real_canvas.plan(3, seed=0)  # digits 0, 1, 2
    items = real_canvas.draw_on_canvas(server.url, [(d, s) for d, s, _ in drawings], tmp_path / "canvas",
                                       notes=[n for _, _, n in drawings], log=lambda _: None)
    assert [(i.part, i.label, i.path.name) for i in items] == [
        ("canvas", str(k), f"canvas-{k:05d}.png") for k in range(3)]
    for item, (_, strokes, note) in zip(items, drawings):
        assert item.path.parent == tmp_path / "canvas" and note in item.note and "chromium" in item.note
        with Image.open(item.path) as im:
            assert (im.format, im.size, im.mode) == ("PNG", (280, 280), item.mode)
            assert (item.width, item.height) == (280, 280)
            rgba = np.asarray(im.convert("RGBA"))
        assert (rgba[..., 3] == 255).all()  # opaque
        assert (rgba[..., 0] == rgba[..., 1]).all() and (rgba[..., 1] == rgba[..., 2]).all()  # grey levels
        gray = rgba[..., 0]
        ink = gray > 128
        assert 0.01 < ink.mean() < 0.5, ink.mean()  # white on black: mostly black
        assert gray[0, 0] == gray[0, -1] == gray[-1, 0] == gray[-1, -1] == 0
        far = distance_to(strokes, 280)
        assert not ink[far > PEN_PX / 2 + 2].any(), far[ink].max()  # no ink away from the strokes
        assert (gray[far < PEN_PX / 2 - 2] > 200).all()  # and solid ink along them
