"""Unit tests for service/preprocessing.py: every accepted format/mode, the error classes, the maths."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import svc_images
from service import preprocessing as pp
from service.preprocessing import ImageError, PreprocessSpec

SAMPLES = svc_images.sample_images()
LOSSLESS_RGB = ["png_rgb", "webp_lossless", "bmp_rgb", "tiff_rgb", "tiff_multipage"]


def test_module_is_dependency_light():
    """The training pipeline imports it: no bentoml, onnxruntime or torch may come along."""
    code = (
        "import sys, service.preprocessing\n"
        "bad = [m for m in ('bentoml', 'onnxruntime', 'torch', 'starlette') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pp.__file__.rsplit("/service/", 1)[0])


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_sample_decodes(name, channels):
    img = pp.decode_image(SAMPLES[name], channels)
    assert img.mode == ("L" if channels == 1 else "RGB")
    assert img.size == (40, 30)
    arr = pp.image_to_array(SAMPLES[name], channels=channels, size=28)
    assert arr.shape == (channels, 28, 28) and arr.dtype == np.uint8 and arr.flags.c_contiguous


@pytest.mark.parametrize("name", LOSSLESS_RGB)
def test_lossless_formats_give_exact_pixels(name):
    img = pp.decode_image(SAMPLES[name], 3)
    np.testing.assert_array_equal(np.asarray(img), svc_images.gradient())


def test_jpeg_variants_are_close_to_the_source():
    expected = svc_images.gradient().astype(int)
    for name in ("jpeg_rgb", "jpeg_progressive", "jpeg_cmyk", "webp_lossy"):
        got = np.asarray(pp.decode_image(SAMPLES[name], 3)).astype(int)
        assert np.abs(got - expected).mean() < 6, name


def test_grayscale_conversion_uses_pillow_luma():
    expected = np.asarray(svc_images.rgb_image().convert("L"))
    np.testing.assert_array_equal(np.asarray(pp.decode_image(SAMPLES["png_rgb"], 1)), expected)
    np.testing.assert_array_equal(np.asarray(pp.decode_image(SAMPLES["png_gray"], 1)), expected)
    rgb = np.asarray(pp.decode_image(SAMPLES["png_gray"], 3))
    assert rgb.shape == (30, 40, 3) and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_alpha_is_composited_onto_black():
    arr = np.zeros((2, 3, 4), np.uint8)
    arr[..., :3] = (200, 100, 50)
    arr[0, :, 3] = (0, 255, 128)
    arr[1, :, 3] = 255
    data = svc_images.encode(Image.fromarray(arr, mode="RGBA"), "PNG")
    out = np.asarray(pp.decode_image(data, 3)).astype(int)
    np.testing.assert_array_equal(out[0, 0], (0, 0, 0))
    np.testing.assert_array_equal(out[0, 1], (200, 100, 50))
    assert np.abs(out[0, 2] - np.array([100, 50, 25])).max() <= 1
    np.testing.assert_array_equal(out[1], np.tile([200, 100, 50], (3, 1)))


def test_palette_transparency_is_composited_onto_black():
    pal = Image.new("P", (4, 1))
    pal.putpalette([255, 255, 255] * 2 + [0, 0, 0] * 254)
    pal.putdata([0, 1, 0, 1])
    data = svc_images.encode(pal, "PNG", transparency=0)
    out = np.asarray(pp.decode_image(data, 1))
    np.testing.assert_array_equal(out, [[0, 255, 0, 255]])


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535, 257 * 7 + 100]], dtype=np.uint16)
    for fmt in ("PNG", "TIFF"):
        data = svc_images.encode(Image.fromarray(values), fmt)
        out = np.asarray(pp.decode_image(data, 1))
        np.testing.assert_array_equal(out, [[0, 100, 255, 7]], err_msg=fmt)


def test_first_frame_of_animations_and_multipage_tiff():
    first = svc_images.gradient()
    np.testing.assert_array_equal(np.asarray(pp.decode_image(SAMPLES["tiff_multipage"], 3)), first)
    gif_first = np.asarray(Image.open(io.BytesIO(SAMPLES["gif_animated"])).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(pp.decode_image(SAMPLES["gif_animated"], 3)), gif_first)


def test_exif_orientation_is_applied():
    img = svc_images.rgb_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = svc_images.encode(img, "JPEG", quality=95, exif=exif)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    assert pp.decode_image(data, 3).size == (20, 40)


def test_only_the_png_plugin_verifies_so_the_others_skip_the_check():
    """Pillow's verify() is ImageFile's no-op for every plugin but PNG's, whose checks decode_image makes
    on the bytes (_check_png_chunks). A Pillow that adds a real one to another plugin fails here."""
    from PIL import (BmpImagePlugin, GifImagePlugin, ImageFile, JpegImagePlugin, MpoImagePlugin, PngImagePlugin,
                     TiffImagePlugin, WebPImagePlugin)

    plugins = {"PNG": PngImagePlugin.PngImageFile, "JPEG": JpegImagePlugin.JpegImageFile,
               "MPO": MpoImagePlugin.MpoImageFile, "WEBP": WebPImagePlugin.WebPImageFile,
               "BMP": BmpImagePlugin.BmpImageFile, "DIB": BmpImagePlugin.DibImageFile,
               "TIFF": TiffImagePlugin.TiffImageFile, "GIF": GifImagePlugin.GifImageFile}
    assert set(plugins) == pp.SUPPORTED_FORMATS
    for fmt, plugin in plugins.items():
        assert (plugin.verify is not ImageFile.ImageFile.verify) == (fmt == "PNG"), fmt


def _pillow_verdict(data: bytes):
    """Pillow's verify of a PNG that opens: None, or the ImageError decode_image made of its error; or
    "no-open" when the header parse already refuses it (both paths then fail in _open)."""
    try:
        img = Image.open(io.BytesIO(data))
    except Exception:
        return "no-open"
    try:
        img.verify()
    except Exception as err:
        e = pp._load_error(err)
        return e.reason, str(e)
    return None


def _our_verdict(data: bytes):
    try:
        pp._check_png_chunks(data)
    except pp.ImageError as err:
        return err.reason, str(err)
    return None


def test_the_png_chunk_check_agrees_with_pillows_verify_on_damaged_files():
    """Every cut and a byte flipped at every position of PNGs with several chunks (text, two IDATs, data
    after IEND): the same verdict, reason and message as Pillow's verify."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "a text chunk before the pixels")
    img = svc_images.rgb_image(30, 20)
    base = svc_images.encode(img, "PNG", pnginfo=info)
    idat = base.index(b"IDAT") - 4  # split the one IDAT into two: Pillow reads across chunks
    length = int.from_bytes(base[idat:idat + 4], "big")
    body = base[idat + 8:idat + 8 + length]
    two = b"".join(svc_images.png_chunk(b"IDAT", part) for part in (body[:length // 2], body[length // 2:]))
    split = base[:idat] + two + base[idat + 12 + length:]
    seen = set()
    for png in (base, split, split + b"trailing bytes after IEND"):
        assert _our_verdict(png) is None and _pillow_verdict(png) is None
        variants = [png[:cut] for cut in range(len(png))]
        variants += [png[:i] + bytes([png[i] ^ 0x41]) + png[i + 1:] for i in range(len(png))]
        for data in variants:
            pillow = _pillow_verdict(data)
            if pillow == "no-open":
                continue
            assert _our_verdict(data) == pillow, data
            seen.add(pillow and pillow[0])
    assert seen == {None, "truncated", "corrupt"}  # every kind of verdict was compared


def test_png_orientation_is_applied_and_a_plain_png_keeps_its_pixels():
    img = svc_images.rgb_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = svc_images.encode(img, "PNG", exif=exif)
    assert pp.decode_image(rotated, 3).size == (20, 40)
    plain = svc_images.encode(img, "PNG")
    assert not any(key in Image.open(io.BytesIO(plain)).info for key in pp._ORIENTATION_KEYS)
    np.testing.assert_array_equal(np.asarray(pp.decode_image(plain, 3)), np.asarray(img))


def test_xmp_orientation_is_applied_and_a_plain_jpeg_keeps_its_pixels():
    img = svc_images.rgb_image(40, 20)
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    rotated = svc_images.encode(img, "JPEG", quality=95, xmp=xmp)
    assert "exif" not in Image.open(io.BytesIO(rotated)).info  # the orientation is in XMP only
    assert pp.decode_image(rotated, 3).size == (20, 40)
    plain = svc_images.encode(img, "JPEG", quality=95)
    np.testing.assert_array_equal(np.asarray(pp.decode_image(plain, 3)), np.asarray(Image.open(io.BytesIO(plain)).convert("RGB")))


def test_resize_uses_the_named_filter_and_skips_same_size():
    img = svc_images.rgb_image(40, 30)
    for name, flt in pp.RESAMPLE_FILTERS.items():
        expected = np.asarray(img.resize((16, 16), resample=flt))
        np.testing.assert_array_equal(np.asarray(pp.resize_image(img, 16, name)), expected)
    square = svc_images.rgb_image(16, 16)
    assert pp.resize_image(square, 16, "bicubic") is square
    with pytest.raises(ValueError):
        pp.resize_image(img, 16, "fancy")


def test_to_chw_layout():
    img = svc_images.rgb_image(5, 4)
    arr = pp.to_chw_uint8(img)
    assert arr.shape == (3, 4, 5)
    np.testing.assert_array_equal(arr.transpose(1, 2, 0), np.asarray(img))
    assert pp.to_chw_uint8(img.convert("L")).shape == (1, 4, 5)
    with pytest.raises(ValueError):
        pp.to_chw_uint8(img.convert("RGBA"))


def test_normalize_matches_the_contract_formula():
    batch = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2) * 10
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = pp.normalize(batch, mean, std)
    assert out.dtype == np.float32 and out.shape == batch.shape
    expected = (batch / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pp.normalize(batch[0], mean, std), out[0])
    with pytest.raises(ValueError):
        pp.normalize(batch.astype(np.float32), mean, std)
    with pytest.raises(ValueError):
        pp.normalize(batch, (0.5,), (0.2,))


@pytest.mark.parametrize("mean, std", [((0.1307,), (0.3081,)), ((0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616))])
def test_normalize_is_bit_identical_to_the_float32_arithmetic(mean, std):
    """Every uint8 value, 1 and 3 channels: training (BatchMaker), export and serving rely on this formula."""
    channels = len(mean)
    batch = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16), (2, channels, 16, 16)).copy()
    batch[1] = batch[1, :, ::-1]
    m, s = (np.asarray(v, np.float32).reshape(channels, 1, 1) for v in (mean, std))
    arithmetic = (batch.astype(np.float32) / np.float32(255.0) - m) / s
    np.testing.assert_array_equal(pp.normalize(batch, mean, std), arithmetic)
    np.testing.assert_array_equal(pp.normalize(batch[1], mean, std), arithmetic[1])


def test_preprocess_batch_and_pipeline_signature():
    spec = PreprocessSpec(channels=1, image_size=28, mean=(0.1307,), std=(0.3081,))
    batch = pp.preprocess_batch([SAMPLES["png_rgb"], SAMPLES["jpeg_gray"]], spec)
    assert batch.shape == (2, 1, 28, 28) and batch.dtype == np.float32
    # pipeline/download.py calls image_to_array(bytes, channels=..., size=...) and catches ImageError
    arr = pp.image_to_array(SAMPLES["png_rgb"], channels=1, size=28)
    np.testing.assert_allclose(pp.normalize(arr, spec.mean, spec.std), batch[0])
    assert pp.preprocess_batch([], spec).shape == (0, 1, 28, 28)
    assert issubclass(ImageError, ValueError)


# --- error classes --------------------------------------------------------------------------------

def _reason(data: bytes, **kw) -> tuple[str, int]:
    with pytest.raises(ImageError) as info:
        pp.decode_image(data, 3, **kw)
    return info.value.reason, info.value.status


def test_empty_file():
    assert _reason(b"") == ("empty", 400)


@pytest.mark.parametrize("data", [b"hello world, not an image", bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n"])
def test_not_an_image(data):
    reason, status = _reason(data)
    assert status in (400, 415) and reason in ("not_an_image", "corrupt", "truncated")


def test_random_bytes_are_not_an_image():
    assert _reason(np.random.default_rng(0).bytes(5000)) == ("not_an_image", 415)


@pytest.mark.parametrize("name", sorted(svc_images.unsupported_images()))
def test_unsupported_formats(name):
    assert _reason(svc_images.unsupported_images()[name]) == ("unsupported_format", 415)


@pytest.mark.parametrize(
    "fmt, params",
    [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("WEBP", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {})],
)
def test_truncated_files(fmt, params):
    data = svc_images.encode(svc_images.rgb_image(200, 150), fmt, **params)
    reason, status = _reason(svc_images.truncated(data, 0.5))
    assert status == 400 and reason in ("truncated", "corrupt"), reason


def test_corrupt_png_checksum():
    assert _reason(svc_images.corrupt_png_crc(SAMPLES["png_rgb"]))[1] == 400


def test_pixel_limit_refuses_before_decoding():
    assert _reason(svc_images.png_bomb(100_000, 100_000)) == ("too_many_pixels", 413)
    assert _reason(svc_images.png_bomb(5_000, 5_000), max_pixels=1_000_000) == ("too_many_pixels", 413)
    data = svc_images.encode(svc_images.rgb_image(100, 100), "PNG")
    assert _reason(data, max_pixels=9_999) == ("too_many_pixels", 413)
    assert pp.decode_image(data, 3, max_pixels=10_000).size == (100, 100)


def test_image_error_carries_reason_and_status():
    err = ImageError("too_many_pixels", "big")
    assert (err.reason, err.status, str(err)) == ("too_many_pixels", 413, "big")
    with pytest.raises(ValueError):
        ImageError("nonsense", "x")


# --- metadata -> spec -------------------------------------------------------------------------------

CONTRACT_PROPS = {
    "classes": '["0","1","2","3","4","5","6","7","8","9"]',
    "in_channels": "1",
    "image_size": "28",
    "mean": "[0.1307]",
    "std": "[0.3081]",
    "resize": "bilinear",
}


def test_spec_from_onnx_string_props_and_parsed_mirror():
    spec = PreprocessSpec.from_metadata(CONTRACT_PROPS)
    assert spec == PreprocessSpec(1, 28, (0.1307,), (0.3081,), "bilinear", tuple("0123456789"))
    mirror = {"classes": list("0123456789"), "in_channels": 1, "image_size": 28, "mean": [0.1307], "std": [0.3081]}
    assert PreprocessSpec.from_metadata(mirror) == spec
    assert spec.input_shape == (1, 28, 28)


@pytest.mark.parametrize(
    "change",
    [
        {"in_channels": "2"},
        {"image_size": "0"},
        {"image_size": "big"},
        {"mean": "[0.1, 0.2]"},
        {"std": "[0]"},
        {"std": '"wide"'},
        {"resize": "fancy"},
        {"classes": "[]"},
    ],
)
def test_spec_rejects_bad_metadata(change):
    with pytest.raises(ValueError):
        PreprocessSpec.from_metadata({**CONTRACT_PROPS, **change})


def test_spec_names_missing_keys():
    with pytest.raises(ValueError, match="std"):
        PreprocessSpec.from_metadata({k: v for k, v in CONTRACT_PROPS.items() if k != "std"})


def test_only_small_jpeg_and_png_files_skip_the_read_counter():
    """A file that cannot hold MAX_FILE_READS markers or chunks is read plainly (its Pillow plugin stops at
    the end of the file); anything larger, or of another format, has its reads counted."""
    limit = pp.MAX_FILE_READS
    for head in (b"\xff\xd8", b"\x89PNG\r\n\x1a\n"):
        assert type(pp._reader(head.ljust(limit, b"\0"))) is io.BytesIO
        assert isinstance(pp._reader(head.ljust(limit + 1, b"\0")), pp._BoundedReads)
    assert isinstance(pp._reader(b"GIF89a".ljust(100, b"\0")), pp._BoundedReads)
