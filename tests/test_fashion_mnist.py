"""FashionMNIST from a mirror folder, end to end, on IDX files these tests write themselves.

No FashionMNIST files are available here, so the tests make a small dataset in its exact format
(gzip-compressed IDX, the published file names), list the files' MD5s in the mirror's MD5SUMS (the
files are not the published ones, whose checksums the download stage knows) and run the real stages
on it: download, train, evaluate, export with its parity gate, promote into a registry of its own.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import struct

import numpy as np
import pytest

from tests.conftest import Project

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]  # torchvision.datasets.FashionMNIST.classes, the labels 0..9 name


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: magic (0, 0, type 0x08 = uint8, number of dimensions), each dimension big-endian, the data."""
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def item_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 item per label, learnable: class k is a bright bar at one of ten positions, rows for
    k < 5 and columns for k >= 5, a few pixels jittered, on dark noise, as FashionMNIST's light
    items on black."""
    images = rng.integers(0, 40, (len(labels), 28, 28), dtype=np.uint8)
    for i, k in enumerate(labels.tolist()):
        at = 3 + 4 * (k % 5) + int(rng.integers(-1, 2))
        if k < 5:
            images[i, at:at + 3, 4:24] = rng.integers(180, 256)
        else:
            images[i, 4:24, at:at + 3] = rng.integers(180, 256)
    return images


def write_fashion_mirror(root, n_train: int = 600, n_test: int = 200, checksums: bool = True, seed: int = 0):
    """`root/fashion_mnist/` as a mirror holds it: the four published file names, gzip'd IDX, and
    (``checksums``) MD5SUMS over the decompressed files. Returns {file stem: (images or labels)}."""
    rng = np.random.default_rng(seed)
    folder = root / "fashion_mnist"
    folder.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        arrays[f"{prefix}-images-idx3-ubyte"] = item_images(labels, rng)
        arrays[f"{prefix}-labels-idx1-ubyte"] = labels
    lines = []
    for stem, array in arrays.items():
        raw = idx_bytes(array)
        (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        lines.append(f"{hashlib.md5(raw).hexdigest()}  {stem}")
    if checksums:
        (folder / "MD5SUMS").write_text("\n".join(lines) + "\n")
    return arrays


@pytest.fixture
def fashion_project(make_project, tmp_path):
    project = make_project("fashion")
    project.mirror = tmp_path / "mirror"
    return project


def write_fashion_params(project: Project, models: dict | None = None, **sections) -> None:
    project.write_params(models or {"cnn": {"epochs": 3}}, limit=0, data={"dataset": "fashion_mnist"}, **sections)


def test_self_written_idx_files_download_with_the_mirrors_md5sums(fashion_project):
    arrays = write_fashion_mirror(fashion_project.mirror)
    write_fashion_params(fashion_project)
    out = fashion_project.run("pipeline.download")
    assert "fashion_mnist" in out.stdout
    prepared = fashion_project.path / "data" / "prepared"
    card = json.loads((prepared / "card.json").read_text())
    assert card["classes"] == FASHION_CLASSES
    assert card["input_transform"] == "resize" and card["channels"] == 1 and card["image_size"] == 28
    assert card["splits"]["train"]["count"] == 600 and card["splits"]["test"]["count"] == 200
    assert set(card["splits"]["test"]["per_class"].values()) == {20}
    assert "not the published fashion_mnist files" in card["notes"] and "MD5SUMS" in card["notes"]
    with np.load(prepared / "train.npz") as npz:  # `resize` at 28 px leaves FashionMNIST's pixels as they are
        np.testing.assert_array_equal(npz["images"][:, 0], arrays["train-images-idx3-ubyte"])
        np.testing.assert_array_equal(npz["labels"], arrays["train-labels-idx1-ubyte"])


def test_files_that_are_not_the_published_ones_need_md5sums(fashion_project):
    write_fashion_mirror(fashion_project.mirror, checksums=False)
    write_fashion_params(fashion_project)
    out = fashion_project.run("pipeline.download", check=False)
    assert out.returncode == 2, out.stderr
    assert "train-images-idx3-ubyte.gz failed its checksum" in out.stderr and "MD5SUMS" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (fashion_project.path / "data" / "prepared").exists()


def test_a_file_that_does_not_match_md5sums_is_refused(fashion_project):
    write_fashion_mirror(fashion_project.mirror)
    labels = fashion_project.mirror / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10  # one label changed: still a valid IDX file, not the listed one
    labels.write_bytes(gzip.compress(bytes(raw)))
    write_fashion_params(fashion_project)
    out = fashion_project.run("pipeline.download", check=False)
    assert out.returncode == 2, out.stderr
    assert "t10k-labels-idx1-ubyte.gz failed its checksum" in out.stderr and "the file is corrupt" in out.stderr


def test_a_malformed_md5sums_line_names_itself(fashion_project):
    write_fashion_mirror(fashion_project.mirror)
    (fashion_project.mirror / "fashion_mnist" / "MD5SUMS").write_text("not-a-digest\n")
    write_fashion_params(fashion_project)
    out = fashion_project.run("pipeline.download", check=False)
    assert out.returncode == 2 and "MD5SUMS line 1" in out.stderr, out.stderr


@pytest.mark.slow
def test_the_pipeline_trains_fashion_mnist_end_to_end(fashion_project):
    """download -> train -> evaluate -> export (parity) -> promote, into a registered model of its own."""
    write_fashion_mirror(fashion_project.mirror)
    write_fashion_params(fashion_project, promote={"registered_model": "fashion-classifier"})
    for module, *args in (("pipeline.download",), ("pipeline.train", "--arch", "cnn"),
                          ("pipeline.evaluate", "--arch", "cnn"), ("pipeline.export", "--arch", "cnn"),
                          ("pipeline.promote",)):
        fashion_project.run(module, *args)
    evaluation = json.loads((fashion_project.path / "outputs" / "cnn" / "eval" / "metrics.json").read_text())
    assert evaluation["test_acc"] >= 0.5, evaluation  # chance is 0.1; the hflip augment confuses mirrored columns
    export = json.loads((fashion_project.path / "exports" / "cnn" / "export.json").read_text())
    assert export["passed"] is True and export["max_abs_logit_diff"] < 1e-3, export
    promotion = json.loads((fashion_project.path / "release" / "promotion.json").read_text())
    assert promotion["registered_model"] == "fashion-classifier" and promotion["decision"] == "champion"
    listing = fashion_project.run("pipeline.promote", "list").stdout
    assert "cnn" in listing and "champion" in listing
    from service.contract import read_metadata

    meta = read_metadata(fashion_project.path / "exports" / "cnn" / "model.onnx")
    assert meta["dataset"] == "fashion_mnist" and json.loads(meta["classes"]) == FASHION_CLASSES
    assert meta["input_transform"] == "resize"
