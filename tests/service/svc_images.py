"""Test-image factories (Pillow only): every format/mode the service accepts, and broken inputs."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def gradient(width: int = 40, height: int = 30) -> np.ndarray:
    """A deterministic RGB test pattern, uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), ((x + y) * 7) % 256], axis=-1).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def stroke_png() -> bytes:
    """A 28x28 white-on-black PNG of one vertical stroke (a "1"): an image every model answers, a digit
    model too (a blank one is its 422 no_ink)."""
    arr = np.zeros((28, 28), np.uint8)
    arr[4:24, 13:16] = 255
    return encode(Image.fromarray(arr), "PNG")


def rgb_image(width: int = 40, height: int = 30) -> Image.Image:
    return Image.fromarray(gradient(width, height), mode="RGB")


def sample_images() -> dict[str, bytes]:
    """name -> encoded bytes, one per supported format/mode combination."""
    rgb = rgb_image()
    gray = rgb.convert("L")
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.full((30, 40), 200, np.uint8)))
    la = gray.copy()
    la.putalpha(128)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    bilevel = gray.point(lambda v: 255 if v > 127 else 0).convert("1")
    g16 = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # mode I;16
    cmyk = rgb.convert("CMYK")
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    out = {
        "png_rgb": encode(rgb, "PNG"),
        "png_gray": encode(gray, "PNG"),
        "png_rgba": encode(rgba, "PNG"),
        "png_la": encode(la, "PNG"),
        "png_palette": encode(pal, "PNG"),
        "png_palette_transparent": encode(pal_t, "PNG", transparency=0),
        "png_1bit": encode(bilevel, "PNG"),
        "png_16bit": encode(g16, "PNG"),
        "jpeg_rgb": encode(rgb, "JPEG", quality=95),
        "jpeg_gray": encode(gray, "JPEG", quality=95),
        "jpeg_progressive": encode(rgb, "JPEG", quality=95, progressive=True),
        "jpeg_cmyk": encode(cmyk, "JPEG", quality=95),
        "webp_lossless": encode(rgb, "WEBP", lossless=True),
        "webp_lossy": encode(rgb, "WEBP", quality=90),
        "webp_rgba": encode(rgba, "WEBP", lossless=True),
        "bmp_rgb": encode(rgb, "BMP"),
        "bmp_gray": encode(gray, "BMP"),
        "bmp_palette": encode(pal, "BMP"),
        "tiff_rgb": encode(rgb, "TIFF"),
        "tiff_rgba": encode(rgba, "TIFF"),
        "tiff_16bit": encode(g16, "TIFF"),
        "tiff_cmyk": encode(cmyk, "TIFF"),
        "tiff_multipage": encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "gif": encode(pal, "GIF"),
        "gif_animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
    }
    return out


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes claiming a huge 8-bit grayscale canvas (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * keep))]


def corrupt_png_crc(data: bytes) -> bytes:
    """Flip one byte inside the IDAT payload (the chunk CRC no longer matches)."""
    at = data.index(b"IDAT") + 8
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def unsupported_images() -> dict[str, bytes]:
    """Real images in formats the service refuses."""
    rgb = rgb_image(16, 16)
    return {"ico": encode(rgb, "ICO"), "ppm": encode(rgb, "PPM"), "pcx": encode(rgb, "PCX"), "tga": encode(rgb, "TGA")}
