"""The download stage: mirror files verified, prepared tensors and card correct, failures leave nothing.

End-to-end tests run `python -m pipeline.download` with DATA_MIRROR set (see conftest.py).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil

import numpy as np
import pytest

from pipeline.download import Dataset, Split, limit_dataset, save_prepared, stratified_split
from tests.conftest import MNIST_FILES

MNIST_TRAIN_PER_CLASS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_PER_CLASS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(data_dir):
    """Temporary or backup folders an interrupted/failed atomic replacement could leave in data/."""
    return sorted(p.name for p in data_dir.iterdir() if p.name.startswith("."))


def copy_mirror(tmp_path, source):
    mirror = tmp_path / "mirror"
    shutil.copytree(source / "mnist", mirror / "mnist")
    for file in (mirror / "mnist").iterdir():
        file.chmod(0o644)  # the shared copy is read-only
    return mirror


def fake_dataset(n_train=40, n_test=20, seed=0):
    rng = np.random.default_rng(seed)

    def split(n):
        return Split(rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.int64) % 10)

    return Dataset("mnist", [str(i) for i in range(10)], split(n_train), split(n_test), "fake")


@pytest.fixture
def mnist_project(project, data_mirror):
    project.write_params({"cnn": {}}, limit=2000)
    return project


# --- a good mirror ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_download_prepares_a_verified_stratified_subset(mnist_project):
    project = mnist_project
    stale = project.path / "data" / "prepared" / "stale-file-from-an-earlier-run"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")

    out = project.run("pipeline.download")
    assert "mnist" in out.stdout

    prepared = project.path / "data" / "prepared"
    assert sorted(p.name for p in prepared.iterdir()) == ["card.json", "test.npz", "train.npz"]  # replaced whole
    assert leftovers(project.path / "data") == []
    card = json.loads((prepared / "card.json").read_text())
    assert card["dataset"] == "mnist" and card["num_classes"] == 10
    assert card["classes"] == [str(i) for i in range(10)]
    assert (card["channels"], card["image_size"]) == (1, 28)
    assert str(project.mirror) in card["source"]
    assert "data.limit" in card["notes"]

    full = {"train": MNIST_TRAIN_PER_CLASS, "test": MNIST_TEST_PER_CLASS}
    for split in ("train", "test"):
        with np.load(prepared / f"{split}.npz") as npz:
            assert sorted(npz.files) == ["images", "labels"]
            images, labels = npz["images"], npz["labels"]
        info = card["splits"][split]
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (1, 28, 28)
        assert labels.dtype == np.int64 and labels.shape == (len(images),)
        assert info["count"] == len(labels) and 1990 <= len(labels) <= 2000
        assert sum(info["per_class"].values()) == info["count"]
        assert list(info["per_class"].values()) == np.bincount(labels, minlength=10).tolist()
        # stratified: each class keeps its share of the full split (within rounding)
        expected = np.array(full[split]) * 2000 / sum(full[split])
        assert np.abs(np.array(list(info["per_class"].values())) - expected).max() <= 1
        assert info["sha256"] == hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
        assert 0 < images.mean() < 255 and images.max() == 255  # real pixels, not a blank array

    with np.load(prepared / "train.npz") as npz:
        pixels = npz["images"].astype(np.float64) / 255
    assert card["mean"][0] == pytest.approx(pixels.mean(), abs=1e-4)
    assert card["std"][0] == pytest.approx(pixels.std(), abs=1e-4)
    assert card["mean"][0] == pytest.approx(0.1307, abs=0.005)
    assert card["std"][0] == pytest.approx(0.3081, abs=0.005)

    # the stage's MLflow run (in the project's own store) carries the card
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=project.tracking_uri)
    experiment = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["dataset"] == "mnist"
    assert run.data.metrics["train_count"] == card["splits"]["train"]["count"]
    assert "dataset_card.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


# --- a bad mirror ----------------------------------------------------------------------------------

def test_a_corrupt_mirror_file_fails_naming_it(mnist_project, tmp_path):
    project = mnist_project
    mirror = copy_mirror(tmp_path, project.mirror)
    target = mirror / "mnist" / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(target.read_bytes()))
    data[500] ^= 0x01  # one label changed: still a well-formed IDX file and gzip, wrong checksum
    target.write_bytes(gzip.compress(bytes(data)))

    out = project.run("pipeline.download", check=False, env=project.env(DATA_MIRROR=str(mirror)))
    assert out.returncode != 0
    assert "t10k-labels-idx1-ubyte.gz" in out.stderr and "checksum" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (project.path / "data" / "prepared").exists()
    assert not (project.path / "mlflow.db").exists()


def test_a_truncated_gzip_fails_naming_it(mnist_project, tmp_path):
    project = mnist_project
    mirror = copy_mirror(tmp_path, project.mirror)
    target = mirror / "mnist" / "train-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:1000])

    out = project.run("pipeline.download", check=False, env=project.env(DATA_MIRROR=str(mirror)))
    assert out.returncode != 0
    assert "train-labels-idx1-ubyte.gz" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (project.path / "data" / "prepared").exists()


def test_an_empty_mirror_names_the_dataset_the_file_and_data_mirror(mnist_project, tmp_path):
    project = mnist_project
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    out = project.run("pipeline.download", check=False, env=project.env(DATA_MIRROR=str(empty)))
    assert out.returncode != 0
    assert "'mnist'" in out.stderr and "DATA_MIRROR" in out.stderr, out.stderr
    assert any(name in out.stderr for name in MNIST_FILES.values()), out.stderr
    assert "Traceback" not in out.stderr
    assert not (project.path / "data" / "prepared").exists()


def test_a_mirror_that_is_not_a_folder_fails(mnist_project, tmp_path):
    project = mnist_project
    out = project.run("pipeline.download", check=False, env=project.env(DATA_MIRROR=str(tmp_path / "nowhere")))
    assert out.returncode != 0 and "DATA_MIRROR" in out.stderr and "nowhere" in out.stderr, out.stderr
    assert not (project.path / "data" / "prepared").exists()


def test_an_existing_prepared_dataset_survives_a_failed_run_unchanged(mnist_project, tmp_path):
    project = mnist_project
    prepared = project.path / "data" / "prepared"
    save_prepared(fake_dataset(), prepared)
    before = snapshot(prepared)
    mirror = copy_mirror(tmp_path, project.mirror)
    (mirror / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")

    out = project.run("pipeline.download", check=False, env=project.env(DATA_MIRROR=str(mirror)))
    assert out.returncode != 0 and "train-images-idx3-ubyte.gz" in out.stderr, out.stderr
    assert snapshot(prepared) == before
    assert leftovers(project.path / "data") == []


def test_save_prepared_replaces_atomically_or_not_at_all(tmp_path, monkeypatch):
    prepared = tmp_path / "data" / "prepared"
    save_prepared(fake_dataset(seed=0), prepared)
    before = snapshot(prepared)

    real_savez = np.savez

    def savez_then_fail(path, **arrays):
        real_savez(path, **arrays)
        if str(path).endswith("test.npz"):
            raise OSError("disk full")

    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_prepared(fake_dataset(seed=1), prepared)
    assert snapshot(prepared) == before  # the half-written new version never became visible
    assert leftovers(tmp_path / "data") == []
    monkeypatch.undo()

    card = save_prepared(fake_dataset(n_train=30, seed=2), prepared)
    assert snapshot(prepared) != before and card["splits"]["train"]["count"] == 30
    assert json.loads((prepared / "card.json").read_text()) == card
    assert leftovers(tmp_path / "data") == []


def test_bad_data_params_fail_before_any_work(project, data_mirror):
    project.write_params({"cnn": {}}, data={"dataset": "mnits"})
    out = project.run("pipeline.download", check=False)
    assert out.returncode != 0 and "data.dataset = 'mnits'" in out.stderr, out.stderr
    assert not (project.path / "data").exists()


# --- units -----------------------------------------------------------------------------------------

def split_of(counts, seed=0):
    """A split whose images are unique ids (so samples can be traced) with `counts[c]` items of class c."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))  # classes interleaved
    ids = np.arange(len(labels), dtype=np.int64)
    images = ids.astype("<u4").view(np.uint8).reshape(-1, 1, 2, 2)  # 4 bytes per image = its id
    return Split(images[order], labels[order])


def ids_of(split):
    return set(split.images.reshape(len(split.images), 4).copy().view("<u4").ravel().tolist())


def test_stratified_split_carves_each_class_and_is_deterministic():
    split = split_of([100, 50, 10, 3])
    rest, carved = stratified_split(split, 0.2, seed=3)
    assert np.bincount(carved.labels, minlength=4).tolist() == [20, 10, 2, 1]  # at least one per class
    assert np.bincount(rest.labels, minlength=4).tolist() == [80, 40, 8, 2]
    assert ids_of(rest) | ids_of(carved) == ids_of(split) and not ids_of(rest) & ids_of(carved)
    for part in (rest, carved):  # labels still travel with their images
        assert part.images.shape[0] == part.labels.shape[0] and part.labels.dtype == np.int64
    id_to_label = dict(zip(split.images.reshape(-1, 4).copy().view("<u4").ravel().tolist(), split.labels.tolist()))
    assert all(id_to_label[i] == label for i, label in
               zip(carved.images.reshape(-1, 4).copy().view("<u4").ravel().tolist(), carved.labels.tolist()))

    again_rest, again = stratified_split(split, 0.2, seed=3)
    assert np.array_equal(again.images, carved.images) and np.array_equal(again_rest.images, rest.images)
    assert ids_of(stratified_split(split, 0.2, seed=4)[1]) != ids_of(carved)


def test_limit_dataset_keeps_class_proportions():
    ds = Dataset("x", ["a", "b", "c"], split_of([300, 200, 100]), split_of([30, 20, 10], seed=1), "src", "shipped")
    small = limit_dataset(ds, 60, seed=0)
    assert np.bincount(small.train.labels).tolist() == [30, 20, 10]
    assert ids_of(small.train) <= ids_of(ds.train)
    assert small.test is ds.test  # already within the limit: unchanged
    assert small.classes == ds.classes and small.name == "x" and small.source == "src"
    assert "shipped" in small.notes and "60" in small.notes
    assert ids_of(limit_dataset(ds, 60, seed=0).train) == ids_of(small.train)  # deterministic

    everything = limit_dataset(ds, 0, seed=0)
    assert len(everything.train.labels) == 600 and everything.notes == "shipped"


@pytest.mark.parametrize("counts, limit", [([1000] * 10, 2000), ([5923, 6742, 5958], 777), ([300, 200, 100], 10)])
def test_limit_dataset_returns_at_most_limit_images(counts, limit):
    ds = Dataset("x", [str(i) for i in range(len(counts))], split_of(counts), split_of(counts), "src")
    small = limit_dataset(ds, limit, seed=0)
    assert len(small.train.labels) <= limit
    assert set(small.train.labels.tolist()) == set(range(len(counts)))


def test_limit_dataset_never_exceeds_the_limit_with_rounding():
    ds = Dataset("x", list("abcd"), split_of([15] * 4), split_of([15] * 4), "src")
    assert len(limit_dataset(ds, 6, seed=0).train.labels) == 6
