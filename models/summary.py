"""Parameter and multiply-accumulate counts, measured with forward hooks on one sample."""
from __future__ import annotations

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """MACs of one forward pass on a single `input_shape` (C, H, W) sample: conv and linear layers."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output):
        nonlocal total
        kernel_macs = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() * kernel_macs

    def linear_hook(module: nn.Linear, _inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return total


def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> dict:
    return {"num_params": count_parameters(model), "macs": count_macs(model, input_shape),
            "input_shape": list(input_shape)}
