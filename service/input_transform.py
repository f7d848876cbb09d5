"""How a decoded image becomes the model's ``image_size x image_size`` pixels: the contract's
``input_transform`` (docs/model-contract.md). numpy + Pillow only, like the rest of the preprocessing.

Three transforms, chosen per dataset in ``params.yaml`` (``data.input_transform``) and written into
the model's metadata; a model without the key gets ``resize``, exactly the behaviour before the key
existed:

- ``resize``: squash to ``size x size`` with the model's filter (the aspect ratio is not kept).
- ``crop``: keep the aspect ratio: scale the short side to ``size``, then cut the centre square
  (torchvision's ``Resize(size)`` + ``CenterCrop(size)``, in one Pillow resample of the centre box).
  For photo datasets (CIFAR-10, image folders).
- ``digit``: MNIST's own recipe, for 1-channel digit datasets, robust to photos of ink on paper:

  1. work on a copy whose long side is at most :data:`WORK_SIDE` (a 4032x3024 photo costs like 256x192);
  2. polarity from the image itself: the ink is the minority that lies farther from the median
     (dark pen on light paper is inverted; white-on-black MNIST is kept);
  3. the background (paper, uneven light) is the 10th percentile of each cell of a coarse grid,
     fitted with a plane and a radial term (started from the barest 70 % of the cells, refitted
     without the cells the ink raised), and subtracted;
  4. noise level from the median absolute deviation; no ink when the strongest ink is weaker than
     :data:`MIN_INK` grey levels or :data:`MIN_SNR` noise levels: :class:`NoInk` (the service's
     422 ``no_ink``), never a digit guessed from paper texture;
  5. the ink's bounding box from the rows and columns that hold ink (3x3-smoothed, so JPEG specks
     do not count), less ink running along a quarter of the picture's edge (a desk around the page),
     keeping the run with the most ink and the runs close to it (a stray mark far away is not part
     of the digit, a detached bar of a 5 is);
  6. fit the box into ``20/28`` of the side keeping the aspect ratio (antialiased), stretch the
     stroke's core to 255, and place it by its centre of mass at the centre (MNIST's 14, 14).

  MNIST's own digits come out nearly unchanged (same box, same centre), so the datasets are
  transformed the same way once at the download stage and training, evaluation, the parity gate
  and the service all see the same pixels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from .contract import INPUT_TRANSFORMS  # the contract owns the names; this module does the pixels

__all__ = ["INPUT_TRANSFORMS", "WORK_SIDE", "NoInk", "center_crop", "digit_array", "digit_image"]

#: long side, px, of the working copy of an image for ``digit``: a digit filling a tenth of a phone
#: photo's height is still ~20 px tall there, the size it ends at
WORK_SIDE = 256
#: MNIST: the digit's bounding box fits a 20x20 box of the 28x28 field
BOX_FRACTION = 20 / 28
#: grey levels (0..255): ink fainter than this against its background is no ink
MIN_INK = 32
#: and it must stand this many noise levels (1.4826 x MAD of the flattened image) above the paper
MIN_SNR = 6.0
#: a pixel is ink when at least this fraction of the strongest ink (and 4 noise levels) above the paper
INK_FRACTION = 0.2
#: cells of the background grid along the long side (fewer for small images: one cell per 16 px)
BACKGROUND_CELLS = 8
#: the percentile of a cell's pixels (ink bright) taken as its paper: a bold digit filling the
#: picture still leaves a tenth of most cells bare
PAPER_PERCENTILE = 10
#: ink along at least this share of the picture's edge cells is a frame (a desk around the page),
#: found on a grid of FRAME_CELL x FRAME_CELL px cells
FRAME_PERIMETER = 0.25
FRAME_CELL = 4


def _quantile(x: np.ndarray, q: float) -> float:
    """The ``q`` quantile (0..1, nearest rank) of ``x``. Small images sort (5 us for 28x28; numpy's
    introselect takes 10x that on MNIST's runs of equal zeros), large ones partition (0.3 ms for 256x192
    against 3 ms to sort): the service runs this per image."""
    flat = x.ravel()
    k = min(len(flat) - 1, max(0, round(q * (len(flat) - 1))))
    return float(np.sort(flat)[k] if len(flat) <= 4096 else np.partition(flat, k)[k])


class NoInk(ValueError):
    """The image holds nothing that stands out from its background (blank paper, a flat colour, noise)."""


# --- crop ------------------------------------------------------------------------------------------

def center_crop(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Scale the short side to ``size`` and cut the centre ``size x size`` (one resample)."""
    if img.size == (size, size):
        return img
    return ImageOps.fit(img, (size, size), method=resample, centering=(0.5, 0.5))


# --- digit -----------------------------------------------------------------------------------------

def digit_image(img: Image.Image, size: int) -> np.ndarray:
    """A decoded image -> ``uint8 [size, size]`` in MNIST's form; :class:`NoInk` when blank."""
    return digit_array(np.asarray(img if img.mode == "L" else img.convert("L")), size)


def digit_array(gray: np.ndarray, size: int) -> np.ndarray:
    """``uint8 [H, W]`` (any size) -> ``uint8 [size, size]``: the steps of the module docstring."""
    x = _working_copy(np.asarray(gray, dtype=np.uint8)).astype(np.float32)
    smooth = _smooth3(x)
    if _ink_is_dark(smooth):
        x, smooth = 255.0 - x, 255.0 - smooth
    background = _background(x)
    flat, smooth = x - background, smooth - background  # a 3x3 mean of the smooth surface is itself
    noise = 1.4826 * _quantile(np.abs(flat - _quantile(flat, 0.5)), 0.5)
    strongest = float(smooth.max())
    if strongest < max(MIN_INK, MIN_SNR * noise):
        raise NoInk(f"no ink found: the strongest mark is {strongest:.0f} grey levels above the background "
                    f"(noise {noise:.1f}); send a digit that stands out from the paper")
    level = max(INK_FRACTION * strongest, 4 * noise)
    mask = (flat > level) & (smooth > level / 3)  # bright enough, and not a lone speck: its 3x3 mean is too
    top, bottom, left, right = _ink_box(_without_frame(mask))
    patch = np.maximum(flat[top:bottom, left:right] - 2 * noise, 0)
    return _place(_fit(patch, round(size * BOX_FRACTION)), size)


def _working_copy(gray: np.ndarray) -> np.ndarray:
    """``gray`` with its long side at most :data:`WORK_SIDE` (box filter: each working pixel averages
    the pixels it covers, so thin strokes fade rather than vanish)."""
    height, width = gray.shape
    scale = WORK_SIDE / max(width, height)
    if scale >= 1:
        return gray
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(gray, mode="L").resize(new, Image.Resampling.BOX))


def _ink_is_dark(smooth: np.ndarray) -> bool:
    """Dark ink on light paper: the darkest mark lies farther below the median than the brightest above
    it (extremes of the 3x3 mean: a digit may cover a thousandth of a photo, a speck is smoothed away)."""
    lo, hi, median = float(smooth.min()), float(smooth.max()), _quantile(smooth, 0.5)
    return median - lo > hi - median


def _smooth3(x: np.ndarray) -> np.ndarray:
    """3x3 mean (edges replicated): single-pixel JPEG and sensor noise drops to a ninth."""
    if min(x.shape) < 3:
        return x.copy()
    rows = np.empty((x.shape[0] + 2, x.shape[1]), np.float32)
    rows[1:-1], rows[0], rows[-1] = x, x[0], x[-1]
    rows = rows[:-2] + rows[1:-1] + rows[2:]
    cols = np.empty((x.shape[0], x.shape[1] + 2), np.float32)
    cols[:, 1:-1], cols[:, 0], cols[:, -1] = rows, rows[:, 0], rows[:, -1]
    return (cols[:, :-2] + cols[:, 1:-1] + cols[:, 2:]) / np.float32(9)


def _background(x: np.ndarray) -> np.ndarray | np.float32:
    """The paper under the ink (ink bright): a smooth surface through the cells' paper levels."""
    h, w = x.shape
    cells = min(max(max(h, w) // 16, 1), BACKGROUND_CELLS)
    if cells < 3:
        return np.float32(_quantile(x, PAPER_PERCENTILE / 100))
    ch, cw = max(1, h // cells), max(1, w // cells)
    ny, nx = max(1, h // ch), max(1, w // cw)
    cells_ = x[:ny * ch, :nx * cw].reshape(ny, ch, nx, cw).transpose(0, 2, 1, 3).reshape(ny * nx, ch * cw)
    medians = np.percentile(cells_, PAPER_PERCENTILE, axis=1)  # paper, unless the ink covers 90 % of a cell
    cy, cx = np.mgrid[0:ny, 0:nx]
    yy, xx = ((cy.ravel() + 0.5) * ch / h - 0.5), ((cx.ravel() + 0.5) * cw / w - 0.5)
    basis = lambda u, v: np.stack([np.ones_like(u), u, v, u * u + v * v], axis=1)  # noqa: E731  plane + vignette
    keep = medians <= np.quantile(medians, 0.7)  # start from the barest 70 %: ink, or a desk around the page, raise the rest
    for _ in range(3):  # cells the ink raised lie far above the surface: drop them, refit
        coef, *_ = np.linalg.lstsq(basis(yy[keep], xx[keep]), medians[keep], rcond=None)
        resid = medians - basis(yy, xx) @ coef
        spread = 1.4826 * np.median(np.abs(resid[keep])) + 1.0
        keep = resid < 2.5 * spread
        if keep.sum() < 4:
            return np.float32(np.median(medians))
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    return (basis((gy / h - 0.5).ravel(), (gx / w - 0.5).ravel()) @ coef).reshape(h, w).astype(np.float32)


def _without_frame(mask: np.ndarray) -> np.ndarray:
    """``mask`` less the ink connected to the picture's edge along a quarter of its perimeter or more:
    the desk or the dark margin around a photographed page, not a digit that touches the edge (it
    touches a short stretch). Flood-filled on a 4x coarser grid; the mask itself when nothing else is left."""
    h, w = mask.shape
    if max(h, w) < 48:
        return mask
    coarse = np.pad(mask, ((0, -h % FRAME_CELL), (0, -w % FRAME_CELL)))
    coarse = coarse.reshape(coarse.shape[0] // FRAME_CELL, FRAME_CELL, -1, FRAME_CELL).any(axis=(1, 3))
    edge = np.zeros_like(coarse)
    edge[[0, -1], :], edge[:, [0, -1]] = True, True
    reach = coarse & edge
    if reach.sum() < FRAME_PERIMETER * edge.sum():
        return mask
    for _ in range(coarse.shape[0] + coarse.shape[1]):  # grow through the mask, 4-neighbours per step
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= coarse
        if (grown == reach).all():
            break
        reach = grown
    frame = np.repeat(np.repeat(reach, FRAME_CELL, axis=0), FRAME_CELL, axis=1)[:h, :w]
    inside = mask & ~frame
    return inside if inside.any() else mask


def _ink_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), exclusive ends, of the digit's ink: rows first, then columns within them."""
    top, bottom = _main_run(mask.sum(axis=1))
    left, right = _main_run(mask[top:bottom].sum(axis=0))
    top_in, bottom_in = _main_run(mask[top:bottom, left:right].sum(axis=1))
    return top + top_in, top + bottom_in, left, right


def _main_run(counts: np.ndarray) -> tuple[int, int]:
    """The run of non-empty entries with the most ink, grown over gaps shorter than half its length.
    (Plain Python over the row or column counts: a few hundred entries at most, where numpy's
    diff/flatnonzero cost ~10 us a call in overhead.)"""
    runs: list[list[int]] = []  # [start, end, ink]
    for i, count in enumerate(counts.tolist()):
        if not count:
            continue
        if runs and runs[-1][1] == i:
            runs[-1][1], runs[-1][2] = i + 1, runs[-1][2] + count
        else:
            runs.append([i, i + 1, count])
    best = max(range(len(runs)), key=lambda i: runs[i][2])
    start, end, lo, hi = runs[best][0], runs[best][1], best - 1, best + 1
    grown = True
    while grown:
        grown = False
        if lo >= 0 and start - runs[lo][1] <= (end - start) / 2:
            start, lo, grown = runs[lo][0], lo - 1, True
        if hi < len(runs) and runs[hi][0] - end <= (end - start) / 2:
            end, hi, grown = runs[hi][1], hi + 1, True
    return start, end


def _fit(patch: np.ndarray, box: int) -> np.ndarray:
    """Scale ``patch`` so its long side is ``box`` (antialiased), the stroke's core stretched to 255."""
    h, w = patch.shape
    scale = box / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = patch if new == (w, h) else np.asarray(
        Image.fromarray(patch.astype(np.float32), mode="F").resize(new, Image.Resampling.BILINEAR))
    core = _quantile(small, 0.99)
    if core <= 0:
        core = float(small.max()) or 1.0
    return np.minimum(np.maximum(small * (255.0 / core), 0), 255)  # np.clip's wrapper: ~4 us a call


def _place(patch: np.ndarray, size: int) -> np.ndarray:
    """``patch`` on a black ``size x size`` field with its centre of mass at the centre (MNIST: 14, 14
    of 28, in pixel-index coordinates), shifted back inside the field where it would stick out."""
    h, w = patch.shape
    rows, cols = patch.sum(axis=1, dtype=np.float64), patch.sum(axis=0, dtype=np.float64)
    mass = float(rows.sum())
    cy = float(rows @ np.arange(h)) / mass if mass else (h - 1) / 2
    cx = float(cols @ np.arange(w)) / mass if mass else (w - 1) / 2
    top = min(max(round(size / 2 - cy), 0), size - h)  # Python's min/max: np.clip on a scalar costs ~5 us
    left = min(max(round(size / 2 - cx), 0), size - w)
    out = np.zeros((size, size), np.float32)
    out[top:top + h, left:left + w] = patch
    return np.rint(out).astype(np.uint8)
