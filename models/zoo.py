"""The architectures of the tutorials this project grew from, each for 1x28x28 and 3x32x32 inputs.

Shapes in comments are for a 1x28x28 input unless stated otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


def _conv_out(size: int, kernel: int, padding: int = 0, stride: int = 1) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@register_model
def mlp(in_channels, num_classes, image_size, hidden=(512, 256, 128)):
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model
def lenet5(in_channels, num_classes, image_size):
    # LeCun 1998: a 28x28 input is padded to 32x32 so both conv layers see the paper's sizes.
    padding = 2 if image_size < 32 else 0
    side = _conv_out(image_size, 5, padding) // 2  # conv1 + pool
    side = _conv_out(side, 5) // 2  # conv2 + pool: 5 for 28x28 and 32x32
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=padding), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True),
        nn.Linear(120, 84), nn.ReLU(inplace=True),
        nn.Linear(84, num_classes),
    )


@register_model
def cnn(in_channels, num_classes, image_size):
    # The tutorial's two-conv net: conv 1->10 k5, pool, conv 10->20 k5, pool, fc (320 -> 10 for 28x28).
    side = _conv_out(_conv_out(image_size, 5) // 2, 5) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 10, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),
        nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(20 * side * side, num_classes),
    )


class InceptionA(nn.Module):
    """GoogLeNet-style block: 1x1, 5x5, double 3x3 and avg-pool branches, concatenated (88 channels)."""

    out_channels = 16 + 24 + 24 + 24

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch1x1 = nn.Conv2d(in_channels, 16, 1)
        self.branch5x5 = nn.Sequential(nn.Conv2d(in_channels, 16, 1), nn.Conv2d(16, 24, 5, padding=2))
        self.branch3x3dbl = nn.Sequential(
            nn.Conv2d(in_channels, 16, 1), nn.Conv2d(16, 24, 3, padding=1), nn.Conv2d(24, 24, 3, padding=1)
        )
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(in_channels, 24, 1))

    def forward(self, x):
        branches = (self.branch1x1, self.branch5x5, self.branch3x3dbl, self.branch_pool)
        return torch.cat([b(x) for b in branches], dim=1)


@register_model
def inception(in_channels, num_classes, image_size):
    side = _conv_out(_conv_out(image_size, 5) // 2, 5) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 10, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # 10x12x12
        InceptionA(10),  # 88x12x12
        nn.Conv2d(InceptionA.out_channels, 20, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # 20x4x4
        InceptionA(20),  # 88x4x4
        nn.Flatten(),
        nn.Linear(InceptionA.out_channels * side * side, num_classes),
    )


class ResidualBlock(nn.Module):
    """The tutorial's identity block: relu(x + conv(relu(conv(x)))), channels and size unchanged."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class BasicBlock(nn.Module):
    """He et al. 2016 basic block with BatchNorm; a 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _small_resnet(in_channels, num_classes, image_size):
    side = _conv_out(_conv_out(image_size, 5) // 2, 5) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # 16x12x12
        ResidualBlock(16),
        nn.Conv2d(16, 32, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # 32x4x4
        ResidualBlock(32),
        nn.Flatten(),
        nn.Linear(32 * side * side, num_classes),
    )


def _cifar_resnet(in_channels, num_classes, blocks_per_stage, widths):
    """CIFAR-style ResNet: 3x3 stride-1 stem, stages that halve the size, global average pool."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
    ]
    channels = widths[0]
    for stage, (width, blocks) in enumerate(zip(widths, blocks_per_stage)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(channels, width, stride))
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


RESNET_DEPTHS = {
    18: ((2, 2, 2, 2), (64, 128, 256, 512)),  # He et al.'s ResNet-18 with a CIFAR stem
    20: ((3, 3, 3), (16, 32, 64)),  # He et al.'s CIFAR ResNet-20
}


@register_model
def resnet(in_channels, num_classes, image_size, depth="auto"):
    """`depth="small"`: the tutorial's residual net (the default below 32 px); 18 or 20: CIFAR-style."""
    if depth == "auto":
        depth = "small" if image_size < 32 else 18
    if depth == "small":
        return _small_resnet(in_channels, num_classes, image_size)
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"resnet depth must be 'auto', 'small' or one of {sorted(RESNET_DEPTHS)}, got {depth!r}")
    return _cifar_resnet(in_channels, num_classes, *RESNET_DEPTHS[depth])


@register_model
def resnet20(in_channels, num_classes, image_size):
    return _cifar_resnet(in_channels, num_classes, *RESNET_DEPTHS[20])


VGG_CONFIGS = {  # conv widths as multiples of `width`; "M" is a 2x2 max-pool (Simonyan & Zisserman 2015)
    11: (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"),
    13: (1, 1, "M", 2, 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"),
    16: (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"),
    19: (1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"),
}


@register_model
def vgg(in_channels, num_classes, image_size, depth=11, width=64):
    """VGG with BatchNorm; `width` is the first stage's channels (64 in the paper).

    Pools that would shrink the map below 1 pixel are skipped (28 px: 28->14->7->3->1), and a global
    average pool feeds one linear classifier, so any input size works.
    """
    if depth not in VGG_CONFIGS:
        raise ValueError(f"vgg depth must be one of {sorted(VGG_CONFIGS)}, got {depth!r}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"vgg width must be a positive integer, got {width!r}")
    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for entry in VGG_CONFIGS[depth]:
        if entry == "M":
            if side >= 2:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            continue
        out = entry * width
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)
