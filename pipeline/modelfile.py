"""The trained-model file (`outputs/<arch>/model.pt`) that evaluate and export read."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import create_model
from service import contract

from .params import Params, load_params
from .paths import arch_dir


def load_model_file(path: str | Path) -> tuple[nn.Module, dict]:
    """(model in eval mode on the CPU, the file's metadata without the weights); weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trained model at {path}: run the train stage first")
    info = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(info["arch"], info["in_channels"], info["num_classes"], info["image_size"], **info["kwargs"])
    model.load_state_dict(info["state_dict"])
    meta = {k: v for k, v in info.items() if k != "state_dict"}
    return model.eval(), meta


def trained_model_args(description: str, argv: list[str] | None) -> tuple[argparse.Namespace, Params, nn.Module, dict]:
    """The command line of the stages that read a trained model (evaluate, export): ``--arch``,
    ``--params``; (args, the validated params, the model, its metadata)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    params.train_for(args.arch)  # an architecture params.yaml does not list: ParamsError
    model, meta = load_model_file(arch_dir(args.arch) / "model.pt")
    return args, params, model, meta


def normalize(images_u8, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] (CPU tensor or array) -> float32 tensor: the contract's arithmetic
    (``service.contract.normalize``), the same as serving."""
    return torch.from_numpy(contract.normalize(np.asarray(images_u8), mean, std))


@torch.no_grad()
def predict_logits(model: nn.Module, images_u8, mean, std, batch_size: int = 1000) -> torch.Tensor:
    """Float32 logits [N, num_classes] for uint8 images [N, C, H, W] (a numpy array or a tensor)."""
    images = torch.as_tensor(images_u8)
    outs = [model(normalize(images[i:i + batch_size], mean, std)) for i in range(0, len(images), batch_size)]
    return torch.cat(outs).float()
