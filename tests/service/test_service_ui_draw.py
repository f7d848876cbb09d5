"""The drawing pad of the page at GET /ui, in a real headless Chromium (Playwright) against the session's server.

A digit drawn with the mouse, a pen or a finger is classified live: the pad's one result area
(``#pad-result``) shows what ``POST /classify`` answers for the very PNG the page sent (taken from the
request's multipart body). Also: the debounce, one request in flight at a time with stale answers
dropped, the service's errors, and Clear. Skips, saying why, like test_service_ui.py (same Chromium).
"""
from __future__ import annotations

import base64
import io
import re
import time

import numpy as np
import pytest
from PIL import Image

from test_service_ui import TOP_K
from tests.harness import offline_page

httpx = pytest.importorskip("httpx")
pytestmark = [pytest.mark.integration]

WAIT_MS = 10_000  # for a result: a broken page fails in seconds, not at the default 30 s
DEBOUNCE_S = 0.25  # the page's PAD_DEBOUNCE_MS

ONE = [[(0.5, 0.15), (0.5, 0.85)]]  # "1": one vertical stroke
SEVEN = [[(0.22, 0.2), (0.78, 0.2)], [(0.78, 0.2), (0.42, 0.85)]]  # "7": two strokes
ZERO = [[(0.5 + 0.22 * np.sin(t), 0.5 - 0.33 * np.cos(t)) for t in np.linspace(0, 2 * np.pi, 25)]]  # "0": an oval


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


class Pad:
    """A page at /ui that may talk to the server only, and the /classify requests it sends."""

    def __init__(self, page):
        self.page = page
        self.requests = []  # the POST /classify requests, in order

    @property
    def result(self):
        return self.page.locator("#pad-result")

    def at(self, fx: float, fy: float) -> tuple[float, float]:
        box = self.page.locator("#pad").bounding_box()
        return box["x"] + fx * box["width"], box["y"] + fy * box["height"]

    def draw_mouse(self, strokes, steps: int = 15) -> None:
        mouse = self.page.mouse
        for stroke in strokes:
            mouse.move(*self.at(*stroke[0]))
            mouse.down()
            for point in stroke[1:]:
                mouse.move(*self.at(*point), steps=steps)
            mouse.up()

    def dispatch(self, pointer_type: str, points, up: bool = True, then_clear: bool = False) -> None:
        """One stroke as synthetic PointerEvents on the canvas (what a pen or a finger makes the browser send)."""
        self.page.evaluate(
            """([type, points, up, thenClear]) => {
                const pad = document.getElementById("pad"), r = pad.getBoundingClientRect();
                const send = (kind, [fx, fy], buttons) => pad.dispatchEvent(new PointerEvent(kind, {
                    pointerId: 7, pointerType: type, isPrimary: true, bubbles: true, cancelable: true, composed: true,
                    clientX: r.left + fx * r.width, clientY: r.top + fy * r.height, width: 1, height: 1,
                    button: kind === "pointermove" ? -1 : 0, buttons, pressure: buttons ? 0.5 : 0 }));
                send("pointerdown", points[0], 1);
                for (const p of points.slice(1)) send("pointermove", p, 1);
                if (up) send("pointerup", points[points.length - 1], 0);
                if (thenClear) document.getElementById("pad-clear").click();
            }""",
            [pointer_type, points, up, then_clear],
        )

    def wait(self, state: str = "done", timeout: float = WAIT_MS) -> None:
        """Until the result area is in `state` for the drawing as it is, with no request in flight."""
        self.page.wait_for_function(
            "s => { const r = document.getElementById('pad-result');"
            " return r.dataset.state === s && r.getAttribute('aria-busy') === 'false'; }",
            arg=state, timeout=timeout, polling=50,  # not per frame: frames would give Chromium idle time
        )

    def timings(self) -> dict:
        """Page clock (ms): the last pointermove and pointerup on the pad, and when each /classify started."""
        return self.page.evaluate(
            """() => ({ move: window.padEvents.pointermove, up: window.padEvents.pointerup,
                sends: performance.getEntriesByType("resource").filter((e) => e.name.endsWith("/classify"))
                    .map((e) => e.startTime) })"""
        )

    def sent_png(self, i: int = -1) -> bytes:
        """The PNG of the i-th /classify request (checking the form is the uploads' one)."""
        request = self.requests[i]
        parts = multipart(request.post_data_buffer, request.headers["content-type"])
        headers, data = parts["images"]
        assert 'filename="drawing.png"' in headers and "content-type: image/png" in headers.lower(), headers
        assert parts["top_k"][1] == str(TOP_K).encode()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        return data

    def canvas(self) -> np.ndarray:
        """The canvas' pixels now (RGBA), through a PNG of it (lossless)."""
        url = self.page.evaluate("document.getElementById('pad').toDataURL('image/png')")
        return pixels(base64.b64decode(url.split(",", 1)[1]))

    def non_black(self) -> int:
        """Pixels of the canvas that are not opaque black (counted in the page)."""
        return self.page.evaluate(
            """() => { const c = document.getElementById("pad");
                const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] || d[i + 1] || d[i + 2] || d[i + 3] !== 255) n++;
                return n; }"""
        )


def multipart(body: bytes, content_type: str) -> dict[str, tuple[str, bytes]]:
    """A multipart/form-data body -> {field name: (part headers, data)}."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
    parts = {}
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, sep, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        assert sep and data.endswith(b"\r\n"), chunk[:200]
        headers = head.decode("utf-8", "replace")
        name = re.search(r'name="([^"]*)"', headers).group(1)
        parts[name] = (headers, data[:-2])
    return parts


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGBA"))


def api(client, png: bytes) -> dict:
    resp = client.post("/classify", files=[("images", ("drawing.png", png, "image/png"))], data={"top_k": str(TOP_K)})
    assert resp.status_code == 200, resp.text
    return resp.json()[0]


def assert_shows_api_answer(pad: Pad, client, png: bytes) -> str:
    """The result area shows what the API answers for `png`: the label and the top-k bars."""
    want = api(client, png)
    result = pad.result
    assert result.locator(".label").count() == 1  # one result, updated in place
    label = result.locator(".label").inner_text()
    assert label == want["label"] == result.get_attribute("data-label"), (label, want)
    bars = result.locator(".topk li")
    assert bars.count() == TOP_K
    assert [bars.nth(j).get_attribute("data-label") for j in range(TOP_K)] == [t["label"] for t in want["top_k"]]
    scores = [float(bars.nth(j).get_attribute("data-score")) for j in range(TOP_K)]
    np.testing.assert_allclose(scores, [t["score"] for t in want["top_k"]], atol=1e-6)
    return label


def assert_ink(img: np.ndarray) -> None:
    """White strokes on opaque black: the drawing an MNIST model expects."""
    assert (img[..., 3] == 255).all()
    gray = img[..., :3].max(axis=-1)
    assert gray[0, 0] == 0 and gray[-1, -1] == 0
    assert 0.02 < (gray > 128).mean() < 0.5, (gray > 128).mean()


def pad_opener(browser, server):
    """opener(**context options) -> Pad: a fresh page at `server`'s /ui, its model card loaded."""
    contexts, pages = [], []

    def opener(**options) -> Pad:
        options = {"viewport": {"width": 1200, "height": 900}, "device_scale_factor": 1, **options}
        context = browser.new_context(**options)
        contexts.append(context)
        confined = offline_page(context, server.url)
        pages.append(confined)
        page = confined.page
        pad = Pad(page)
        page.on("request", lambda r: pad.requests.append(r) if r.method == "POST" and r.url.endswith("/classify") else None)
        page.goto(f"{server.url}/ui")
        page.wait_for_selector("#model-version")  # the class count is known: top_k=5
        page.evaluate("""() => { window.padEvents = {};
            for (const type of ["pointermove", "pointerup"]) document.getElementById("pad").addEventListener(
                type, (e) => { window.padEvents[type] = e.timeStamp; }, { capture: true }); }""")
        return pad

    yield opener
    for context in contexts:
        context.close()
    foreign = [url for confined in pages for url in confined.foreign]
    problems = [p for confined in pages for p in confined.problems if "Failed to load resource" not in p]
    assert not foreign, f"the page requested other hosts: {foreign}"
    assert not problems, problems


@pytest.fixture
def open_pad(browser, server):
    """open_pad(**context options) -> Pad, on the session's server (a model from before input_transform)."""
    yield from pad_opener(browser, server)


@pytest.fixture
def open_digit_pad(browser, digit_server):
    """The same on conftest.digit_server: a model declaring ``input_transform: digit``."""
    yield from pad_opener(browser, digit_server)


def test_mouse_drawn_digits_are_classified_like_the_api(open_pad, client, tmp_path):
    pad = open_pad()
    assert pad.result.get_attribute("data-state") == "empty" and not pad.requests
    assert pad.page.locator("#pad").get_attribute("role") == "img"
    assert pad.page.locator("#pad").evaluate("e => getComputedStyle(e).touchAction") == "none"
    shown = {}
    for name, strokes in (("1", ONE), ("7", SEVEN)):
        pad.page.click("#pad-clear")
        before = len(pad.requests)
        pad.draw_mouse(strokes)
        pad.wait()
        assert len(pad.requests) > before
        t = pad.timings()
        assert 0 <= t["sends"][-1] - t["up"] < 500, t  # at once on pointer up (the PNG is encoded at once)
        png = pad.sent_png()
        img = pixels(png)
        assert img.shape == (280, 280, 4)  # 280 CSS px at device pixel ratio 1
        assert_ink(img)
        np.testing.assert_array_equal(img, pad.canvas())  # the last request is the drawing shown
        shown[name] = assert_shows_api_answer(pad, client, png)
    assert pad.page.locator("#results .card").count() == 0  # the pad's results stay in its own area
    assert pad.page.get_by_role("button", name="Clear drawing").count() == 1
    pad.page.screenshot(path=str(tmp_path / "ui-draw.png"), full_page=True)
    print("the tiny model reads the drawn 1 and 7 as", shown)


def test_pen_and_touch_draw_too(open_pad, client):
    # a pen, at device pixel ratio 2: the backing store is 560 x 560 and the ink lands where it was drawn
    pad = open_pad(device_scale_factor=2)
    pad.dispatch("pen", [(0.3, 0.15 + 0.7 * i / 20) for i in range(21)])
    pad.wait()
    png = pad.sent_png()
    img = pixels(png)
    assert img.shape == (560, 560, 4)
    assert_ink(img)
    columns = np.nonzero(img[..., 0].max(axis=0) > 128)[0]
    assert abs(columns.mean() / 560 - 0.3) < 0.02, columns.mean()
    assert_shows_api_answer(pad, client, png)

    # a finger: real touch input (CDP), on a page that could scroll; touch-action: none keeps it drawing
    pad = open_pad(viewport={"width": 1200, "height": 500}, has_touch=True)
    page = pad.page
    page.locator("#pad").scroll_into_view_if_needed()
    assert page.evaluate("document.documentElement.scrollHeight > innerHeight")
    scroll = page.evaluate("scrollY")
    cdp = page.context.new_cdp_session(page)
    x, y0 = pad.at(0.5, 0.15)
    _, y1 = pad.at(0.5, 0.85)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y0, "id": 1}]})
    for i in range(1, 21):
        cdp.send("Input.dispatchTouchEvent",
                 {"type": "touchMove", "touchPoints": [{"x": x, "y": y0 + (y1 - y0) * i / 20, "id": 1}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    pad.wait()
    png = pad.sent_png()
    img = pixels(png)
    assert_ink(img)
    rows = np.nonzero(img[..., 0].max(axis=1) > 128)[0]
    assert rows.min() < 0.2 * 280 and rows.max() > 0.8 * 280, (rows.min(), rows.max())  # the whole stroke
    assert page.evaluate("scrollY") == scroll  # the page did not scroll under the finger
    assert_shows_api_answer(pad, client, png)


def test_debounce_classifies_when_the_drawing_pauses(open_pad, client):
    pad = open_pad()
    page, mouse = pad.page, pad.page.mouse
    mouse.move(*pad.at(0.2, 0.5))
    mouse.down()
    started = time.monotonic()
    for i in range(1, 51):  # 50 moves, one round trip each (tens of ms apart): about a second of drawing
        mouse.move(*pad.at(0.2 + 0.6 * i / 50, 0.5 + 0.3 * np.sin(i / 8)))
    assert time.monotonic() - started > 3 * DEBOUNCE_S  # long enough for a page without a debounce to send often
    # the pointer rests, still down: classified after the debounce, before the pointer goes up
    pad.wait(timeout=5_000)
    live = len(pad.requests)
    assert 1 <= live <= 3, live
    t = pad.timings()
    assert t["up"] is None and DEBOUNCE_S * 1000 - 50 <= t["sends"][-1] - t["move"] < DEBOUNCE_S * 1000 + 500, t
    mouse.up()  # nothing new drawn since: nothing more to send
    page.wait_for_timeout(3 * DEBOUNCE_S * 1000)
    pad.wait()
    assert len(pad.requests) == live
    png = pad.sent_png()
    np.testing.assert_array_equal(pixels(png), pad.canvas())  # the result is for the final drawing
    assert_shows_api_answer(pad, client, png)


def test_clear_wipes_the_pad_and_sends_nothing(open_pad):
    pad = open_pad()
    page = pad.page
    assert pad.non_black() == 0
    pad.draw_mouse(ONE)
    pad.wait()
    assert pad.non_black() > 1000 and pad.result.locator(".label").count() == 1
    sent = len(pad.requests)
    page.click("#pad-clear")
    assert pad.non_black() == 0  # every pixel opaque black again
    assert pad.result.get_attribute("data-state") == "empty"
    assert pad.result.locator(".label, .topk").count() == 0 and pad.result.get_attribute("data-label") is None
    page.click("#pad-clear")  # on an empty pad
    # a stroke cleared before its debounce ran out is not sent either
    pad.dispatch("pen", [(0.5, 0.2), (0.5, 0.5)], up=False, then_clear=True)
    page.wait_for_timeout(3 * DEBOUNCE_S * 1000)
    assert len(pad.requests) == sent and pad.non_black() == 0
    assert pad.result.get_attribute("data-state") == "empty"


def test_one_request_in_flight_and_stale_answers_dropped(open_pad, client):
    pad = open_pad()
    page = pad.page
    held = []  # the /classify requests, answered by the test
    page.route("**/classify", lambda route: held.append(route))

    def wait_held(n: int) -> None:
        deadline = time.monotonic() + WAIT_MS / 1000
        while len(held) < n and time.monotonic() < deadline:
            page.wait_for_timeout(20)
        assert len(held) == n, len(held)

    pad.draw_mouse(ONE)
    wait_held(1)
    pad.draw_mouse([[(0.2, 0.5), (0.8, 0.5)]])  # drawn on while the first answer is on its way
    page.wait_for_timeout(3 * DEBOUNCE_S * 1000)
    assert len(pad.requests) == 1 and len(held) == 1  # the newer drawing waits for it
    assert pad.result.get_attribute("data-state") == "pending"
    assert pad.result.get_attribute("aria-busy") == "true"
    stale = {"label": "stale", "index": 0, "score": 1.0, "top_k": [{"label": "stale", "index": 0, "score": 1.0}]}
    held[0].fulfill(status=200, json=[stale])  # an answer for the drawing as it was
    wait_held(2)  # then the newer drawing goes, once the stale answer has been read (and dropped)
    assert "stale" not in pad.result.inner_text() and pad.result.get_attribute("data-label") is None
    assert pad.result.get_attribute("data-state") == "pending"
    held[1].continue_()
    pad.wait()
    assert len(pad.requests) == 2
    png = pad.sent_png()
    np.testing.assert_array_equal(pixels(png), pad.canvas())
    assert_shows_api_answer(pad, client, png)


def test_service_errors_are_shown_in_the_pad(open_pad, client):
    pad = open_pad()
    page = pad.page
    answer = {"error": "no ink: the drawing is empty or too faint", "reason": "no_ink", "status": 422}
    page.route("**/classify", lambda route: route.fulfill(status=422, json=answer))
    pad.draw_mouse(ONE)
    pad.wait("error")
    text = pad.result.locator(".err").inner_text()
    assert "HTTP 422" in text and "no_ink" in text and answer["error"] in text, text
    assert pad.result.get_attribute("data-reason") == "no_ink"
    assert page.locator("#results .card").count() == 0
    page.unroute("**/classify")
    pad.draw_mouse([[(0.45, 0.2), (0.55, 0.8)]])  # drawn on again: the real answer replaces the error
    pad.wait()
    assert pad.result.locator(".err").count() == 0
    assert_shows_api_answer(pad, client, pad.sent_png())


def test_a_digit_model_reads_what_was_drawn(open_digit_pad):
    """Drawn anywhere on the pad, at any size: the digit model's transform centres and scales it."""
    pad = open_digit_pad()
    small_corner = [[(0.1 + 0.4 * x, 0.1 + 0.4 * y) for x, y in stroke] for stroke in SEVEN]
    for want, strokes in (("1", ONE), ("7", SEVEN), ("0", ZERO), ("7", small_corner)):
        pad.page.click("#pad-clear")
        pad.draw_mouse(strokes)
        pad.wait()
        assert pad.result.get_attribute("data-label") == want, (want, pad.result.inner_text())
