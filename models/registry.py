"""Model registry: `@register_model` builders, `create_model(name, ...)`, `list_models()`.

A builder is a function `(in_channels, num_classes, image_size, **kwargs) -> nn.Module`. Builders
never move models to a device or change their dtype: that is the training loop's job.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(fn: ModelBuilder) -> ModelBuilder:
    """Register `fn` under its function name; registering a name twice is an error."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, in_channels: int, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    for label, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    try:
        return _REGISTRY[name](in_channels, num_classes, image_size, **kwargs)
    except TypeError as err:  # an unknown keyword argument for this architecture
        raise ValueError(f"bad arguments for model {name!r}: {err}") from err
