"""Download stage: fetch a dataset (official mirrors, or the DATA_MIRROR folder offline) and write a
compact prepared form that trains fast.

Output (`data/prepared/`, replaced atomically):
  train.npz, test.npz  images uint8 [N, C, H, W] in the model's form (data.input_transform: the
                       service's own service.preprocessing, so training, evaluation, the parity gate
                       and serving see the same pixels), labels int64 [N]
  card.json            dataset card: classes, counts per class, checksums, input_transform, mean/std

`python -m pipeline.download [--params params.yaml]`
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gzip
import hashlib
import json
import multiprocessing
import shutil
import socket
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import atomic, stage
from .params import DataParams, load_params
from .paths import PREPARED_DIR, RAW_DIR, data_mirror
from .stage import StageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# MD5 of the *decompressed* IDX files (the canonical bytes; mirrors may recompress the .gz wrappers).
IDX_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
}


class DownloadError(StageError):
    """The dataset could not be fetched or verified; the message says what to do."""


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    test: Split
    source: str
    notes: str = ""
    transformed: bool = False  # images already in the model's form (image folders: decoded that way)


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def offline_message(dataset: str, url: str, err: BaseException) -> str:
    return (f"could not download dataset {dataset!r} from {url} ({type(err).__name__}: {err}). "
            f"If this machine is offline, set DATA_MIRROR to a folder laid out like ../shared/data "
            f"(e.g. DATA_MIRROR=../shared/data) and run again.")


# --- MNIST and Fashion-MNIST (IDX files) ----------------------------------------------------------

def _torchvision_idx_class(name: str):
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[name]


MIRROR_CHECKSUMS = "MD5SUMS"  # in a mirror's dataset folder: `md5sum` lines for IDX files of its own


def mirror_checksums(folder: Path) -> dict[str, str]:
    """The decompressed files' MD5s a mirror lists in its MD5SUMS (`md5sum` format), if it has one: a
    mirror of files other than the published ones (a subset, IDX data of your own) says so there."""
    listing = folder / MIRROR_CHECKSUMS
    if not listing.is_file():
        return {}
    sums = {}
    for number, line in enumerate(listing.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.strip().partition(" ")
        if len(digest) != 32 or not name.strip():
            raise DownloadError(f"DATA_MIRROR: {listing} line {number} is not `<md5>  <file name>`: {line!r}")
        sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def stage_idx_from_mirror(name: str, mirror: Path, raw_root: Path) -> tuple[str, str]:
    """Decompress the mirror's IDX .gz files to where torchvision looks, verifying each checksum: the
    published one, or the mirror's own MD5SUMS (then the card's notes say so). (source, notes)."""
    cls = _torchvision_idx_class(name)
    folder = mirror / name
    raw = raw_root / cls.__name__ / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    listed, own = mirror_checksums(folder), []
    for gz_name, gz_md5 in cls.resources:
        src = folder / gz_name
        if not src.is_file():
            raise DownloadError(f"DATA_MIRROR={mirror}: dataset {name!r} needs {src}, which does not exist")
        packed = src.read_bytes()
        try:
            data = gzip.decompress(packed)
        except (OSError, EOFError) as err:
            raise DownloadError(f"DATA_MIRROR: {src} is not a valid gzip file ({err})") from err
        stem = gz_name.removesuffix(".gz")
        expected = IDX_MD5.get(name, {}).get(stem)
        if md5_of(data) != expected and md5_of(packed) != gz_md5:
            if stem not in listed:
                raise DownloadError(f"DATA_MIRROR: {src} failed its checksum (md5 of contents {md5_of(data)}, "
                                    f"expected {expected or gz_md5}); the file is corrupt or not {name} (files "
                                    f"of your own: list their decompressed MD5s in {folder / MIRROR_CHECKSUMS})")
            if md5_of(data) != listed[stem]:
                raise DownloadError(f"DATA_MIRROR: {src} failed its checksum (md5 of contents {md5_of(data)}, "
                                    f"{folder / MIRROR_CHECKSUMS} lists {listed[stem]}); the file is corrupt")
            own.append(stem)
        atomic.write_bytes(raw / stem, data)
    notes = (f"not the published {name} files: {', '.join(own)} verified against the mirror's "
             f"{MIRROR_CHECKSUMS}" if own else "")
    return str(folder), notes


def load_idx_dataset(name: str, raw_root: Path, mirror: Path | None) -> Dataset:
    cls = _torchvision_idx_class(name)
    notes = ""
    if mirror is not None:
        source, notes = stage_idx_from_mirror(name, mirror, raw_root)
    else:
        source = f"{cls.mirrors[0]}{cls.resources[0][0]}"
        try:
            cls(str(raw_root), train=True, download=True)
        except (RuntimeError, OSError) as err:
            raise DownloadError(offline_message(name, source, err)) from err
    splits = {}
    for split, train in (("train", True), ("test", False)):
        ds = cls(str(raw_root), train=train, download=False)
        splits[split] = Split(ds.data.numpy()[:, None].copy(), ds.targets.numpy().astype(np.int64))
    classes = [str(i) for i in range(10)] if name == "mnist" else list(cls.classes)
    return Dataset(name, classes, splits["train"], splits["test"], source, notes)


# --- image folders (ImageFolder layout) and CIFAR-10 ----------------------------------------------

def read_image_folder(root: Path, channels: int, size: int, transform: str = "resize") -> tuple[list[str], Split]:
    """Decode every image under root/<class>/ with the service's preprocessing (same pixels as serving)."""
    from service.preprocessing import ImageError, image_to_array

    if not root.is_dir():
        raise DownloadError(f"image folder {str(root)!r} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DownloadError(f"image folder {str(root)!r} needs at least two class subfolders, found {classes}")
    images, labels = [], []
    for index, cls in enumerate(classes):
        files = sorted(f for f in (root / cls).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            try:
                images.append(image_to_array(file.read_bytes(), channels=channels, size=size, transform=transform))
            except ImageError as err:
                raise DownloadError(f"image folder: cannot use {file}: {err}") from err
            labels.append(index)
    if not images:
        raise DownloadError(f"image folder {str(root)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes, Split(np.stack(images), np.asarray(labels, dtype=np.int64))


def carve_per_class(split: Split, keep: Callable[[np.ndarray], Sequence[int]], seed: int) -> tuple[Split, Split]:
    """Carve a random `keep(counts)[i]` images of the i-th class (in sorted label order) out of `split`,
    deterministic for a seed; both parts keep the original order: (rest, carved)."""
    rng = np.random.default_rng(seed)
    labels, counts = np.unique(split.labels, return_counts=True)
    carved = [rng.permutation(np.flatnonzero(split.labels == label))[:k] for label, k in zip(labels, keep(counts))]
    mask = np.zeros(len(split.labels), dtype=bool)
    mask[np.concatenate(carved)] = True
    return (Split(split.images[~mask], split.labels[~mask]), Split(split.images[mask], split.labels[mask]))


def stratified_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Carve `fraction` of every class (at least one image) out of `split`: (rest, carved)."""
    return carve_per_class(split, lambda counts: [max(1, round(n * fraction)) for n in counts], seed)


def load_image_folder_dataset(p: DataParams, name: str, root: Path, source: str) -> Dataset:
    classes, everything = read_image_folder(root, p.channels, p.image_size, p.transform)
    train, test = stratified_split(everything, p.test_fraction, p.seed)
    notes = f"no test split shipped: {p.test_fraction:.0%} of each class carved out as test (seed {p.seed})"
    return Dataset(name, classes, train, test, source, notes, transformed=True)


EXTRACTED_MARKER = ".extracted.json"  # inside an extraction folder: which tarball it holds


def extract_once(tar_path: Path, extract_to: Path) -> Path:
    """`tar_path` extracted at `extract_to`, reused when it holds this very tarball. The extraction
    replaces the folder whole (atomic.atomic_dir), its marker written last inside it: a killed
    extraction, or a folder from another tarball or from before the marker, is never trusted."""
    wanted = {"tarball": tar_path.name, "sha256": atomic.sha256_file(tar_path)}
    marker = extract_to / EXTRACTED_MARKER
    try:
        if json.loads(marker.read_text()) == wanted:
            return extract_to
    except (OSError, ValueError):
        pass
    with atomic.atomic_dir(extract_to) as tmp, tarfile.open(tar_path) as tar:
        tar.extractall(tmp, filter="data")
        (tmp / EXTRACTED_MARKER).write_text(json.dumps(wanted) + "\n")
    return extract_to


def load_cifar10(p: DataParams, raw_root: Path, mirror: Path | None) -> Dataset:
    from torchvision.datasets import CIFAR10

    if mirror is not None:
        original = mirror / "cifar10" / CIFAR10.filename
        jpg_tar = mirror / "cifar10" / "cifar10-train-jpg.tar.gz"
        if original.is_file():  # the official python tarball: torchvision verifies and extracts it
            atomic.atomic_write(raw_root / CIFAR10.filename, lambda tmp: shutil.copyfile(original, tmp))
        elif jpg_tar.is_file():  # the JPEG ImageFolder copy of the training split
            extract_to = extract_once(jpg_tar, raw_root / "cifar10-jpg")
            cifar_p = DataParams(dataset="cifar10", image_size=32, channels=3, test_fraction=p.test_fraction,
                                 seed=p.seed, input_transform=p.input_transform)
            return load_image_folder_dataset(cifar_p, "cifar10", extract_to / "train", str(jpg_tar))
        else:
            raise DownloadError(f"DATA_MIRROR={mirror}: dataset 'cifar10' needs {original} or {jpg_tar}")
    source = CIFAR10.url
    try:
        CIFAR10(str(raw_root), train=True, download=True)
    except (RuntimeError, OSError) as err:
        raise DownloadError(offline_message("cifar10", source, err)) from err
    splits = {}
    for split, train in (("train", True), ("test", False)):
        ds = CIFAR10(str(raw_root), train=train, download=False)
        splits[split] = Split(ds.data.transpose(0, 3, 1, 2).copy(), np.asarray(ds.targets, dtype=np.int64))
    return Dataset("cifar10", list(CIFAR10(str(raw_root), train=False).classes), splits["train"], splits["test"], source)


def class_quotas(counts: np.ndarray, limit: int) -> np.ndarray:
    """Images to keep per class so that they sum to exactly `limit` (< counts.sum()), proportional to
    `counts` (largest remainder), with at least one per class while `limit` allows."""
    exact = counts * limit / counts.sum()
    quotas = np.floor(exact).astype(int)
    if limit >= len(counts):
        quotas = np.maximum(quotas, 1)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    while quotas.sum() > limit:  # the minimum of one per class took too many: take from the largest
        quotas[np.argmax(quotas)] -= 1
    for i in order[: max(0, limit - int(quotas.sum()))]:
        quotas[i] += 1
    return np.minimum(quotas, counts)


def limit_split(split: Split, limit: int, seed: int) -> Split:
    """A stratified sample of exactly `limit` images of `split` (all of it when `limit` is 0 or larger)."""
    if not limit or len(split.labels) <= limit:
        return split
    return carve_per_class(split, lambda counts: class_quotas(counts, limit), seed)[1]


def limit_dataset(ds: Dataset, limit: int, seed: int) -> Dataset:
    """A stratified sample of at most `limit` images per split (quick runs and tests)."""
    note = f"subset: at most {limit} images per split (data.limit)" if limit else ""
    notes = "; ".join(n for n in (ds.notes, note) if n)
    return Dataset(ds.name, ds.classes, limit_split(ds.train, limit, seed), limit_split(ds.test, limit, seed),
                   ds.source, notes, ds.transformed)


def transform_split(split: Split, transform: str, workers: int = 0) -> Split:
    """``split``'s images through the service's ``input_transform`` (service.preprocessing.transform_array),
    in ``workers`` processes (0: one per usable CPU) when there are many: a 28x28 digit takes
    ~0.13 ms on one core, MNIST's 70,000 ~9 s."""
    from service.cpus import usable_cpus
    from service.preprocessing import transform_array

    images, size = split.images, split.images.shape[-1]
    workers = workers or usable_cpus()
    if transform != "digit" or workers < 2 or len(images) < 5000:  # resize, crop: the identity at this size
        return Split(transform_array(images, size, transform=transform), split.labels)
    chunks = np.array_split(images, workers * 4)
    starts = np.cumsum([0] + [len(c) for c in chunks[:-1]]).tolist()
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        done = list(pool.map(transform_array, chunks, [size] * len(chunks), ["bilinear"] * len(chunks),
                             [transform] * len(chunks), starts))
    return Split(np.concatenate(done), split.labels)


def apply_transform(ds: Dataset, transform: str) -> Dataset:
    """The dataset in the model's form: what the service will make of the same images. An image the
    transform refuses (``digit``: no ink) stops the stage naming it, as an image folder's file does."""
    from service.input_transform import NoInk

    if ds.transformed:
        return ds
    splits = {}
    for name in ("train", "test"):
        try:
            splits[name] = transform_split(getattr(ds, name), transform)
        except NoInk as err:  # the message names the image's index in the split
            raise DownloadError(f"{ds.name} {name} split, {err}: data.input_transform {transform} cannot use "
                                f"it (remove the image, or set another transform)") from err
    return dataclasses.replace(ds, **splits, transformed=True)


def fetch(p: DataParams, raw_root: Path = RAW_DIR, mirror: Path | None = None) -> Dataset:
    """The dataset, limited (data.limit), in the model's form (data.input_transform)."""
    return apply_transform(limit_dataset(_fetch_full(p, raw_root, mirror), p.limit, p.seed), p.transform)


def _fetch_full(p: DataParams, raw_root: Path, mirror: Path | None) -> Dataset:
    if mirror is not None and not mirror.is_dir():
        raise DownloadError(f"DATA_MIRROR={mirror} is not a folder")
    raw_root.mkdir(parents=True, exist_ok=True)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # seconds: an unreachable mirror fails instead of hanging
    try:
        if p.dataset in ("mnist", "fashion_mnist"):
            return load_idx_dataset(p.dataset, raw_root, mirror)
        if p.dataset == "cifar10":
            return load_cifar10(p, raw_root, mirror)
        return load_image_folder_dataset(p, Path(p.source).name, Path(p.source), p.source)
    finally:
        socket.setdefaulttimeout(previous_timeout)


# --- prepared form and dataset card -----------------------------------------------------------------

def split_card(split: Split, classes: list[str]) -> dict:
    counts = np.bincount(split.labels, minlength=len(classes))
    digest = hashlib.sha256(split.images.tobytes() + split.labels.tobytes()).hexdigest()
    return {"count": int(len(split.labels)), "per_class": dict(zip(classes, map(int, counts))), "sha256": digest}


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..1 scale, over every pixel of the training split."""
    pixels = images.transpose(1, 0, 2, 3).reshape(images.shape[1], -1).astype(np.float64) / 255.0
    return [round(float(m), 4) for m in pixels.mean(axis=1)], [round(float(s), 4) for s in pixels.std(axis=1)]


def dataset_card(ds: Dataset, input_transform: str = "resize") -> dict:
    mean, std = channel_stats(ds.train.images)
    _, channels, height, width = ds.train.images.shape
    return {
        "dataset": ds.name, "source": ds.source, "classes": ds.classes, "num_classes": len(ds.classes),
        "channels": channels, "image_size": height, "mean": mean, "std": std, "input_transform": input_transform,
        "splits": {"train": split_card(ds.train, ds.classes), "test": split_card(ds.test, ds.classes)},
        "notes": ds.notes,
    }


def save_prepared(ds: Dataset, out_dir: Path = PREPARED_DIR, input_transform: str = "resize") -> dict:
    card = dataset_card(ds, input_transform)
    with atomic.atomic_dir(out_dir) as tmp:
        for name, split in (("train", ds.train), ("test", ds.test)):
            np.savez(tmp / f"{name}.npz", images=split.images, labels=split.labels)
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def load_prepared(split: str, prepared_dir: Path = PREPARED_DIR) -> Split:
    with np.load(prepared_dir / f"{split}.npz") as npz:
        return Split(npz["images"], npz["labels"])


def load_card(prepared_dir: Path = PREPARED_DIR) -> dict:
    return json.loads((prepared_dir / "card.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=str(PREPARED_DIR))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    ds = fetch(params.data, RAW_DIR, data_mirror())
    card = save_prepared(ds, Path(args.out), params.data.transform)
    counts = ", ".join(f"{k} {v['count']}" for k, v in card["splits"].items())
    print(f"download: {card['dataset']} from {card['source']}: {counts} images "
          f"{card['channels']}x{card['image_size']}x{card['image_size']} ({card['input_transform']}), "
          f"mean {card['mean']} std {card['std']}")
    from .tracking import TrackingError, log_dataset_card  # after the data is safe: tracking can't lose it

    try:
        log_dataset_card(params.train.experiment, card)
    except TrackingError as err:
        raise TrackingError(f"the data is prepared, but {err}") from err
    return 0


if __name__ == "__main__":
    sys.exit(stage.run("download", main))
