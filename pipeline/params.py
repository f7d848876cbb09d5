"""`params.yaml`, loaded once into validated frozen dataclasses.

Unknown keys, wrong types and out-of-range values are errors that name the key and the value.
One dataclass per stage section; `load_params()` returns them all.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .stage import StageError

DATASETS = ("mnist", "fashion_mnist", "cifar10", "imagefolder")
#: how each dataset's images become model inputs (service/input_transform.py, docs/model-contract.md):
#: digits by MNIST's recipe, photos keep their aspect ratio; FashionMNIST's 28x28 items as they are
DEFAULT_INPUT_TRANSFORMS = {"mnist": "digit", "fashion_mnist": "resize", "cifar10": "crop", "imagefolder": "crop"}


class ParamsError(StageError, ValueError):
    """A bad value in params.yaml (or an override); the message names the key."""


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ParamsError(f"params: {key} = {value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class DataParams:
    """Section `data` (download stage)."""

    dataset: str = "mnist"
    source: str = ""  # imagefolder: folder with one subfolder of images per class
    image_size: int = 32  # imagefolder: side in pixels the images are resized to
    channels: int = 3  # imagefolder: 1 (grayscale) or 3 (RGB)
    test_fraction: float = 0.1  # carved out (stratified) when a dataset ships no test split
    limit: int = 0  # keep at most this many images per split, a stratified sample (0 = all): quick runs
    seed: int = 0
    input_transform: dict[str, str] = field(default_factory=dict)  # per dataset; DEFAULT_INPUT_TRANSFORMS fill in

    def __post_init__(self):
        from service.contract import INPUT_TRANSFORMS  # numpy only

        _check(self.dataset in DATASETS, "data.dataset", self.dataset, f"one of {', '.join(DATASETS)}")
        _check(self.dataset != "imagefolder" or bool(self.source), "data.source", self.source,
               "a folder of class subfolders when data.dataset is imagefolder")
        _check(4 <= self.image_size <= 1024, "data.image_size", self.image_size, "4..1024")
        _check(self.channels in (1, 3), "data.channels", self.channels, "1 or 3")
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", self.test_fraction, "a fraction in (0, 1)")
        _check(self.limit >= 0, "data.limit", self.limit, ">= 0 (0 keeps everything)")
        for name, transform in self.input_transform.items():
            key = f"data.input_transform.{name}"
            _check(name in DATASETS, key, name, f"a dataset name ({', '.join(DATASETS)})")
            _check(transform in INPUT_TRANSFORMS, key, transform, f"one of {', '.join(INPUT_TRANSFORMS)}")
        channels = {"cifar10": 3, "imagefolder": self.channels}.get(self.dataset, 1)
        _check(self.transform != "digit" or channels == 1, f"data.input_transform.{self.dataset}", self.transform,
               f"resize or crop: digit needs 1-channel images, {self.dataset} has {channels}")

    @property
    def transform(self) -> str:
        """This dataset's ``input_transform``."""
        return self.input_transform.get(self.dataset, DEFAULT_INPUT_TRANSFORMS[self.dataset])


@dataclass(frozen=True)
class AugmentParams:
    """Augmentation on batched tensors (one affine warp per image)."""

    translate: int = 0  # max shift in pixels, like a random crop of a padded image
    hflip: bool = False
    rotate_degrees: float = 0.0
    scale: float = 0.0  # max relative zoom: 0.1 draws a factor in 0.9..1.1 per image
    stroke: float = 0.0  # max share (0..1) of a 3x3 dilation (thicker) or erosion (thinner) blended in
    blur: float = 0.0  # max share (0..1) of a 3x3 box blur blended in
    noise: float = 0.0  # max std of Gaussian pixel noise, on the 0..1 scale

    def __post_init__(self):
        _check(self.translate >= 0, "augment.translate", self.translate, ">= 0")
        _check(0 <= self.rotate_degrees <= 180, "augment.rotate_degrees", self.rotate_degrees, "0..180")
        _check(0 <= self.scale < 1, "augment.scale", self.scale, "0 <= scale < 1")
        for key in ("stroke", "blur"):
            _check(0 <= getattr(self, key) <= 1, f"augment.{key}", getattr(self, key), "0..1")
        _check(0 <= self.noise <= 1, "augment.noise", self.noise, "0..1")

    @property
    def warps(self) -> bool:
        return bool(self.translate or self.hflip or self.rotate_degrees or self.scale)

    @property
    def enabled(self) -> bool:
        return self.warps or bool(self.stroke or self.blur or self.noise)


@dataclass(frozen=True)
class TrainParams:
    """Section `train`: shared by every architecture; `models.<arch>` may override some keys."""

    experiment: str = "image-classifier"
    epochs: int = 5
    batch_size: int = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_fraction: float = 0.2  # share of steps spent warming up (one-cycle and cosine)
    label_smoothing: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # CUDA only; "auto" picks bf16 where supported
    channels_last: bool = True
    augment: dict[str, AugmentParams] = field(default_factory=dict)  # per dataset name

    def __post_init__(self):
        _check(bool(self.experiment), "train.experiment", self.experiment, "a non-empty name")
        _check(self.epochs >= 1, "train.epochs", self.epochs, ">= 1")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, ">= 1")
        _check(self.lr > 0, "train.lr", self.lr, "> 0")
        _check(0 <= self.momentum < 1, "train.momentum", self.momentum, "0 <= momentum < 1")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.warmup_fraction < 1, "train.warmup_fraction", self.warmup_fraction, "0 <= x < 1")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "0 <= x < 1")
        _check(0 < self.val_fraction < 1, "train.val_fraction", self.val_fraction, "a fraction in (0, 1)")
        for name in self.augment:
            _check(name in DATASETS, f"train.augment.{name}", name, f"a dataset name ({', '.join(DATASETS)})")

    def augment_for(self, dataset: str) -> AugmentParams:
        return self.augment.get(dataset, AugmentParams())


@dataclass(frozen=True)
class ModelSpec:
    """One entry of section `models`: an architecture to train, its kwargs and per-model overrides."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: Optional[int] = None
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    weight_decay: Optional[float] = None

    def overrides(self) -> dict[str, Any]:
        return {k: v for k in ("epochs", "lr", "batch_size", "weight_decay") if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class EvaluateParams:
    """Section `evaluate`."""

    top_k: int = 5

    def __post_init__(self):
        _check(self.top_k >= 1, "evaluate.top_k", self.top_k, ">= 1")


@dataclass(frozen=True)
class ExportParams:
    """Section `export`: ONNX export and its parity gate against PyTorch."""

    opset: int = 17
    parity_atol: float = 1e-4  # max |logit difference| allowed between ONNX Runtime and PyTorch

    def __post_init__(self):
        _check(9 <= self.opset <= 23, "export.opset", self.opset, "an ONNX opset in 9..23")
        _check(self.parity_atol > 0, "export.parity_atol", self.parity_atol, "> 0")


@dataclass(frozen=True)
class PromoteParams:
    """Section `promote`: registry name and the champion/challenger gate."""

    registered_model: str = "image-classifier"
    metric: str = "test_acc"  # higher is better
    tie_break: str = "latency_ms_batch1"  # lower is better
    margin: float = 0.0  # a candidate must beat the champion's metric by more than this

    def __post_init__(self):
        import re

        _check(bool(re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", self.registered_model)), "promote.registered_model",
               self.registered_model, "lowercase letters, digits, '-', '_', '.' (it is also the BentoML model name)")
        _check(self.margin >= 0, "promote.margin", self.margin, ">= 0")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    train: TrainParams = field(default_factory=TrainParams)
    models: dict[str, ModelSpec] = field(default_factory=dict)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)
    promote: PromoteParams = field(default_factory=PromoteParams)

    def __post_init__(self):
        from models import list_models  # imported late: params are loaded before torch is needed

        _check(bool(self.models), "models", self.models, "at least one architecture")
        for name in self.models:
            _check(name in list_models(), f"models.{name}", name, f"a registered model ({', '.join(list_models())})")

    def train_for(self, arch: str) -> TrainParams:
        """The train section with `models.<arch>`'s overrides applied (validated again)."""
        if arch not in self.models:
            raise ParamsError(f"params: model {arch!r} is not listed under models ({', '.join(self.models)})")
        return dataclasses.replace(self.train, **self.models[arch].overrides())


# --- generic, strict conversion from YAML mappings -------------------------------------------------

def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(value, inner, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        _check(value in allowed, key, value, f"one of {', '.join(map(str, allowed))}")
        return value
    if origin is dict:
        _check(isinstance(value, dict), key, value, "a mapping")
        _, value_type = typing.get_args(tp)
        return {str(k): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, key)
    if tp is bool:
        _check(isinstance(value, bool), key, value, "true or false")
    elif tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
    elif tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "a number")
        value = float(value)
    elif tp is str:
        _check(isinstance(value, str), key, value, "a string")
    return value


def from_mapping(cls, mapping: Any, where: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ParamsError."""
    prefix = f"{where}." if where else ""
    if mapping is None:
        mapping = {}
    _check(isinstance(mapping, dict), where or "params", mapping, "a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise ParamsError(f"params: unknown key {prefix}{unknown[0]} (known keys: {', '.join(sorted(names))})")
    values = {name: _convert(mapping[name], hints[name], f"{prefix}{name}") for name in mapping}
    return cls(**values)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params: file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"params: {path} is not valid YAML: {err}") from err
    return from_mapping(Params, raw or {})
