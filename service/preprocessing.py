"""Image preprocessing shared by serving and training: numpy + Pillow only.

This module is the single definition of the decoding from bytes to the uint8 pixels a model sees;
the last step, :func:`normalize`, is the model contract's (``service.contract``, re-exported here;
see docs/model-contract.md). The service uses it for every request; the pipeline uses it to build
ImageFolder datasets and in parity tests. It must stay importable without bentoml, onnxruntime or torch.

The steps, each a pure function:

1. :func:`decode_image` - bytes -> ``PIL.Image`` in mode ``L`` (1 channel) or ``RGB`` (3 channels):
   format allow-list, JPEGs decoded at a reduced scale when far larger than the model needs
   (``draft_to``, see :data:`DRAFT_OVERSAMPLE`), pixel limit on the pixels that will be decoded
   (checked from the header, before any pixel is decoded; :func:`read_header`), integrity
   check (``Image.verify``), first frame only, EXIF orientation applied, alpha composited onto black,
   16-bit samples scaled to 8 bits (``v / 257``, rounded), then converted to ``L``/``RGB``.
2. :func:`transform_image` - to ``size x size`` by the model's ``input_transform``
   (``service.input_transform``): ``resize`` with the model's PIL filter (:func:`resize_image`,
   skipped when already that size; the aspect ratio is not kept: models exported before the key
   existed), ``crop`` (short side to ``size``, centre square) or ``digit`` (MNIST's recipe: polarity,
   background, ink box into 20x20, centre of mass; a blank image is :class:`ImageError` ``no_ink``).
3. :func:`to_chw_uint8` - ``uint8 [C, H, W]``.
4. :func:`normalize` - ``float32``: ``x / 255`` then ``(x - mean) / std`` per channel, for one image
   ``[C, H, W]`` or a batch ``[N, C, H, W]``.

:func:`image_to_array` chains 1-3 (:func:`transform_array` is step 2 for a dataset's uint8 arrays) and :func:`preprocess_batch` runs 1-4 over many images.
Every failure caused by the input raises :class:`ImageError`, which carries a machine-readable
``reason`` and the HTTP status a server should answer with.
"""
from __future__ import annotations

import io
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from . import input_transform
from .contract import PreprocessSpec, normalize  # the contract's; re-exported for these steps' callers

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DRAFT_OVERSAMPLE",
    "ImageHeader",
    "RESAMPLE_FILTERS",
    "SUPPORTED_FORMATS",
    "ImageError",
    "PreprocessSpec",
    "decode_image",
    "draft_side",
    "image_to_array",
    "normalize",
    "pixel_limit",
    "preprocess_batch",
    "read_header",
    "resample_filter",
    "resize_image",
    "spec_to_array",
    "to_chw_uint8",
    "transform_array",
    "transform_image",
]

#: Largest accepted image, in pixels (width * height), checked before decoding. 40 MP covers
#: every camera-phone photo; a decompression bomb (tiny file, huge canvas) is refused up front.
DEFAULT_MAX_PIXELS = 40_000_000
#: The smallest default per-image limit (:func:`pixel_limit`): 2048x2048, a screenshot or a scan.
MIN_DEFAULT_PIXELS = 2048 * 2048
#: Default per-image limit per pixel of the model's input: a 64x linear downscale (28x28 -> 3.2 MP,
#: raised to MIN_DEFAULT_PIXELS; 224x224 -> 205 MP, capped at DEFAULT_MAX_PIXELS).
PIXELS_PER_INPUT_PIXEL = 64 * 64
#: A JPEG decodes at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, ``Image.draft``) while both sides
#: stay >= DRAFT_OVERSAMPLE x the model's side: a 4032x3024 phone photo for a 28x28 model decodes as
#: 504x378, ~6x faster and with 1/64 of the memory, and the resize to 28x28 averages the same area.
#: JPEGs under 2 x DRAFT_OVERSAMPLE x the model's side per side (all training images) decode as before.
DRAFT_OVERSAMPLE = 4
#: formats Image.draft can scale while decoding
_DRAFTABLE = frozenset({"JPEG", "MPO"})

#: Pillow format names accepted (MPO is what Pillow calls many camera JPEGs).
SUPPORTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "TIFF", "GIF"})
#: Pillow's ``verify()`` checks only PNG (chunk CRCs, Pillow 10 to 13; for the other formats it is a
#: no-op and a damaged file fails in ``load()``), and the file must be opened again after it. So PNGs are
#: checked by :func:`_check_png_chunks` on the bytes instead: the same checks and messages, without the
#: second open (~15 us of a 28x28 PNG's ~60 us decode, Pillow 13, one core)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK_TYPE = re.compile(rb"\w\w\w\w")  # Pillow's is_cid
#: where Pillow's ``getexif`` finds an orientation in a PNG or JPEG (``exif_transpose`` reads it)
_ORIENTATION_KEYS = ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif")
#: chunks :func:`_check_png_chunks` reads at most: what the read counter allowed Pillow's open + verify
#: (a length-and-type read, a data read and a CRC read per chunk), not three times more
MAX_PNG_CHUNKS = 16_384 // 3

#: Contract ``resize`` values (``contract.RESIZE_FILTERS``) -> Pillow filters.
RESAMPLE_FILTERS: Mapping[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageError(ValueError):
    """The bytes cannot be turned into a model input. ``reason`` is a stable machine-readable code.

    reasons and the HTTP status they map to: ``empty`` (400), ``not_an_image`` (415),
    ``unsupported_format`` (415), ``unsupported_mode`` (415), ``too_many_pixels`` (413),
    ``truncated`` (400), ``corrupt`` (400), ``no_ink`` (422: a ``digit`` model found nothing that
    stands out from the background: blank paper, a flat colour, noise).
    """

    STATUS = {
        "empty": 400,
        "not_an_image": 415,
        "unsupported_format": 415,
        "unsupported_mode": 415,
        "too_many_pixels": 413,
        "truncated": 400,
        "corrupt": 400,
        "no_ink": 422,
    }

    def __init__(self, reason: str, message: str) -> None:
        if reason not in self.STATUS:
            raise ValueError(f"unknown ImageError reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def status(self) -> int:
        return self.STATUS[self.reason]


# --- decoding --------------------------------------------------------------------------------------

def pixel_limit(image_size: int) -> int:
    """Default largest decoded image, in pixels, for a model of ``image_size x image_size`` inputs."""
    return max(MIN_DEFAULT_PIXELS, min(DEFAULT_MAX_PIXELS, PIXELS_PER_INPUT_PIXEL * image_size * image_size))


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says: format, canvas size, and how many pixels decoding will produce
    (fewer than the canvas for a JPEG decoded at reduced scale)."""

    format: str
    width: int
    height: int
    decoded_pixels: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_to: int | None = None) -> ImageHeader:
    """The header of ``data`` (no pixel is decoded: ~0.1 ms); the same checks and :class:`ImageError`
    as :func:`decode_image` up to the pixel limit."""
    if not data:
        raise ImageError("empty", "the file is empty")
    img, (width, height) = _open(bytes(data), max_pixels, draft_to)
    try:
        return ImageHeader(str(img.format), width, height, img.size[0] * img.size[1])
    finally:
        img.close()


#: the plugins tried first, in this order (Pillow otherwise tries all ~40 registered plugins in turn:
#: a quarter of the event loop's time in a flood of 30-WebP requests went to IM, PCX, ... refusing them)
_PLUGIN_ORDER = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "DIB")  # JPEG's plugin opens MPO too


#: reads a decode may make of its file: Pillow reads PNG chunks and JPEG markers one by one in Python
#: (~5 us each, and JPEG keeps every marker in memory); a legitimate 32 MB PNG of 8 KB IDAT chunks
#: needs ~12,000, a crafted file of millions of empty chunks is refused at this count
MAX_FILE_READS = 16_384


class _BoundedReads(io.BytesIO):
    """The image bytes, refusing more than MAX_FILE_READS ``read`` calls."""

    reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads > MAX_FILE_READS:
            raise ImageError("corrupt", f"the file has too many chunks or markers (more than {MAX_FILE_READS} reads)")
        return super().read(size)


#: signatures of the formats whose Pillow plugin stops at the end of the file (a read that returns nothing
#: ends the header parse with an error, and ``load``): such a file of at most MAX_FILE_READS bytes cannot
#: make that many reads, so it is read without counting (counting a 32x32 JPEG's ~40 reads cost ~20 us:
#: its decode went from ~100 to ~60 us on one core, Pillow 13)
_ENDS_AT_EOF = (b"\xff\xd8", _PNG_SIGNATURE)


def _reader(data: bytes) -> io.BytesIO:
    if len(data) <= MAX_FILE_READS and data.startswith(_ENDS_AT_EOF):
        return io.BytesIO(data)
    return _BoundedReads(data)


def _open_any(data: bytes) -> Image.Image:
    """``Image.open`` trying the supported formats first, then (to tell an unsupported format from
    garbage) every plugin."""
    try:
        return Image.open(_reader(data), formats=_PLUGIN_ORDER)
    except Image.UnidentifiedImageError:
        return Image.open(_BoundedReads(data))


def _open(data: bytes, max_pixels: int, draft_to: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """The opened (not decoded) image, drafted when it is a large JPEG, and its canvas size."""
    try:
        img = _open_any(data)
    except Image.DecompressionBombError as err:
        raise ImageError("too_many_pixels", f"image is too large: {err}") from err
    except Image.UnidentifiedImageError as err:
        raise ImageError("not_an_image", "not a recognised image file") from err
    except Exception as err:  # Pillow plugins raise all sorts of things on malformed headers
        reason = "truncated" if "truncated" in str(err).lower() or isinstance(err, EOFError) else "corrupt"
        raise ImageError(reason, f"cannot read the image header: {err or type(err).__name__}") from err
    if img.format not in SUPPORTED_FORMATS:
        raise ImageError(
            "unsupported_format",
            f"image format {img.format} is not supported (use one of: {', '.join(sorted(SUPPORTED_FORMATS))})",
        )
    canvas = width, height = img.size
    if width < 1 or height < 1:
        raise ImageError("corrupt", f"image has an empty canvas ({width}x{height})")
    if draft_to and img.format in _DRAFTABLE and min(width, height) >= 2 * draft_to:
        img.draft(img.mode, (draft_to, draft_to))  # same mode: the colour conversion stays Pillow's
    decoded = img.size[0] * img.size[1]
    if decoded > max_pixels:
        scaled = f", {img.size[0]}x{img.size[1]} at the reduced scale it decodes at" if img.size != canvas else ""
        raise ImageError("too_many_pixels", f"image is {width}x{height} = {width * height} pixels{scaled}, more than "
                         f"the limit of {max_pixels} (CLASSIFIER_MAX_IMAGE_PIXELS); scale it down or send a JPEG")
    return img, canvas


def _composite_alpha(img: Image.Image, onto: str = "black") -> Image.Image:
    """Drop alpha by compositing onto black (transparent pixels become 0), or with ``onto="contrast"``
    onto white when the visible pixels are dark: black ink on a transparent page (a drawing app's
    export) stays visible for a digit model, white ink on one stays white on black."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBa", "La"):  # premultiplied: already composited onto black
        return img.convert("RGB" if img.mode == "RGBa" else "L")
    if img.mode in ("RGBA", "LA"):
        base_mode = img.mode[:-1]
        alpha, base = img.getchannel("A"), img.convert(base_mode)
        level = 255 if onto == "contrast" and _visible_is_dark(base, alpha) else 0
        page = Image.new(base_mode, img.size, (level,) * len(base_mode) if base_mode == "RGB" else level)
        page.paste(base, mask=alpha)
        return page
    return img


def _visible_is_dark(base: Image.Image, alpha: Image.Image) -> bool:
    """The alpha-weighted mean luminance of ``base`` is below mid-grey (a fully transparent image: no)."""
    weights = np.asarray(alpha, dtype=np.float64)
    total = weights.sum()
    return bool(total) and float((np.asarray(base.convert("L"), dtype=np.float64) * weights).sum() / total) < 128


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale -> ``L``. 16-bit scales by 1/257 (65535 -> 255)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L")
    if img.mode == "F":  # no defined range: clip to 0..255 like Pillow's own conversion
        with np.errstate(invalid="ignore"):  # signalling-NaN bit patterns warn on the float64 cast
            arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L")
    return img


def _may_be_rotated(img: Image.Image) -> bool:
    """False only for a loaded JPEG or PNG with none of the metadata where Pillow's ``getexif`` finds an
    orientation (``exif_transpose`` costs a 32x32 JPEG ~7 us of its ~57 us decode, and copies the
    image; Pillow 13, one core). Other formats keep it elsewhere (TIFF's own tags): always checked."""
    return img.format not in ("JPEG", "MPO", "PNG") or any(key in img.info for key in _ORIENTATION_KEYS)


def _check_png_chunks(data: bytes) -> None:
    """What Pillow's ``PngImageFile.verify`` checks, on the bytes: every chunk before ``IEND`` is whole,
    has a valid type and a matching CRC (with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off, as here). At most
    :data:`MAX_PNG_CHUNKS`: Pillow's open and verify took ~3 counted reads a chunk. Raises
    :class:`ImageError` (``truncated`` or ``corrupt``, Pillow's messages)."""
    view, pos = memoryview(data), len(_PNG_SIGNATURE)
    for _ in range(MAX_PNG_CHUNKS):
        if pos + 4 > len(data):  # Pillow: a length needs its 4 bytes; a short type is a bad type
            raise ImageError("truncated", "image data is truncated: truncated PNG file")
        length, kind = int.from_bytes(view[pos:pos + 4], "big"), bytes(view[pos + 4:pos + 8])
        if not _CHUNK_TYPE.match(kind):
            raise ImageError("corrupt", f"image data is corrupt: broken PNG file (chunk {kind!r})")
        if kind == b"IEND":
            return
        end = pos + 8 + length
        if end > len(data):
            raise ImageError("truncated", "image data is truncated: Truncated File Read")
        if end + 4 > len(data):
            raise ImageError("corrupt", f"image data is corrupt: broken PNG file (incomplete checksum in {kind!r})")
        if zlib.crc32(view[pos + 4:end]) != int.from_bytes(view[end:end + 4], "big"):
            raise ImageError("corrupt", f"image data is corrupt: broken PNG file (bad header checksum in {kind!r})")
        pos = end + 4
    raise ImageError("corrupt", f"the file has too many chunks (more than {MAX_PNG_CHUNKS})")


def decode_image(data: bytes, channels: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_to: int | None = None, alpha_onto: str = "black") -> Image.Image:
    """Decode ``data`` into a fully loaded ``PIL.Image`` of mode ``L`` (channels=1) or ``RGB`` (channels=3).

    ``draft_to``: a JPEG at least twice that many pixels on each side decodes at the smallest of
    1/2, 1/4, 1/8 scale that keeps both sides >= ``draft_to``. ``alpha_onto``: ``black`` (the
    contract's default) or ``contrast`` (``digit`` models: onto white when the visible pixels are dark).

    Raises :class:`ImageError` for empty input, non-images, formats outside
    :data:`SUPPORTED_FORMATS`, images over ``max_pixels``, truncated or otherwise corrupt files.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not data:
        raise ImageError("empty", "the file is empty")
    data = bytes(data)
    img, _ = _open(data, max_pixels, draft_to)
    if img.format == "PNG":
        _check_png_chunks(data)
    try:
        img.load()  # a freshly opened image sits on its first frame (animations, multi-page TIFF)
    except Exception as err:
        raise _load_error(err) from err
    try:
        if _may_be_rotated(img):
            img = ImageOps.exif_transpose(img) or img
    except Exception:  # unreadable EXIF: keep the stored orientation rather than refuse the image
        pass
    try:
        img = _to_8bit(_composite_alpha(img, alpha_onto))
        mode = "L" if channels == 1 else "RGB"
        return img if img.mode == mode else img.convert(mode)
    except (ValueError, OSError) as err:  # e.g. a mode Pillow cannot convert
        raise ImageError("unsupported_mode", f"cannot convert image mode {img.mode} to {'L' if channels == 1 else 'RGB'}: {err}") from err


def _load_error(err: Exception) -> ImageError:
    if isinstance(err, ImageError):
        return err
    if isinstance(err, Image.DecompressionBombError):
        return ImageError("too_many_pixels", f"image is too large: {err}")
    text = str(err)
    if "truncated" in text.lower() or isinstance(err, EOFError) or "premature end" in text.lower():
        return ImageError("truncated", f"image data is truncated: {text or type(err).__name__}")
    return ImageError("corrupt", f"image data is corrupt: {text or type(err).__name__}")


def resample_filter(resample: str) -> Image.Resampling:
    """The Pillow filter of a contract ``resize`` name; ``ValueError`` naming the bad one."""
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE_FILTERS)}, got {resample!r}")
    return RESAMPLE_FILTERS[resample]


def resize_image(img: Image.Image, size: int, resample: str = "bilinear") -> Image.Image:
    """Resize to ``size x size`` with the named filter; returns ``img`` itself when already that size."""
    flt = resample_filter(resample)
    if img.size == (size, size):
        return img
    return img.resize((size, size), resample=flt)


def to_chw_uint8(img: Image.Image) -> np.ndarray:
    """``L`` or ``RGB`` image -> contiguous ``uint8 [C, H, W]``."""
    if img.mode not in ("L", "RGB"):
        raise ValueError(f"expected an L or RGB image, got mode {img.mode}")
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def transform_image(img: Image.Image, size: int, resample: str = "bilinear", transform: str = "resize") -> np.ndarray:
    """A decoded ``L``/``RGB`` image -> ``uint8 [C, size, size]`` by the contract's ``input_transform``."""
    if transform == "digit":
        try:
            return input_transform.digit_image(img, size)[None]
        except input_transform.NoInk as err:
            raise ImageError("no_ink", str(err)) from err
    if transform == "crop":
        return to_chw_uint8(input_transform.center_crop(img, size, resample_filter(resample)))
    if transform != "resize":
        raise ValueError(f"input_transform must be one of {input_transform.INPUT_TRANSFORMS}, got {transform!r}")
    return to_chw_uint8(resize_image(img, size, resample))


def transform_array(images: np.ndarray, size: int, resample: str = "bilinear", transform: str = "resize",
                    first_index: int = 0) -> np.ndarray:
    """A dataset's ``uint8 [N, C, H, W]`` -> ``[N, C, size, size]``, each image exactly as
    :func:`transform_image` transforms it decoded from a lossless file. ``digit``: an image without
    ink raises :class:`~service.input_transform.NoInk` naming its index (``first_index`` + position;
    the service answers 422 for it)."""
    if transform == "digit":
        return np.stack([_digit_at(first_index + i, img[0], size) for i, img in enumerate(images)])[:, None]
    if images.shape[-2:] == (size, size):
        return images
    mode = "L" if images.shape[1] == 1 else "RGB"
    out = [transform_image(Image.fromarray(img[0] if mode == "L" else img.transpose(1, 2, 0), mode), size,
                           resample, transform) for img in images]
    return np.stack(out)


def _digit_at(index: int, gray: np.ndarray, size: int) -> np.ndarray:
    try:
        return input_transform.digit_array(gray, size)
    except input_transform.NoInk as err:
        raise input_transform.NoInk(f"image {index}: {err}") from None


def draft_side(image_size: int, transform: str = "resize") -> int:
    """The side a large JPEG decodes down to (at least) for a model of ``image_size`` inputs (``digit``:
    at least its working size, so a small digit in a large photo keeps its strokes)."""
    side = DRAFT_OVERSAMPLE * image_size
    return max(side, input_transform.WORK_SIDE) if transform == "digit" else side


def image_to_array(
    data: bytes,
    *,
    channels: int,
    size: int,
    resample: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    transform: str = "resize",
) -> np.ndarray:
    """Encoded image bytes -> ``uint8 [channels, size, size]`` (decode, transform, layout). Large JPEGs
    decode at reduced scale, down to ``draft_side(size, transform)`` per side."""
    img = decode_image(data, channels, max_pixels=max_pixels, draft_to=draft_side(size, transform),
                       alpha_onto="contrast" if transform == "digit" else "black")
    return transform_image(img, size, resample, transform)


def spec_to_array(data: bytes, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`image_to_array` with a model's :class:`PreprocessSpec`."""
    return image_to_array(data, channels=spec.channels, size=spec.image_size, resample=spec.resize,
                          max_pixels=max_pixels, transform=spec.input_transform)


def preprocess_batch(
    images: Iterable[bytes], spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Many encoded images -> normalized ``float32 [N, C, H, W]`` ready for the model.

    Raises the first :class:`ImageError`; callers that must report every bad file (the service)
    call :func:`image_to_array` per image instead.
    """
    arrays = [spec_to_array(data, spec, max_pixels=max_pixels) for data in images]
    if not arrays:
        return np.zeros((0, *spec.input_shape), dtype=np.float32)
    return normalize(np.stack(arrays), spec.mean, spec.std)
