"""A realistic digit corpus the project generates itself (no downloads), deterministic for a seed.

The models are trained on MNIST: white ink on black, the digit's bounding box 20x20 and its centre of
mass at the centre of a 28x28 image. Users send something else: phone photos of digits written with
a pen on paper, typed digits, browser-canvas drawings, any size, anywhere in the picture. Parts:

- ``handwritten``: MNIST **test** digits (never seen in training) re-rendered as dark pen ink on
  light, textured, unevenly lit paper, at a random size and place in a random canvas, slightly
  rotated, blurred and noisy like a phone photo, saved as JPEG or PNG, RGB or grayscale;
- ``typed``: 0-9 in every font on the machine (fc-list), mostly dark on light, a few light on dark;
- ``drawn``: a few jittered strokes per digit drawn with a round pen on 280x280, like a browser
  canvas (white on black or black on white), PNG;
- ``mnist``: the raw 28x28 MNIST test images as PNG (the reference set);
- ``blank``: pictures with no digit (paper, plain white, plain black): a digit model should refuse
  them (422 ``no_ink``).

Every generator is a pure function of a ``numpy.random.Generator`` (numpy and Pillow only) returning
an :class:`Encoded` image; item ``i`` of part ``p`` draws from ``default_rng([seed, p, i])``, so
items do not depend on each other. :func:`build_corpus` writes the files, ``labels.csv`` and a
``manifest.json`` of its settings (reused when they match); :func:`contact_sheet` draws a grid of
samples to eyeball.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

PARTS = ("handwritten", "typed", "drawn", "mnist", "blank")
#: bump when the corpus' meaning changes; the manifest also holds a hash of this file's source
CORPUS_VERSION = 1
EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}


@dataclass(frozen=True)
class Encoded:
    """One generated image: its file bytes and what they are."""

    data: bytes
    format: str  # JPEG | PNG
    mode: str  # L | RGB (the encoded image's mode)
    note: str = ""  # how it was made (sizes, ink, ...): helps explain failures


@dataclass(frozen=True)
class Item:
    part: str
    path: Path
    label: str | None  # "0".."9"; None for blank
    format: str
    mode: str = ""
    note: str = ""
    width: int = 0
    height: int = 0


# --- shared helpers ----------------------------------------------------------------------------------

def log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Sizes: as many small as large ones on a log scale (a 40 px digit is as likely as a 400 px one)."""
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def canvas_size(rng: np.random.Generator, lo: int, hi: int, max_aspect: float = 2.0) -> tuple[int, int]:
    """(width, height): the long side `lo`-`hi` px (log-uniform), aspect 1 to `max_aspect` (a phone's
    4:3 or 16:9 photo, or a squarer crop of it), portrait or landscape."""
    long = log_uniform(rng, lo, hi)
    short = max(lo, long / rng.uniform(1, max_aspect))
    return (round(long), round(short)) if rng.random() < 0.5 else (round(short), round(long))


def encode(image: Image.Image, rng: np.random.Generator, jpeg_share: float, note: str = "") -> Encoded:
    """JPEG (quality 50-95: phone apps and messengers recompress) with probability `jpeg_share`, else PNG."""
    buf = io.BytesIO()
    if rng.random() < jpeg_share:
        quality = int(rng.integers(50, 96))
        image.save(buf, format="JPEG", quality=quality)
        return Encoded(buf.getvalue(), "JPEG", image.mode, f"{note} jpeg q{quality}".strip())
    image.save(buf, format="PNG")
    return Encoded(buf.getvalue(), "PNG", image.mode, f"{note} png".strip())


def to_image(rgb: np.ndarray, grayscale: bool) -> Image.Image:
    """float [H, W, 3] levels -> uint8 RGB, or L (ITU-R 601 luma, what a grayscale export does)."""
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    return image.convert("L") if grayscale else image


def smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Low-frequency noise, std ~1: a `cells` x `cells` grid of normals upsampled bicubically."""
    grid = Image.fromarray(rng.normal(0, 1, (cells, cells)).astype(np.float32), "F")
    return np.asarray(grid.resize((width, height), Image.BICUBIC), dtype=np.float32)


def unit_grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres as x, y in [0, 1] (float32, broadcastable [1, W] and [H, 1])."""
    return ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, :], \
        ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]


# --- paper, light, camera ----------------------------------------------------------------------------

def paper(rng: np.random.Generator, width: int, height: int, texture: bool = True) -> np.ndarray:
    """Paper as float [H, W, 3] levels: 170-250 (office paper under room light is rarely 255), warm or
    cool white balance, blotchy low-frequency fibre/lighting texture of a few levels and fine grain."""
    base = rng.uniform(170, 250)
    tint = {"warm": (6, 2, -9), "cool": (-6, -1, 7), "neutral": (0, 0, 0)}[rng.choice(["warm", "cool", "neutral"])]
    tint = np.asarray(tint, np.float32) * rng.uniform(0.3, 1.5)
    gray = np.full((height, width), base, np.float32)
    if texture:
        gray += smooth_noise(rng, width, height, int(rng.integers(3, 10))) * rng.uniform(1, 4)
        gray += rng.normal(0, rng.uniform(0.8, 3), (height, width)).astype(np.float32)
    return gray[..., None] + tint


def lighting(rng: np.random.Generator, width: int, height: int, max_drop: float = 0.32) -> np.ndarray:
    """Multiplicative brightness [H, W, 1] <= 1: a linear or radial fall-off losing up to `max_drop`
    (a desk lamp or window to one side), and in 30 % of pictures a soft shadow (the phone, a hand)."""
    x, y = unit_grid(width, height)
    drop = rng.uniform(0.04, max_drop)
    if rng.random() < 0.5:  # linear: brightest on one side, darkest on the other
        theta = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(theta) + y * np.sin(theta)
        light = 1 - drop * (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:  # radial: a spot of light, darker towards the corners
        cx, cy = rng.uniform(0.1, 0.9, 2)
        r2 = (x - cx) ** 2 + (y - cy) ** 2
        light = 1 - drop * r2 / r2.max()
    if rng.random() < 0.3:  # a half-plane shadow with an edge 5-20 % of the picture wide
        phi, edge = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.8)
        side = (x - 0.5) * np.cos(phi) + (y - 0.5) * np.sin(phi) + 0.5 - edge
        light = light * (1 - rng.uniform(0.08, 0.25) / (1 + np.exp(-side / rng.uniform(0.05, 0.2))))
    return np.broadcast_to(light, (height, width)).astype(np.float32)[..., None]


def camera(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Focus and sensor: a slight blur in 40 % of pictures (radius up to 1.2 px), then noise of 1-5
    levels std per channel (a phone's denoised output)."""
    if rng.random() < 0.4:
        image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        rgb = np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2))), np.float32)
    return rgb + rng.normal(0, rng.uniform(1, 5), rgb.shape).astype(np.float32)


def ink_colour(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Pen ink as RGB levels: photographed ink is never 0: black 20-60, dark blue, dark grey 60-90."""
    kind = rng.choice(["black", "blue", "grey"], p=[0.5, 0.3, 0.2])
    if kind == "black":
        return np.full(3, rng.uniform(20, 60), np.float32) + rng.uniform(-4, 4, 3).astype(np.float32), "black"
    if kind == "blue":
        return np.asarray([rng.uniform(25, 55), rng.uniform(35, 70), rng.uniform(90, 140)], np.float32), "blue"
    return np.full(3, rng.uniform(60, 90), np.float32), "grey"


# --- handwritten: MNIST test digits as pen on paper --------------------------------------------------

def pen_mask(rng: np.random.Generator, digit: np.ndarray, height: int) -> tuple[np.ndarray, str]:
    """An MNIST digit (uint8 [28, 28], white ink) as an ink coverage mask, float [h, w] in [0, 1],
    `height` px tall (the ink's bounding box), rotated by up to 12 degrees; 20 % thin (a ballpoint's
    line is thinner than MNIST's strokes), 8 % thick (a marker)."""
    image = Image.fromarray(digit).resize((112, 112), Image.BICUBIC)  # 4x: room to thin or thicken
    # ~0.4 MNIST px of blur: the 28 px lattice would otherwise show as bumps along the stroke edges
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    stroke, roll = "normal", rng.random()
    if roll < 0.2:  # thin: MNIST ink is white, so MinFilter erodes it (1 px of 112 per side)
        thinner = image.filter(ImageFilter.MinFilter(3))
        if ink_pixels(thinner) >= 0.6 * ink_pixels(image):  # a digit already thin would break apart
            image, stroke = thinner, "thin"
    elif roll < 0.28:  # thick: 2-3 px of 112 more per side, the square kernel's corners blurred away
        image = image.filter(ImageFilter.MaxFilter(int(rng.choice([5, 7])))).filter(ImageFilter.GaussianBlur(1.5))
        stroke = "thick"
    angle = rng.uniform(-12, 12)
    image = image.rotate(angle, resample=Image.BICUBIC, expand=True)
    box = image.point(lambda v: 255 if v > 60 else 0).getbbox() or (0, 0, image.width, image.height)
    image = image.crop(box)
    width = max(1, round(image.width * height / image.height))
    a = np.asarray(image.resize((width, height), Image.BICUBIC), np.float32) / 255
    # MNIST's anti-aliased grey edges, scaled up 10x, would look like a felt smudge: a steep curve
    # makes a solid pen stroke whose edge is a pixel or two wide at any size
    t = np.clip((a - 0.3) / 0.3, 0, 1)
    # pen pressure and ink flow: the stroke's darkness varies by up to 8 % along it
    flow = 1 - 0.04 * (1 + smooth_noise(rng, width, height, 4).clip(-1, 1))
    return t * t * (3 - 2 * t) * flow, f"{stroke} rot{angle:+.0f}"


def ink_pixels(image: Image.Image) -> int:
    """Pixels of a white-ink image that the pen curve below draws as solid ink."""
    return int((np.asarray(image) > 128).sum())


def handwritten(rng: np.random.Generator, digit: np.ndarray) -> Encoded:
    """A phone photo of `digit` written with a pen on paper: canvas 64-1200 px per side, the digit
    30-400 px tall anywhere inside it, ink 20-90 levels on paper 170-250, lit unevenly."""
    width, height = canvas_size(rng, 64, 1200)
    # at least 5 % of the short side: a digit that is a speck in the frame is not a photo of a digit
    short = min(width, height)
    digit_h = round(log_uniform(rng, max(30.0, 0.05 * short), max(31.0, min(400.0, 0.85 * short))))
    mask, note = pen_mask(rng, digit, digit_h)
    if mask.shape[1] > width - 4:  # a wide rotated digit on a narrow canvas: shrink it to fit
        size = (width - 4, max(8, mask.shape[0] * (width - 4) // mask.shape[1]))
        mask = np.asarray(Image.fromarray(mask, "F").resize(size, Image.BICUBIC), np.float32).clip(0, 1)
    h, w = mask.shape
    x0, y0 = int(rng.integers(2, width - w - 1)), int(rng.integers(2, height - h - 1))
    ink, ink_name = ink_colour(rng)
    coverage = np.zeros((height, width, 1), np.float32)
    coverage[y0:y0 + h, x0:x0 + w, 0] = mask * rng.uniform(0.85, 1.0)  # ink is not fully opaque
    rgb = paper(rng, width, height) * (1 - coverage) + ink * coverage
    rgb = camera(rgb * lighting(rng, width, height), rng)
    grayscale = rng.random() < 0.4
    image = to_image(rgb, grayscale)
    return encode(image, rng, 0.65, f"{width}x{height} h{h} at{x0},{y0} {ink_name} {note} {image.mode}")


# --- typed: every font on the machine ---------------------------------------------------------------

@lru_cache(maxsize=1)
def font_files() -> tuple[str, ...]:
    """TTF/OTF files (fc-list, else /usr/share/fonts) whose ten digits are ten distinct glyphs (a
    symbol or math font without digits draws the same box for each)."""
    try:
        out = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True, timeout=30,
                             check=False).stdout
        files = out.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        files = []
    if not files:
        files = [f for ext in ("ttf", "otf") for f in glob.glob(f"/usr/share/fonts/**/*.{ext}", recursive=True)]
    files = sorted({f for f in files if f.lower().endswith((".ttf", ".otf"))})
    return tuple(f for f in files if _has_digits(f))


def _has_digits(path: str) -> bool:
    try:
        font = ImageFont.truetype(path, 40)
    except OSError:
        return False
    shapes = set()
    for d in "0123456789":
        image = Image.new("L", (80, 80))
        ImageDraw.Draw(image).text((10, 10), d, font=font, fill=255)
        shapes.add(image.tobytes())
    return len(shapes) == 10


def typed(rng: np.random.Generator, font_path: str, digit: str) -> Encoded:
    """`digit` typed in `font_path`: glyph 16-300 px tall anywhere on a 64-900 px canvas, 85 % dark on
    light (screenshots, printouts), 15 % light on dark (dark-mode screens); JPEG or PNG."""
    width, height = canvas_size(rng, 64, 900, 3.0)
    target = log_uniform(rng, 16, max(17.0, min(300.0, 0.8 * min(width, height))))
    probe = ImageFont.truetype(font_path, 200).getbbox(digit)
    size = max(6, round(200 * target / max(1, probe[3] - probe[1])))
    font = ImageFont.truetype(font_path, size)
    left, top, right, bottom = font.getbbox(digit)
    while right - left > width - 4 or bottom - top > height - 4:  # wide glyphs: shrink until they fit
        size = max(6, int(size * 0.9))
        font = ImageFont.truetype(font_path, size)
        left, top, right, bottom = font.getbbox(digit)
    dark_on_light = rng.random() < 0.85
    if dark_on_light:  # paper or a light screen 200-255, ink 0-70
        bg, ink = rng.uniform(200, 255), rng.uniform(0, 70)
    else:  # a dark-mode screen 0-60, text 190-255
        bg, ink = rng.uniform(0, 60), rng.uniform(190, 255)
    canvas = Image.new("L", (width, height), int(bg))
    x0 = int(rng.integers(2, max(3, width - (right - left) - 1)))
    y0 = int(rng.integers(2, max(3, height - (bottom - top) - 1)))
    ImageDraw.Draw(canvas).text((x0 - left, y0 - top), digit, font=font, fill=int(ink))
    rgb = np.repeat(np.asarray(canvas, np.float32)[..., None], 3, axis=2) + rng.uniform(-6, 6, 3).astype(np.float32)
    if rng.random() < 0.5:  # a photo of a printout or screen, not a clean screenshot
        rgb = camera(rgb, rng)
    image = to_image(rgb, rng.random() < 0.5)
    polarity = "dark-ink" if dark_on_light else "light-ink"
    return encode(image, rng, 0.5, f"{Path(font_path).stem} {width}x{height} size{size} {polarity} {image.mode}")


# --- drawn: browser-canvas strokes ------------------------------------------------------------------

#: digit -> variants -> strokes -> control points (x, y) in a unit square, y down; smoothed when drawn
STROKES: dict[int, list[list[list[tuple[float, float]]]]] = {
    0: [[[(0.5, 0.08), (0.76, 0.2), (0.8, 0.5), (0.74, 0.8), (0.5, 0.92), (0.26, 0.8), (0.2, 0.5), (0.25, 0.2),
          (0.5, 0.08), (0.62, 0.12)]]],
    1: [[[(0.52, 0.08), (0.5, 0.92)]], [[(0.34, 0.26), (0.56, 0.08), (0.54, 0.92)]]],
    2: [[[(0.24, 0.28), (0.36, 0.1), (0.6, 0.08), (0.74, 0.22), (0.7, 0.42), (0.5, 0.62), (0.22, 0.9), (0.8, 0.9)]]],
    3: [[[(0.24, 0.14), (0.5, 0.07), (0.72, 0.16), (0.72, 0.34), (0.46, 0.48), (0.72, 0.6), (0.76, 0.78),
          (0.55, 0.92), (0.24, 0.86)]]],
    4: [[[(0.62, 0.08), (0.2, 0.64), (0.82, 0.64)], [(0.64, 0.3), (0.64, 0.92)]],
        [[(0.3, 0.08), (0.24, 0.55), (0.78, 0.55)], [(0.66, 0.1), (0.66, 0.92)]]],
    5: [[[(0.72, 0.1), (0.34, 0.1), (0.3, 0.45), (0.55, 0.4), (0.74, 0.52), (0.76, 0.74), (0.58, 0.9), (0.26, 0.86)]],
        [[(0.34, 0.1), (0.3, 0.45), (0.55, 0.4), (0.74, 0.52), (0.76, 0.74), (0.58, 0.9), (0.26, 0.86)],
         [(0.34, 0.1), (0.74, 0.1)]]],
    6: [[[(0.68, 0.1), (0.44, 0.26), (0.28, 0.55), (0.3, 0.82), (0.5, 0.92), (0.7, 0.82), (0.72, 0.62), (0.54, 0.5),
          (0.36, 0.56), (0.28, 0.68)]]],
    7: [[[(0.22, 0.12), (0.8, 0.12), (0.5, 0.5), (0.4, 0.92)]],
        [[(0.22, 0.12), (0.8, 0.12), (0.5, 0.5), (0.4, 0.92)], [(0.36, 0.52), (0.66, 0.52)]]],
    8: [[[(0.68, 0.2), (0.5, 0.08), (0.3, 0.2), (0.34, 0.38), (0.5, 0.48), (0.7, 0.62), (0.72, 0.82), (0.5, 0.93),
          (0.28, 0.82), (0.3, 0.62), (0.5, 0.48), (0.66, 0.38), (0.68, 0.2)]]],
    9: [[[(0.72, 0.22), (0.55, 0.08), (0.32, 0.14), (0.27, 0.32), (0.42, 0.46), (0.66, 0.4), (0.72, 0.22),
          (0.7, 0.55), (0.62, 0.92)]]],
}


def chaikin(points: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Corner cutting: a polyline through control points becomes a smooth hand-drawn curve (ends kept)."""
    for _ in range(rounds):
        a, b = points[:-1], points[1:]
        cut = np.stack([0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b], axis=1).reshape(-1, 2)
        points = np.concatenate([points[:1], cut, points[-1:]])
    return points


def drawn(rng: np.random.Generator, digit: int, size: int = 280) -> Encoded:
    """`digit` drawn with a mouse or finger on a `size` px canvas: a template's control points jittered
    (~2.5 % of the box), slanted, scaled, the digit 35-90 % of the canvas anywhere on it, a round pen
    8-26 px wide; white on black or black on white, PNG."""
    variants = STROKES[digit]
    strokes = variants[int(rng.integers(len(variants)))]
    angle, shear = np.radians(rng.uniform(-10, 10)), rng.uniform(-0.25, 0.15)
    scale = np.asarray([rng.uniform(0.75, 1.1), rng.uniform(0.9, 1.1)])
    rot = np.asarray([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    box = rng.uniform(0.35, 0.9) * size
    centre = rng.uniform(box / 2 + 4, size - box / 2 - 4, 2)
    ss, width = 2, rng.uniform(8, 26)  # drawn at 2x and downscaled: anti-aliased like a browser's line
    white_on_black = rng.random() < 0.5
    canvas = Image.new("L", (size * ss, size * ss), 0 if white_on_black else 255)
    draw = ImageDraw.Draw(canvas)
    for stroke in strokes:
        p = np.asarray(stroke) + rng.normal(0, 0.025, (len(stroke), 2)) - 0.5
        p = (p * scale) @ np.asarray([[1, 0], [shear, 1]]) @ rot.T  # slant, then a small rotation
        p = chaikin((p * box + centre) * ss)
        pts = [tuple(q) for q in p.tolist()]
        fill, r = 255 if white_on_black else 0, width * ss / 2
        draw.line(pts, fill=fill, width=round(width * ss), joint="curve")
        for x, y in (pts[0], pts[-1]):  # round caps
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    image = canvas.resize((size, size), Image.LANCZOS)
    if rng.random() < 0.5:
        image = image.convert("RGB")  # canvas.toDataURL() is a colour PNG
    polarity = "white-on-black" if white_on_black else "black-on-white"
    return encode(image, rng, 0.0, f"{polarity} pen{width:.0f} box{box:.0f} {image.mode}")


# --- mnist and blank ---------------------------------------------------------------------------------

def mnist_png(digit: np.ndarray) -> Encoded:
    """A raw MNIST test image, 28x28 grayscale PNG (what the models were trained on)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(digit), "L").save(buf, format="PNG")
    return Encoded(buf.getvalue(), "PNG", "L", "raw 28x28")


BLANK_KINDS = ("paper-jpeg-rgb", "paper-png-gray", "white", "black", "flat-paper-jpeg", "shadowed-paper-jpeg-gray")


def blank(rng: np.random.Generator, kind: str) -> Encoded:
    """A picture without a digit: textured paper (a photo of an empty page), plain white or black (an
    empty canvas), flat noise-free paper colour; a digit model should answer 422 ``no_ink``."""
    width, height = canvas_size(rng, 64, 1000)
    if kind in ("white", "black"):
        image = Image.new("L", (width, height), 255 if kind == "white" else 0)
        return encode(image, rng, 0.0, f"{kind} {width}x{height} L")
    if kind == "flat-paper-jpeg":
        rgb = paper(rng, width, height, texture=False)
        return encode(to_image(rgb, False), rng, 1.0, f"{kind} {width}x{height} RGB")
    rgb = paper(rng, width, height) * lighting(rng, width, height, 0.35 if "shadow" in kind else 0.25)
    image = to_image(camera(rgb, rng), grayscale="gray" in kind)
    return encode(image, rng, 1.0 if "jpeg" in kind else 0.0, f"{kind} {width}x{height} {image.mode}")


# --- the corpus on disk ------------------------------------------------------------------------------

def settings(per_part: int, seed: int, mnist_limit: int) -> dict:
    """What a corpus folder depends on: the arguments, this generator's source and the fonts."""
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return {"corpus_version": CORPUS_VERSION, "per_part": per_part, "seed": seed, "mnist_limit": mnist_limit,
            "generator_sha256": source, "fonts": list(font_files())}


def settings_key(per_part: int, seed: int, mnist_limit: int) -> str:
    """A short name for a corpus folder built with these settings."""
    text = json.dumps(settings(per_part, seed, mnist_limit), sort_keys=True)
    return f"p{per_part}-s{seed}-m{mnist_limit}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def generate(part: str, count: int, seed: int, mnist):
    """(label, Encoded) for each of `count` items of `part`; item i draws from rng([seed, part, i])."""
    part_id = PARTS.index(part)
    order = np.random.default_rng([seed, part_id]).permutation(len(mnist.test_labels))  # handwritten sources
    fonts = font_files()
    font_order = [np.random.default_rng([seed, part_id, 10_000_000 + d]).permutation(len(fonts)) for d in range(10)]
    for i in range(count):
        rng = np.random.default_rng([seed, part_id, i])
        if part == "handwritten":
            k = int(order[i % len(order)])
            yield str(int(mnist.test_labels[k])), handwritten(rng, mnist.test_images[k])
        elif part == "typed":  # digit i % 10; each cycle of 10 x fonts items uses every (font, digit) once
            d = i % 10
            yield str(d), typed(rng, fonts[int(font_order[d][(i // 10) % len(fonts)])], str(d))
        elif part == "drawn":
            yield str(i % 10), drawn(rng, i % 10)
        elif part == "mnist":
            yield str(int(mnist.test_labels[i])), mnist_png(mnist.test_images[i])
        else:
            yield None, blank(rng, BLANK_KINDS[i % len(BLANK_KINDS)])


def part_sizes(per_part: int, mnist_limit: int, n_test: int) -> dict[str, int]:
    """Items per part: `per_part` each, the MNIST test set up to `mnist_limit`, a handful of blanks."""
    return {"handwritten": per_part, "typed": per_part, "drawn": per_part, "mnist": min(mnist_limit, n_test),
            "blank": max(2 * len(BLANK_KINDS), per_part // 20)}


def read_labels(folder: Path) -> list[Item]:
    with (folder / "labels.csv").open(newline="") as f:
        return [Item(r["part"], folder / r["file"], r["label"] or None, r["format"], r["mode"], r["note"],
                     int(r["width"]), int(r["height"])) for r in csv.DictReader(f)]


def reusable(folder: Path, wanted: dict) -> list[Item] | None:
    """The items of `folder` when its manifest holds exactly `wanted` and every file is there."""
    try:
        if json.loads((folder / "manifest.json").read_text()) != wanted:
            return None
        items = read_labels(folder)
    except (OSError, ValueError, KeyError):
        return None
    return items if all(item.path.is_file() for item in items) else None


def build_corpus(out_dir: Path, *, per_part: int, seed: int, mnist_limit: int, mnist=None, reuse: bool = True,
                 log=print) -> list[Item]:
    """Write the corpus to `out_dir` (<part>/<part>-NNNNN.<ext>, labels.csv, manifest.json) and return
    its items; a folder built with the same settings is reused as it is. `mnist`: a
    tests.harness.Mnist (default: load_mnist(), which raises MissingData when the files are absent)."""
    out_dir = Path(out_dir)
    wanted = settings(per_part, seed, mnist_limit)
    if reuse and (items := reusable(out_dir, wanted)) is not None:
        log(f"real corpus: reusing {out_dir} ({len(items)} images)")
        return items
    if mnist is None:
        from tests.harness import load_mnist
        mnist = load_mnist()
    (out_dir / "manifest.json").unlink(missing_ok=True)  # written last: a half-built folder is never reused
    items: list[Item] = []
    for part, count in part_sizes(per_part, mnist_limit, len(mnist.test_labels)).items():
        shutil.rmtree(out_dir / part, ignore_errors=True)
        (out_dir / part).mkdir(parents=True)
        for i, (label, enc) in enumerate(generate(part, count, seed, mnist)):
            path = out_dir / part / f"{part}-{i:05d}.{EXTENSIONS[enc.format]}"
            path.write_bytes(enc.data)
            with Image.open(io.BytesIO(enc.data)) as im:
                size = im.size
            items.append(Item(part, path, label, enc.format, enc.mode, enc.note, *size))
        log(f"real corpus: {part}: {count} images")
    write_labels(out_dir, items)
    (out_dir / "manifest.json").write_text(json.dumps(wanted, indent=1) + "\n")
    return items


def write_labels(folder: Path, items: list[Item]) -> None:
    """``folder/labels.csv``: one row per item, paths relative to ``folder`` (read_labels reads it)."""
    with (folder / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["part", "file", "label", "format", "mode", "note", "width", "height"])
        for item in items:
            writer.writerow([item.part, item.path.relative_to(folder).as_posix(), item.label or "", item.format,
                             item.mode, item.note, item.width, item.height])


# --- looking at it -----------------------------------------------------------------------------------

#: samples per part on the contact sheet (48 in all: 6 rows of 8)
SHEET_SAMPLES = {"handwritten": 24, "typed": 10, "drawn": 6, "mnist": 4, "blank": 4}


def contact_sheet(items: list[Item], path: Path, cell: int = 200, per_part: dict | None = None,
                  columns: int = 8) -> Path:
    """A PNG grid of samples of each part, each scaled to fit a `cell` px square (aspect
    kept, on mid grey so the canvas' edges show) and captioned with part, label and size."""
    chosen, rng = [], np.random.default_rng(0)  # a fixed random pick: even spacing would alias with i % 10
    for part, n in (per_part or SHEET_SAMPLES).items():
        of_part = [item for item in items if item.part == part]
        chosen += [of_part[k] for k in sorted(rng.choice(len(of_part), min(n, len(of_part)), replace=False))]
    rows = -(-len(chosen) // columns)
    caption = 14
    sheet = Image.new("RGB", (columns * cell, rows * (cell + caption)), (128, 128, 128))
    draw = ImageDraw.Draw(sheet)
    for k, item in enumerate(chosen):
        with Image.open(item.path) as im:
            im = im.convert("RGB")
            size = im.size
            im.thumbnail((cell - 4, cell - 4), Image.LANCZOS if max(size) > cell else Image.NEAREST)
            if max(size) < cell // 2:  # tiny images (28x28) are shown enlarged
                im = im.resize((im.width * (cell // 2 // max(size)), im.height * (cell // 2 // max(size))), Image.NEAREST)
        x, y = (k % columns) * cell, (k // columns) * (cell + caption)
        sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
        draw.text((x + 3, y + cell), f"{item.part[:5]} {item.label or '-'} {size[0]}x{size[1]} {item.format}",
                  fill=(255, 255, 255))
    sheet.save(path)
    return path
