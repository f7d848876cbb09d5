"""The ``canvas`` part of the real inputs corpus: digits drawn on the /ui page's pad in a real browser.

bench/real_corpus.py's ``drawn`` part imitates a browser canvas with Pillow; this part is the real
thing. The digits are drawn with the mouse (``page.mouse`` down / move / up, Playwright driving
Debian's headless Chromium, ``/usr/bin/chromium`` or ``$CHROMIUM``, launched by tests/harness.py as
for tests/service/test_service_ui*.py: ``playwright install`` is never needed) on the pad of
``GET /ui`` of a running server, and the PNG kept is the one the page itself sent in its
``POST /classify`` (taken from the request's multipart body): what a user of the page sends, at
device pixel ratio 1 (280x280).

Strokes: the ``drawn`` part's templates (:data:`bench.real_corpus.STROKES`) with the same per-sample
jitter (a template variant, control points jittered by ~2.5 % of the box, slant, rotation, scale, the
digit 35-90 % of the pad anywhere on it, Chaikin-smoothed) as pad fractions 0..1; the pen is the
page's own. Drawing ``i`` is digit ``i % 10`` from ``default_rng([seed, CANVAS_PART_ID, i])``: the
same strokes for a seed. The page's answers are not used (the bench sends the PNGs to every model).

:func:`build` draws ``count`` digits into a folder of the corpus (``canvas/canvas-NNNNN.png``,
``labels.csv``, ``manifest.json``), and :func:`cached` reuses such a folder when its manifest matches
(count, seed, this file, the templates, the page's source, the Chromium build): a corpus rebuilt with
the same settings keeps its drawings, anything else redraws them.
"""
from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bench.real_corpus import PARTS, STROKES, Item, chaikin, reusable, write_labels
from tests.harness import chromium_path, chromium_unavailable, launch_chromium, offline_page

PART = "canvas"
CANVAS_PART_ID = len(PARTS)  # the rng stream's part number: after the generated parts'
PER_DIGIT = 5
COUNT = 10 * PER_DIGIT  # drawings by default
CANVAS_VERSION = 1  # bump when the drawings' meaning changes
PAD_SIDE = 280  # CSS px of the pad (service/static/ui.html), the PNG's side at device pixel ratio 1
UI_PAGE = Path(__file__).resolve().parent.parent / "service" / "static" / "ui.html"
WAIT_MS = 10_000  # for the pad's result after a drawing
EDGE = 0.005  # points are kept this far inside the pad (a stroke must start on it)
STEP_PX = 12  # the mouse moves at most this far per event (a curve of 20 px radius: < 1 px off)

Strokes = list[list[tuple[float, float]]]


class CanvasError(RuntimeError):
    """The page did not do what drawing a digit on it should."""


# --- what is drawn (pure) ---------------------------------------------------------------------------

def jittered_strokes(rng: np.random.Generator, digit: int) -> tuple[Strokes, str]:
    """`digit`'s strokes as pad fractions (x, y in 0..1, y down) with the ``drawn`` part's jitter
    (bench.real_corpus.drawn, less the pen, which is the page's), and a note saying how."""
    variants = STROKES[digit]
    variant = int(rng.integers(len(variants)))
    angle, shear = np.radians(rng.uniform(-10, 10)), rng.uniform(-0.25, 0.15)
    scale = np.asarray([rng.uniform(0.75, 1.1), rng.uniform(0.9, 1.1)])
    rot = np.asarray([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    box = rng.uniform(0.35, 0.9)
    margin = 4 / PAD_SIDE
    centre = rng.uniform(box / 2 + margin, 1 - box / 2 - margin, 2)
    out = []
    for stroke in variants[variant]:
        p = np.asarray(stroke) + rng.normal(0, 0.025, (len(stroke), 2)) - 0.5
        p = (p * scale) @ np.asarray([[1, 0], [shear, 1]]) @ rot.T  # slant, then a small rotation
        p = resample(np.clip(chaikin(p * box + centre), EDGE, 1 - EDGE), STEP_PX / PAD_SIDE)
        out.append([(round(x, 5), round(y, 5)) for x, y in p.tolist()])
    return out, f"variant{variant} box{box:.2f}"


def resample(points: np.ndarray, spacing: float) -> np.ndarray:
    """A polyline as points evenly spaced along it, at most `spacing` apart (its ends kept): what the
    mouse moves through (Chaikin's points bunch up in the curves: more mouse events, no better line)."""
    along = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(points, axis=0).T))])
    n = max(2, int(np.ceil(along[-1] / spacing)) + 1)
    at = np.linspace(0, along[-1], n)
    return np.stack([np.interp(at, along, points[:, 0]), np.interp(at, along, points[:, 1])], axis=1)


def plan(count: int = COUNT, seed: int = 0) -> list[tuple[int, Strokes, str]]:
    """(digit, strokes, note) of drawing i = 0..count-1: digit i % 10, from rng([seed, CANVAS_PART_ID, i])."""
    return [(i % 10, *jittered_strokes(np.random.default_rng([seed, CANVAS_PART_ID, i]), i % 10))
            for i in range(count)]


def multipart(body: bytes, content_type: str) -> dict[str, tuple[str, bytes]]:
    """A multipart/form-data body -> {field name: (part headers, data)} (the last part of a name wins)."""
    found = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if not found:
        raise ValueError(f"not a multipart body: {content_type!r}")
    boundary = found.group(1).encode()
    parts = {}
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, sep, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep or not data.endswith(b"\r\n"):
            raise ValueError(f"a malformed multipart part: {chunk[:120]!r}")
        headers = head.decode("utf-8", "replace")
        name = re.search(r'name="([^"]*)"', headers)
        if not name:
            raise ValueError(f"a multipart part without a name: {headers!r}")
        parts[name.group(1)] = (headers, data[:-2])
    return parts


def sent_png(body: bytes | None, content_type: str) -> bytes:
    """The PNG of the page's /classify request (its ``images`` field)."""
    if not body:
        raise CanvasError("the page's /classify request has no body that Playwright could read")
    parts = multipart(body, content_type)
    if "images" not in parts:
        raise CanvasError(f"the page's /classify request has no images field: {sorted(parts)}")
    data = parts["images"][1]
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise CanvasError(f"the page sent something else than a PNG: {data[:16]!r}")
    return data


# --- the browser ------------------------------------------------------------------------------------

# where Chromium is, how it is launched and why it may be missing are tests/harness.py's; asked here
# by bench/real_inputs.py and the tests as this part's own question
unavailable = chromium_unavailable


@functools.lru_cache(maxsize=4)
def chromium_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.strip().splitlines()[-1] if out.strip() else ""


@dataclass
class Pad:
    """The /ui page open on the pad: its box on the page, the POST /classify requests it sent, and
    what went wrong on it (console errors, page errors; requests to other hosts are aborted)."""

    page: object
    box: dict
    requests: list = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def at(self, fx: float, fy: float) -> tuple[float, float]:
        return self.box["x"] + fx * self.box["width"], self.box["y"] + fy * self.box["height"]


def open_pad(context, url: str) -> Pad:
    """``{url}/ui`` in a new page of `context`, ready (the model card loaded), its pad PAD_SIDE px square;
    the page may talk to the server only (it is offline by design: anything else is blocked and noted)."""
    confined = offline_page(context, url)  # console and page errors land in pad.problems
    page = confined.page
    pad = Pad(page, {}, problems=confined.problems)
    page.on("request", lambda r: pad.requests.append(r) if r.method == "POST" and r.url.endswith("/classify")
            else None)
    page.goto(f"{url}/ui")
    page.wait_for_selector("#model-version")  # the model card is loaded: the page is ready
    page.locator("#pad").scroll_into_view_if_needed()
    box = page.locator("#pad").bounding_box()
    if not box or abs(box["width"] - PAD_SIDE) > 1 or abs(box["height"] - PAD_SIDE) > 1:
        raise CanvasError(f"the pad is not {PAD_SIDE} px square on the page: {box}")
    pad.box = box
    return pad


def draw_strokes(pad: Pad, strokes: Strokes) -> None:
    """Draw `strokes` on the pad with the mouse, at most STEP_PX per mouse event."""
    mouse = pad.page.mouse
    for stroke in strokes:
        mouse.move(*pad.at(*stroke[0]))
        mouse.down()
        for a, b in itertools.pairwise(stroke):
            steps = max(1, int(np.ceil(np.hypot(b[0] - a[0], b[1] - a[1]) * PAD_SIDE / STEP_PX)))
            mouse.move(*pad.at(*b), steps=steps)
        mouse.up()


def sent_drawing(pad: Pad, k: int, before: int) -> bytes:
    """The PNG of drawing `k` that the page sent (its last /classify request after the first `before`),
    once the pad shows its result; CanvasError unless it is the drawing on the pad."""
    from playwright.sync_api import TimeoutError as PageTimeout

    try:
        pad.page.wait_for_function(
            "() => { const r = document.getElementById('pad-result');"
            " return ['done', 'error'].includes(r.dataset.state) && r.getAttribute('aria-busy') === 'false'; }",
            timeout=WAIT_MS, polling=50)
    except PageTimeout as err:
        raise CanvasError(f"drawing {k}: no result from the pad ({err}); {pad.problems[-3:]}") from None
    if len(pad.requests) == before:
        raise CanvasError(f"drawing {k}: the page sent no /classify request")
    request = pad.requests[-1]
    png = sent_png(request.post_data_buffer, request.headers.get("content-type", ""))
    shown = pad.page.evaluate("document.getElementById('pad').toDataURL('image/png')")
    if not np.array_equal(_rgba(png), _rgba(_data_url_bytes(shown))):
        raise CanvasError(f"drawing {k}: the last PNG sent is not the drawing on the pad")
    return png


def draw_on_canvas(url: str, items: list[tuple[int, Strokes]], out_dir: Path, *, notes: list[str] | None = None,
                   log=print) -> list[Item]:
    """Open ``{url}/ui`` in headless Chromium and, for each (digit, strokes): Clear, draw the strokes
    with the mouse, wait for the pad's result and write the PNG the page sent as
    ``out_dir/canvas-NNNNN.png``. Returns the items (part ``canvas``, label the digit)."""
    from playwright.sync_api import sync_playwright

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    started = time.monotonic()
    with sync_playwright() as p:
        browser = launch_chromium(p, fast_input=True)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900}, device_scale_factor=1)
            pad = open_pad(context, url)
            for k, (digit, strokes) in enumerate(items):
                pad.page.click("#pad-clear")
                before = len(pad.requests)
                draw_strokes(pad, strokes)
                png = sent_drawing(pad, k, before)
                note = " ".join(x for x in ((notes[k] if notes else ""), f"strokes{len(strokes)}",
                                            f"chromium{browser.version}") if x)
                out.append(save_drawing(png, out_dir / f"{PART}-{k:05d}.png", str(digit), note))
            context.close()
        finally:
            browser.close()
    log(f"real canvas: {len(out)} digits drawn on {url}/ui in {time.monotonic() - started:.1f} s")
    return out


def save_drawing(png: bytes, path: Path, label: str, note: str) -> Item:
    """`png` written to `path`, as an item of the part."""
    with Image.open(io.BytesIO(png)) as im:
        size, mode = im.size, im.mode
    path.write_bytes(png)
    return Item(PART, path, label, "PNG", mode, note, *size)


def _rgba(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGBA"))


def _data_url_bytes(url: str) -> bytes:
    import base64

    return base64.b64decode(url.split(",", 1)[1])


# --- in the corpus folder ---------------------------------------------------------------------------

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def settings(count: int, seed: int) -> dict:
    """What a canvas folder depends on: count, seed, this drawer, the templates, the page, the browser."""
    try:
        page = _sha(UI_PAGE.read_bytes())
    except OSError:
        page = ""
    browser = chromium_path()
    return {"canvas_version": CANVAS_VERSION, "count": count, "seed": seed,
            "drawer_sha256": _sha(Path(__file__).read_bytes()),
            "strokes_sha256": _sha(json.dumps(STROKES, sort_keys=True).encode()),
            "ui_sha256": page, "chromium": str(browser), "chromium_version": chromium_version(str(browser))}


def cached(folder: Path, count: int, seed: int) -> list[Item] | None:
    """The drawings in `folder` when they were made with these settings and are all there, else None."""
    return reusable(Path(folder), settings(count, seed))


def build(folder: Path, url: str, count: int = COUNT, seed: int = 0, log=print) -> list[Item]:
    """Draw `count` digits on `url`'s /ui into `folder` (emptied first; the manifest written last, so a
    half-drawn folder is never reused) and return them."""
    folder = Path(folder)
    wanted = settings(count, seed)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    drawings = plan(count, seed)
    items = draw_on_canvas(url, [(d, s) for d, s, _ in drawings], folder, notes=[n for _, _, n in drawings], log=log)
    write_labels(folder, items)
    (folder / "manifest.json").write_text(json.dumps(wanted, indent=1) + "\n")
    return items
