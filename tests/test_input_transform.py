"""The contract's ``input_transform`` (service/input_transform.py, docs/model-contract.md): MNIST's
digit recipe on real photos-like inputs, the aspect-keeping crop, one definition shared by the
download stage (hence training, evaluation and the parity gate) and the service, and models from
before the key served exactly as before. No server here: tests/service/test_service_digits.py
sends the same images over HTTP."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipeline.params import DataParams, ParamsError
from service import contract
from service import preprocessing as pp
from service.input_transform import NoInk, digit_array, digit_image

pytest.importorskip("hypothesis")  # dev extra
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def encode(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def on_paper(digit: np.ndarray, rng: np.random.Generator, *, canvas=(900, 640), height=160, gradient=40.0,
             ink=50.0) -> Image.Image:
    """MNIST's white-on-black ``digit`` as dark ink on light, grainy paper that darkens by `gradient`
    grey levels across the page, `height` px tall at a random place: a phone photo's worth."""
    width, page_h = canvas
    glyph = np.asarray(Image.fromarray(digit).resize((height, height), Image.Resampling.BICUBIC), np.float32) / 255
    yy, xx = np.mgrid[0:page_h, 0:width].astype(np.float32)
    paper = 235 - gradient * (xx / width + yy / page_h) / 2 + rng.normal(0, 3, (page_h, width))
    top, left = int(rng.integers(0, page_h - height)), int(rng.integers(0, width - height))
    region = paper[top:top + height, left:left + height]
    paper[top:top + height, left:left + height] = region * (1 - glyph) + ink * glyph
    return Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two uint8 images' pixels."""
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def centre_of_mass(img: np.ndarray) -> tuple[float, float]:
    x = img.astype(np.float64)
    ys, xs = np.mgrid[0:x.shape[0], 0:x.shape[1]]
    return float((x * ys).sum() / x.sum()), float((x * xs).sum() / x.sum())


# --- digit: MNIST's own recipe ------------------------------------------------------------------------

def test_mnist_digits_come_out_nearly_unchanged(mnist):
    """Re-normalizing MNIST is close to the identity: same box, same centre, a grey level or less."""
    digits = mnist.test_images[:300]
    out = np.stack([digit_array(d, 28) for d in digits])
    assert np.abs(out.astype(int) - digits.astype(int)).mean() < 1.0
    for img in out[:50]:
        rows, cols = np.flatnonzero(img.any(axis=1)), np.flatnonzero(img.any(axis=0))
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (19, 20, 21)
        cy, cx = centre_of_mass(img)
        assert abs(cy - 14) <= 0.6 and abs(cx - 14) <= 0.6


def test_a_photo_of_ink_on_paper_becomes_the_mnist_digit(mnist):
    rng = np.random.default_rng(0)
    for i in range(8):
        want = digit_array(mnist.test_images[i], 28)
        photo = encode(on_paper(mnist.test_images[i], rng).convert("RGB"), "JPEG", quality=80)
        got = pp.image_to_array(photo, channels=1, size=28, transform="digit")[0]
        assert agreement(got, want) > 0.85, i
        cy, cx = centre_of_mass(got)
        assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1


def test_polarity_comes_from_the_image(mnist):
    digit = mnist.test_images[3]
    np.testing.assert_array_equal(digit_array(255 - digit, 28), digit_array(digit, 28))


def test_uneven_light_and_a_far_away_speck_do_not_move_the_digit(mnist):
    rng = np.random.default_rng(1)
    digit = mnist.test_images[5]
    even = np.asarray(on_paper(digit, rng, gradient=0), np.float32)
    flat = digit_array(even.astype(np.uint8), 28)
    shaded = even * np.linspace(1.0, 0.6, even.shape[1], dtype=np.float32)[None, :]  # 40 % darker across
    assert agreement(digit_array(shaded.astype(np.uint8), 28), flat) > 0.9
    specked = even.copy()
    specked[5:9, 5:9] = 40  # a pen dot in the far corner
    specked[-9:-5, -9:-5] = 40
    assert agreement(digit_array(specked.astype(np.uint8), 28), flat) > 0.95


def test_a_page_photographed_on_a_dark_desk_is_read_inside_the_page(mnist):
    """The desk around the page (a frame of 'ink' along the picture's edge) is not the digit, while the
    page fills most of the picture (README: below ~60 % of it, crop to the paper first)."""
    rng = np.random.default_rng(4)
    for i in (1, 3, 9):
        page = np.asarray(on_paper(mnist.test_images[i], rng, canvas=(800, 600), height=150, gradient=20), np.float32)
        desk = np.full((760, 1000), 45, np.float32) + rng.normal(0, 6, (760, 1000))
        desk[100:700, 120:920] = page
        photo = np.clip(desk, 0, 255).astype(np.uint8)
        assert agreement(digit_array(photo, 28), digit_array(page.astype(np.uint8), 28)) > 0.8, i


def test_the_same_digit_at_any_size_and_margin_gives_the_same_input(mnist):
    rng = np.random.default_rng(2)
    digit = mnist.test_images[7]
    small = digit_image(on_paper(digit, rng, canvas=(120, 90), height=60, gradient=0), 28)
    large = digit_image(on_paper(digit, rng, canvas=(3000, 2000), height=500, gradient=0), 28)
    assert agreement(small, large) > 0.9


@pytest.mark.parametrize("level", [0, 37, 128, 255])
@pytest.mark.parametrize("size", [(1, 1), (28, 28), (640, 480), (10000, 10)])
def test_a_blank_image_has_no_ink(level, size):
    with pytest.raises(NoInk, match="no ink found"):
        digit_image(Image.new("L", size, level), 28)


def test_paper_texture_light_gradients_and_noise_are_not_ink():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    paper = 220 - 40 * xx / 640 + rng.normal(0, 4, xx.shape)
    noise = rng.integers(0, 256, (200, 200))
    for blank in (paper, noise):
        data = encode(Image.fromarray(np.clip(blank, 0, 255).astype(np.uint8)), "JPEG", quality=75)
        with pytest.raises(pp.ImageError) as err:
            pp.image_to_array(data, channels=1, size=28, transform="digit")
        assert (err.value.reason, err.value.status) == ("no_ink", 422)


def images():
    """Arrays no decoder would refuse: any size from 1x1 to 10000x10, blank, all ink, noise, blocks."""
    shapes = st.one_of(st.tuples(st.integers(1, 80), st.integers(1, 80)),
                       st.sampled_from([(1, 1), (10000, 10), (10, 10000), (1, 700), (3, 3)]))

    @st.composite
    def build(draw):
        h, w = draw(shapes)
        seed, kind = draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from(["flat", "noise", "blocks", "ink"]))
        rng = np.random.default_rng(seed)
        if kind == "flat":
            return np.full((h, w), draw(st.integers(0, 255)), np.uint8)
        if kind == "noise":
            return rng.integers(0, 256, (h, w), dtype=np.uint8)
        img = np.full((h, w), 255 if kind == "ink" else int(rng.integers(0, 256)), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            img[y:y + int(rng.integers(1, h + 1)), x:x + int(rng.integers(1, w + 1))] = int(rng.integers(0, 256))
        return img
    return build()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(img=images(), size=st.sampled_from([28, 32, 8]))
def test_any_image_becomes_a_digit_input_or_no_ink(img, size):
    try:
        out = digit_array(img, size)
    except NoInk:  # the one refusal allowed (blank, flat or noise); any other exception fails
        return
    assert out.shape == (size, size) and out.dtype == np.uint8 and out.max() > 0


def in_mode(img: np.ndarray, mode: str) -> Image.Image:
    """``img`` as a Pillow image of ``mode`` (RGBA and LA: the pixels are also the opacity)."""
    if mode == "I;16":
        return Image.fromarray(img.astype(np.uint16) * 257)
    if mode in ("RGBA", "LA"):
        gray = Image.fromarray(img)
        return Image.merge(mode, [gray] * (len(mode) - 1) + [Image.fromarray(255 - img)])
    return Image.fromarray(img).convert(mode)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(img=images(), fmt=st.sampled_from(["PNG", "JPEG"]), mode=st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "I;16"]))
def test_any_encoded_image_becomes_a_digit_input_or_a_422(img, fmt, mode):
    if fmt == "JPEG" and mode not in ("L", "RGB"):
        fmt = "PNG"  # JPEG has no alpha, palette or 16-bit samples
    try:
        out = pp.image_to_array(encode(in_mode(img, mode), fmt), channels=1, size=28, transform="digit")
    except pp.ImageError as err:
        assert (err.reason, err.status) == ("no_ink", 422)
        return
    assert out.shape == (1, 28, 28) and out.dtype == np.uint8


@pytest.mark.parametrize("ink", [0, 255])
def test_ink_on_a_transparent_page_is_read_for_digits(mnist, ink):
    """Black ink on a transparent PNG (a drawing app's export) is composited onto white for a digit
    model, white ink onto black; a model without the key still composites onto black."""
    digit = mnist.test_images[0]
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = ink, digit  # the ink's coverage is its opacity
    data = encode(Image.fromarray(rgba, "RGBA"))
    got = pp.image_to_array(data, channels=1, size=28, transform="digit")[0]
    assert agreement(got, digit_array(digit, 28)) > 0.95
    old = pp.image_to_array(data, channels=1, size=28)[0]
    np.testing.assert_array_equal(old, np.rint(ink * digit.astype(np.float64) / 255).astype(np.uint8))


def test_a_flat_image_is_always_refused_never_guessed():
    for level in range(0, 256, 15):
        with pytest.raises(NoInk):
            digit_array(np.full((28, 28), level, np.uint8), 28)


# --- crop: photos keep their aspect ratio -----------------------------------------------------------

def disc(width: int, height: int, radius: int) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    inside = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 <= radius ** 2
    return Image.fromarray(np.where(inside, 255, 0).astype(np.uint8)).convert("RGB")


def extent(chw: np.ndarray) -> tuple[int, int]:
    ink = chw[0] > 127
    return int(ink.any(axis=1).sum()), int(ink.any(axis=0).sum())


def test_crop_keeps_a_circle_round_where_resize_squashes_it():
    data = encode(disc(192, 96, 40))
    cropped = pp.image_to_array(data, channels=3, size=32, transform="crop")
    squashed = pp.image_to_array(data, channels=3, size=32, transform="resize")
    height, width = extent(cropped)
    assert abs(height - width) <= 1 and height >= 24  # the disc fills the centre square
    assert extent(squashed)[1] < extent(squashed)[0] - 5  # the old path halves its width


def test_crop_is_the_identity_at_the_model_size():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = pp.image_to_array(encode(Image.fromarray(arr)), channels=3, size=32, transform="crop")
    np.testing.assert_array_equal(out, arr.transpose(2, 0, 1))


# --- one definition: download stage = service; old models unchanged -------------------------------

def test_the_download_stage_and_the_service_make_the_same_pixels(tmp_path, data_mirror):
    """The prepared split (what training, evaluation and the parity gate read) is bit for bit what the
    service makes of the same images sent as PNG: one function, service.preprocessing."""
    from pipeline import download

    p = DataParams(dataset="mnist", limit=300)
    raw = download.limit_dataset(download._fetch_full(p, tmp_path / "raw", data_mirror), p.limit, p.seed)
    prepared = download.fetch(p, tmp_path / "raw", data_mirror)
    assert p.transform == "digit" and prepared.transformed and not raw.transformed
    spec = contract.PreprocessSpec(1, 28, (0.1307,), (0.3081,), input_transform="digit")
    served = np.stack([pp.spec_to_array(encode(Image.fromarray(img[0])), spec) for img in raw.test.images])
    np.testing.assert_array_equal(served, prepared.test.images)
    np.testing.assert_array_equal(contract.normalize(served, spec.mean, spec.std),
                                  contract.normalize(prepared.test.images, spec.mean, spec.std))


def test_the_parity_gate_scores_the_tensors_the_service_makes(mnist):
    """Export's parity gate runs ONNX Runtime on the prepared pixels; the service, reading the transform
    from the exported file, makes the same tensor from the image's PNG: the same logits, bit for bit."""
    torch = pytest.importorskip("torch")
    from pipeline.export import export_onnx, parity_check
    from tests.harness import contract_meta

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 26 * 26, 10)).eval()
    meta = contract_meta("tiny", 1000, "digit")
    model_bytes = export_onnx(model, meta, opset=17).SerializeToString()
    raw, labels = mnist.test_images[:64], mnist.test_labels[:64]
    prepared = pp.transform_array(raw[:, None], 28, transform="digit")
    assert parity_check(model_bytes, model, meta, prepared, labels, 1e-4)["passed"]
    spec = contract.PreprocessSpec.from_metadata(contract.read_metadata(model_bytes))
    assert spec.input_transform == "digit"
    served = pp.preprocess_batch([encode(Image.fromarray(img)) for img in raw], spec)
    np.testing.assert_array_equal(contract.run_logits(model_bytes, served),
                                  contract.run_logits(model_bytes, contract.normalize(prepared, spec.mean, spec.std)))


def test_many_images_transform_the_same_in_worker_processes(mnist):
    from pipeline.download import Split, transform_split

    split = Split(mnist.test_images[:5000, None], mnist.test_labels[:5000])
    np.testing.assert_array_equal(transform_split(split, "digit", workers=2).images,
                                  transform_split(split, "digit", workers=1).images)


def test_a_dataset_image_without_ink_stops_the_download_naming_it(mnist):
    from pipeline.download import Dataset, DownloadError, Split, apply_transform

    images = mnist.test_images[:6000, None].copy()
    images[5123] = 0  # in the second worker's chunks: the index is the split's, not the chunk's
    ds = Dataset("mnist", [str(i) for i in range(10)], Split(images, mnist.test_labels[:6000]),
                 Split(images[:10], mnist.test_labels[:10]), "test")
    with pytest.raises(DownloadError, match=r"mnist train split, image 5123: no ink found"):
        apply_transform(ds, "digit")


def test_a_model_without_the_key_is_served_exactly_as_before():
    props = {"classes": '["a","b"]', "in_channels": "3", "image_size": "16", "mean": "[0.5,0.5,0.5]",
             "std": "[0.25,0.25,0.25]"}
    spec = contract.PreprocessSpec.from_metadata(props)
    assert spec.input_transform == "resize"
    data = encode(disc(50, 20, 8), "PNG")
    before = pp.to_chw_uint8(pp.resize_image(pp.decode_image(data, 3, draft_to=64), 16, "bilinear"))
    np.testing.assert_array_equal(pp.spec_to_array(data, spec), before)
    assert contract.metadata_props({**props, "arch": "a", "dataset": "d", "mlflow_run_id": "r", "num_params": 1,
                                    "classes": ["a", "b"], "mean": [0.5], "std": [0.25]})["input_transform"] == "resize"


def test_the_contract_refuses_bad_transforms():
    base = {"classes": '["a","b"]', "in_channels": "1", "image_size": "28", "mean": "[0.5]", "std": "[0.25]"}
    assert contract.PreprocessSpec.from_metadata({**base, "input_transform": "DIGIT"}).input_transform == "digit"
    with pytest.raises(ValueError, match="input_transform must be one of"):
        contract.PreprocessSpec.from_metadata({**base, "input_transform": "fisheye"})
    rgb = {**base, "in_channels": "3", "mean": "[0.5,0.5,0.5]", "std": "[0.2,0.2,0.2]", "input_transform": "digit"}
    with pytest.raises(ValueError, match="1-channel"):
        contract.PreprocessSpec.from_metadata(rgb)


def test_params_choose_the_transform_per_dataset():
    assert DataParams(dataset="mnist").transform == "digit"
    assert DataParams(dataset="cifar10").transform == "crop"
    assert DataParams(dataset="mnist", input_transform={"mnist": "resize"}).transform == "resize"
    with pytest.raises(ParamsError, match="data.input_transform.cifar10"):
        DataParams(dataset="cifar10", input_transform={"cifar10": "digit"})
    with pytest.raises(ParamsError, match="one of resize, crop, digit"):
        DataParams(input_transform={"mnist": "squash"})
    with pytest.raises(ParamsError, match="a dataset name"):
        DataParams(input_transform={"svhn": "crop"})
    DataParams(dataset="imagefolder", source="x", channels=1, input_transform={"imagefolder": "digit"})


#: sha256 of digit_array over _pin_corpus, computed by the implementation before its speed-up (HEAD
#: f1d9ded: 238 -> ~80 us per 28x28 image); the rewrite must give the same pixels. Pillow's resampling
#: is part of it (the corpus and _fit resize with it): a Pillow upgrade that changes a filter changes it.
DIGIT_PIN = "7c438e175c57af8ad467253ff0539f1804382cb93ebbbe53139f9d2d2db7e542"


def _pin_corpus(mnist):
    rng = np.random.default_rng(0)
    out = list(mnist.test_images[:2000])
    for i in range(200):  # photo-like: dark ink on uneven paper, noise, other sizes and aspect ratios
        side = int(rng.integers(20, 400))
        im = np.asarray(Image.fromarray(255 - mnist.test_images[2000 + i]).resize((side, int(side * rng.uniform(0.6, 1.5)))))
        light = np.linspace(0, rng.uniform(0, 80), im.shape[1])[None, :]
        out.append(np.clip(im - light + rng.normal(0, rng.uniform(0, 12), im.shape), 0, 255).astype(np.uint8))
    return out


def test_digit_array_gives_the_pixels_it_gave_before_its_speed_up(mnist):
    digest = hashlib.sha256()
    for gray in _pin_corpus(mnist):
        try:
            digest.update(digit_array(gray, 28).tobytes())
        except NoInk:
            digest.update(b"no ink")
    assert digest.hexdigest() == DIGIT_PIN
