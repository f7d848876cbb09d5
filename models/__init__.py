"""The model zoo: `create_model(name, in_channels, num_classes, image_size, **kw)`, `list_models()`."""
from . import zoo as _zoo  # noqa: F401  (registers the architectures)
from .registry import create_model, list_models, register_model
from .summary import count_macs, count_parameters, summarize

__all__ = ["create_model", "list_models", "register_model", "count_macs", "count_parameters", "summarize"]
