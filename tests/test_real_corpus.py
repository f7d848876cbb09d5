"""bench/real_corpus.py: the realistic digit corpus is deterministic, decodable and labelled right."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bench import real_corpus

PER_PART, MNIST_LIMIT = 12, 20


@pytest.fixture(scope="module")
def corpus(mnist, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, real_corpus.build_corpus(folder, per_part=PER_PART, seed=3, mnist_limit=MNIST_LIMIT, mnist=mnist,
                                            log=lambda _: None)


def test_same_seed_same_bytes_other_seed_other_bytes(corpus, mnist, tmp_path):
    _, items = corpus
    again = real_corpus.build_corpus(tmp_path / "again", per_part=PER_PART, seed=3, mnist_limit=MNIST_LIMIT,
                                     mnist=mnist, log=lambda _: None)
    assert [(i.part, i.label, i.path.name) for i in items] == [(i.part, i.label, i.path.name) for i in again]
    assert all(a.path.read_bytes() == b.path.read_bytes() for a, b in zip(items, again))
    one = real_corpus.handwritten(np.random.default_rng([9, 9]), mnist.test_images[0])
    assert one == real_corpus.handwritten(np.random.default_rng([9, 9]), mnist.test_images[0])
    assert one.data != real_corpus.handwritten(np.random.default_rng([9, 10]), mnist.test_images[0]).data


def test_every_item_decodes_and_is_what_the_labels_say(corpus):
    folder, items = corpus
    assert (folder / "labels.csv").is_file() and (folder / "manifest.json").is_file()
    assert real_corpus.read_labels(folder) == items
    for item in items:
        with Image.open(item.path) as im:
            im.load()
            assert (im.format, im.mode, im.size) == (item.format, item.mode, (item.width, item.height)), item
        if item.part == "blank":
            assert item.label is None
        else:
            assert isinstance(item.label, str) and item.label in [str(d) for d in range(10)], item


def test_parts_formats_and_modes(corpus):
    _, items = corpus
    counts = {part: sum(i.part == part for i in items) for part in real_corpus.PARTS}
    assert all(counts.values()), counts
    assert counts["mnist"] == MNIST_LIMIT and counts["handwritten"] == counts["typed"] == PER_PART
    assert {i.format for i in items} >= {"JPEG", "PNG"}
    assert {i.mode for i in items} >= {"L", "RGB"}
    assert {i.label for i in items if i.part == "drawn"} == {str(d) for d in range(10)}


def test_handwritten_is_dark_ink_on_light_paper(corpus):
    _, items = corpus
    for item in (i for i in items if i.part == "handwritten"):
        gray = np.asarray(Image.open(item.path).convert("L"), np.float32)
        paper, ink = np.percentile(gray, 50), gray.min()
        assert paper > 120 and ink < paper - 60, (item, paper, ink)


def test_same_settings_reuse_the_folder(corpus, mnist):
    folder, items = corpus
    messages = []
    again = real_corpus.build_corpus(folder, per_part=PER_PART, seed=3, mnist_limit=MNIST_LIMIT, mnist=mnist,
                                     log=messages.append)
    assert again == items and "reusing" in messages[0]


def test_contact_sheet_is_a_png(corpus, tmp_path):
    _, items = corpus
    path = real_corpus.contact_sheet(items, tmp_path / "sheet.png")
    with Image.open(io.BytesIO(path.read_bytes())) as im:
        assert im.format == "PNG" and im.width > 0
