"""The architectures of the tutorials this project grew from, each for 1x28x28 and 3x32x32 inputs.

Shapes in comments are for a 1x28x28 input unless stated otherwise. docs/models.md lists every model,
its tutorial, kwargs and parameter counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


def _conv_out(size: int, kernel: int, padding: int = 0, stride: int = 1) -> int:
    return (size + 2 * padding - kernel) // stride + 1


INITS = ("default", "kaiming", "xavier", "vgg")


def _check_options(dropout: float = 0.0, init: str = "default") -> None:
    """The `dropout` and `init` kwargs of the tutorial builders (a bad one names itself)."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")


def _initialize(model: nn.Module, init: str) -> nn.Module:
    """Re-initialize conv and linear weights (biases 0, BatchNorm 1/0); "default" keeps PyTorch's.

    "kaiming": He et al. 2015 normal (fan_in, ReLU gain); "xavier": Glorot uniform; "vgg": torchvision's
    VGG scheme (conv: He normal, fan_out; linear: N(0, 0.01)).
    """
    if init == "default":
        return model
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if init == "xavier":
                nn.init.xavier_uniform_(m.weight)
            elif init == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _fc_head(width: int, hidden, num_classes: int, dropout: float = 0.0) -> list[nn.Module]:
    """Flatten, Linear + ReLU (+ Dropout when `dropout` > 0) per hidden width, the classifier.

    No Dropout module at all when `dropout` is 0, so the layer indices (state_dict keys) stay those
    of the models trained before the option existed.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return layers


@register_model
def mlp(in_channels, num_classes, image_size, hidden=(512, 256, 128), dropout=0.0, init="default"):
    """Fully connected: input width in_channels * image_size**2, a Linear + ReLU per `hidden` width."""
    _check_options(dropout, init)
    width = in_channels * image_size * image_size
    return _initialize(nn.Sequential(*_fc_head(width, hidden, num_classes, dropout)), init)


@register_model
def mlp_dropout(in_channels, num_classes, image_size, dropout=0.2, init="default"):
    """The tutorial's 784-512-512-10 MLP with Dropout(0.2) after each hidden layer."""
    return mlp(in_channels, num_classes, image_size, hidden=(512, 512), dropout=dropout, init=init)


@register_model
def mlp5(in_channels, num_classes, image_size, dropout=0.0, init="default"):
    """The tutorial's plain five-layer MLP, 784-512-256-128-64-10."""
    return mlp(in_channels, num_classes, image_size, hidden=(512, 256, 128, 64), dropout=dropout, init=init)


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


@register_model
def lenet5_avgpool(in_channels, num_classes, image_size, dropout=0.0, init="default"):
    """LeNet-5 as the tutorial wrote it: average pooling, no padding (28 px: 16x4x4 = 256 into fc 120)."""
    _check_options(dropout, init)
    side = _conv_out(_conv_out(image_size, 5) // 2, 5) // 2  # 4 for 28x28, 5 for 32x32
    return _initialize(nn.Sequential(
        nn.Conv2d(in_channels, 6, 5), nn.ReLU(inplace=True), nn.AvgPool2d(2),  # 6x12x12
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.AvgPool2d(2),  # 16x4x4
        *_fc_head(16 * side * side, (120, 84), num_classes, dropout),
    ), init)


@register_model
def cnn_dropout(in_channels, num_classes, image_size, dropout=0.5, init="default"):
    """The PyTorch MNIST example: `cnn` with Dropout2d after conv2 and fc 320-50-10 with dropout.

    The example returns log_softmax; this returns the logits (the loss and the ONNX contract take logits).
    """
    _check_options(dropout, init)
    side = _conv_out(_conv_out(image_size, 5) // 2, 5) // 2
    return _initialize(nn.Sequential(
        nn.Conv2d(in_channels, 10, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # 10x12x12
        nn.Conv2d(10, 20, 5), nn.Dropout2d(dropout), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # 20x4x4
        *_fc_head(20 * side * side, (50,), num_classes, dropout),  # fc 320-50, ReLU, Dropout, fc 50-10
    ), init)


@register_model
def cnn_3conv(in_channels, num_classes, image_size, dropout=0.0, init="default"):
    """The tutorial's three-conv net: 16 k5, 32 k5, 64 k3 (each ReLU + 2x2 max-pool), fc 32-16."""
    _check_options(dropout, init)
    side = _conv_out(_conv_out(_conv_out(image_size, 5) // 2, 5) // 2, 3) // 2  # 1 for 28x28 and 32x32
    return _initialize(nn.Sequential(
        nn.Conv2d(in_channels, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 16x12x12
        nn.Conv2d(16, 32, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 32x4x4
        nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 64x1x1
        *_fc_head(64 * side * side, (32, 16), num_classes, dropout),
    ), init)


@register_model
def cnn_3x3(in_channels, num_classes, image_size, dropout=0.0, init="default"):
    """The tutorial's two 3x3-conv net: 32 and 64 channels, each ReLU + 2x2 max-pool, fc 64."""
    _check_options(dropout, init)
    side = _conv_out(_conv_out(image_size, 3) // 2, 3) // 2  # 5 for 28x28 (1600 features), 6 for 32x32
    return _initialize(nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 32x13x13
        nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 64x5x5
        *_fc_head(64 * side * side, (64,), num_classes, dropout),
    ), init)


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
    """The tutorial's block, channels and size unchanged, with F(x) = conv(relu(conv(x))):

    - "identity": relu(x + F(x)) (the tutorial's net, and `resnet` below 32 px);
    - "scaled": relu(0.5 * (x + F(x))), constant scaling (He et al. 2016, "Identity Mappings", fig. 2b);
    - "conv1x1": relu(conv1x1(x) + F(x)), a 1x1-conv shortcut (ibid., fig. 2e).

    The tutorial's code for the two variants skipped F's first conv by mistake; F here is conv-ReLU-conv
    in all three, as in its identity block.
    """

    SHORTCUTS = ("identity", "scaled", "conv1x1")

    def __init__(self, channels: int, shortcut: str = "identity"):
        super().__init__()
        if shortcut not in self.SHORTCUTS:
            raise ValueError(f"shortcut must be one of {', '.join(map(repr, self.SHORTCUTS))}, got {shortcut!r}")
        self.mode = shortcut
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        if shortcut == "conv1x1":  # only then: the identity block's state_dict keys stay conv1, conv2
            self.shortcut = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        residual = self.conv2(F.relu(self.conv1(x)))
        if self.mode == "scaled":
            return F.relu(0.5 * (x + residual))
        return F.relu((self.shortcut(x) if self.mode == "conv1x1" else x) + residual)

    def extra_repr(self) -> str:
        return f"shortcut={self.mode!r}"


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


def _small_resnet(in_channels, num_classes, image_size, shortcut="identity"):
    side = _conv_out(_conv_out(image_size, 5) // 2, 5) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # 16x12x12
        ResidualBlock(16, shortcut),
        nn.Conv2d(16, 32, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # 32x4x4
        ResidualBlock(32, shortcut),
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


@register_model
def resnet_small(in_channels, num_classes, image_size, shortcut="identity", init="default"):
    """The tutorial's small residual net at every input size (`resnet` is ResNet-18 from 32 px)."""
    _check_options(init=init)
    return _initialize(_small_resnet(in_channels, num_classes, image_size, shortcut), init)


@register_model
def resnet_small_scaled(in_channels, num_classes, image_size, init="default"):
    """`resnet_small` with constant-scaling blocks, relu(0.5 * (x + F(x)))."""
    return resnet_small(in_channels, num_classes, image_size, shortcut="scaled", init=init)


@register_model
def resnet_small_conv1x1(in_channels, num_classes, image_size, init="default"):
    """`resnet_small` with 1x1-conv shortcuts, relu(conv1x1(x) + F(x))."""
    return resnet_small(in_channels, num_classes, image_size, shortcut="conv1x1", init=init)


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


@register_model
def vgg_2(in_channels, num_classes, image_size, dropout=0.5, init="vgg"):
    """The tutorial's "Vgg_2": [64, 64, M, 128, 128, M] 3x3 conv + BatchNorm + ReLU, fc 256-128 + Dropout.

    28 px: 128x7x7 = 6272 features (32 px: 128x8x8 = 8192). Convs keep their bias, as torchvision's
    VGG layers (which the tutorial copied) do; `init="vgg"` is torchvision's VGG initialization.
    """
    _check_options(dropout, init)
    layers: list[nn.Module] = []
    channels = in_channels
    for out in (64, 64, "M", 128, 128, "M"):
        if out == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    side = image_size // 2 // 2
    return _initialize(nn.Sequential(*layers, *_fc_head(128 * side * side, (256, 128), num_classes, dropout)), init)


class WhiteningConv(nn.Conv2d):
    """airbench's first layer: a 2x2 conv whose 2 * C * 4 filters are the eigenvectors of the 2x2
    patch covariance of the training images, each divided by the square root of its eigenvalue + eps
    (PCA whitening), and their negatives; the filters are frozen, the bias trains.

    The filters are set from the first batch the layer sees in training (airbench uses 5,000 training
    images; a batch of 256 32x32 images is 246,016 patches for a 12x12 covariance), so the model
    factory needs no data and the training loop no hook. `whitened` is a buffer: checkpoints keep it,
    and a resumed run does not re-whiten. Under DDP rank 0's filters are broadcast."""

    def __init__(self, in_channels: int, kernel_size: int = 2, eps: float = 5e-4):
        super().__init__(in_channels, 2 * in_channels * kernel_size ** 2, kernel_size, bias=True)
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)
        self.eps = eps
        self.register_buffer("whitened", torch.tensor(False))
        self._whitened_known = False  # the buffer read once: bool() of a CUDA tensor syncs the device

    def forward(self, x):
        if self.training and not self._whitened_known:
            if not bool(self.whitened):
                self.whiten(x)
            self._whitened_known = True
        return super().forward(x)

    def _load_from_state_dict(self, *args, **kwargs):
        self._whitened_known = False  # the loaded flag decides again
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def whiten(self, x: torch.Tensor) -> None:
        c, (kh, kw) = x.shape[1], self.kernel_size
        patches = x.detach().double().unfold(2, kh, 1).unfold(3, kw, 1)  # [B, C, H', W', kh, kw]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)  # (c, kh, kw) order, as the weight
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))  # ascending
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + self.eps)[:, None]).flip(0)
        self.weight.copy_(torch.cat((filters, -filters)).reshape(self.weight.shape))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.weight.data, 0)
        self.whitened.fill_(True)


class AirbenchBatchNorm(nn.BatchNorm2d):
    """airbench's BatchNorm: no learned scale (the weight stays 1), running statistics that follow
    the batches fast (PyTorch momentum 0.4: airbench's 0.6 in the other convention), eps 1e-12, and a
    bias that learns 64x faster than the other parameters under SGD: the parameter holds bias / 8,
    and one SGD step on it moves the bias 8 * 8 = 64 times as far (airbench's `bias_scaler`, without
    an optimizer group of its own). Exports as one ONNX BatchNormalization."""

    BIAS_SCALE = 8.0

    def __init__(self, num_features: int):
        super().__init__(num_features, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias * self.BIAS_SCALE,
                            self.training, self.momentum, self.eps)


class ConvGroup(nn.Sequential):
    """airbench's block: conv, 2x2 max-pool, BatchNorm, GELU, conv, BatchNorm, GELU (convs without
    bias). As airbench, each conv's first `in_channels` filters start as the identity (dirac)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.MaxPool2d(2),
            AirbenchBatchNorm(out_channels), nn.GELU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), AirbenchBatchNorm(out_channels), nn.GELU(),
        )
        for conv in (self[0], self[4]):
            nn.init.dirac_(conv.weight.data[:conv.in_channels])


class Scale(nn.Module):
    """x * factor: airbench's 1/9 on the logits (the classifier's outputs start small)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class FlipAverage(nn.Module):
    """`net`, and when not training the mean of its logits for the image and its mirror image (the
    test-time flip of airbench): twice the inference cost, for images whose classes a mirror keeps."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        if self.training:
            return self.net(x)
        return 0.5 * (self.net(x) + self.net(torch.flip(x, dims=(3,))))


@register_model
def airbench(in_channels, num_classes, image_size, widths=(64, 256, 256), flip_tta=False):
    """Keller Jordan's airbench94 network (2024): a 2x2 whitening conv (2 * C * 4 frozen filters,
    WhiteningConv), three ConvGroups (dirac init, AirbenchBatchNorm), a global max-pool (airbench's
    3x3 pool of the 3x3 map at 28 and 32 px: 31 -> 15 -> 7 -> 3), a bias-free linear classifier and
    the 1/9 logit scale. The training loop is the project's: no lookahead, no alternating flip, no
    multi-crop test-time augmentation. `widths` (64, 256, 256) as published; (32, 128, 128) costs
    about a quarter of the MACs. `flip_tta`: airbench's test-time flip (FlipAverage), in evaluation
    and in the ONNX file.
    """
    widths = tuple(widths)
    if len(widths) != 3 or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ValueError(f"airbench widths must be three positive integers, got {widths!r}")
    if _conv_out(image_size, 2) // 2 // 2 // 2 < 1:
        raise ValueError(f"airbench needs inputs of at least 9 px (a 2x2 stem, three 2x2 pools), got {image_size}")
    if not isinstance(flip_tta, bool):
        raise ValueError(f"airbench flip_tta must be true or false, got {flip_tta!r}")
    stem = WhiteningConv(in_channels)
    net = nn.Sequential(
        stem, nn.GELU(),
        ConvGroup(stem.out_channels, widths[0]), ConvGroup(widths[0], widths[1]), ConvGroup(widths[1], widths[2]),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(widths[2], num_classes, bias=False), Scale(1 / 9),
    )
    return FlipAverage(net) if flip_tta else net


# --- torchvision's own VGG-16 and ResNet-18, adapted as the tutorial did ---------------------------------

class Resize(nn.Module):
    """Bilinear resize to `size` x `size` inside the model (ONNX Resize, half_pixel = align_corners=False)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class FixedAdaptiveAvgPool(nn.Module):
    """AdaptiveAvgPool2d for a known `in_size` square input, as two products with a constant matrix.

    torchvision's VGG pools its last map (2x2 for a 64 px input) to 7x7; the TorchScript ONNX exporter
    cannot export adaptive_avg_pool2d unless the input is a multiple of the output, nor at all once
    a Resize has made the spatial size dynamic. Same bins as PyTorch: [floor(i*n/7), ceil((i+1)*n/7)).
    """

    def __init__(self, in_size: int, out_size: int):
        super().__init__()
        weights = torch.zeros(out_size, in_size)
        for i in range(out_size):
            start, end = i * in_size // out_size, -(-(i + 1) * in_size // out_size)
            weights[i, start:end] = 1 / (end - start)
        self.register_buffer("weights", weights, persistent=False)  # not in checkpoints: it is derived

    def forward(self, x):
        return self.weights @ x @ self.weights.T

    def extra_repr(self) -> str:
        return f"in_size={self.weights.shape[1]}, out_size={self.weights.shape[0]}"


def _resize_stage(name: str, image_size: int, resize_to) -> tuple[nn.Module, int]:
    """The input stage (a Resize, or Identity when the sizes already agree) and the size it outputs."""
    if resize_to is None:
        return nn.Identity(), image_size
    if isinstance(resize_to, bool) or not isinstance(resize_to, int) or resize_to < 1:
        raise ValueError(f"{name} resize_to must be a positive integer or None, got {resize_to!r}")
    return (nn.Identity() if resize_to == image_size else Resize(resize_to)), resize_to


def _he_conv(in_channels: int, conv: nn.Conv2d) -> nn.Conv2d:
    """`conv` rebuilt for `in_channels`, initialized as torchvision initializes its convs."""
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


@register_model
def torchvision_vgg16(in_channels, num_classes, image_size, resize_to=64, dropout=0.5):
    """torchvision.models.vgg16(weights=None): first conv for `in_channels`, `num_classes` outputs,
    the input resized to `resize_to` px in the model (None: as it comes; five 2x2 pools need >= 32).

    138 M parameters at 1000 classes, 134.3 M at 10 (fc 25088-4096-4096 is 119.5 M of them).
    """
    from torchvision.models import vgg16  # here, not at the top: `import models` stays light

    _check_options(dropout)
    resize, side = _resize_stage("torchvision_vgg16", image_size, resize_to)
    if side < 32:
        raise ValueError(f"torchvision_vgg16 needs inputs of at least 32 px (five 2x2 max-pools); it would see "
                         f"{side} px: set resize_to (default 64)")
    net = vgg16(weights=None, num_classes=num_classes, dropout=dropout)
    net.features[0] = _he_conv(in_channels, net.features[0])
    net.avgpool = FixedAdaptiveAvgPool(side // 32, 7)
    return nn.Sequential(resize, net)


@register_model
def torchvision_resnet18(in_channels, num_classes, image_size, resize_to=None):
    """torchvision.models.resnet18(weights=None): first conv for `in_channels`, `num_classes` outputs,
    an optional input resize to `resize_to` px (None, the default: as it comes; 28 and 32 px reach
    layer4 as 1x1 maps, and its global average pool takes any size).
    """
    from torchvision.models import resnet18

    resize, _ = _resize_stage("torchvision_resnet18", image_size, resize_to)
    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = _he_conv(in_channels, net.conv1)
    return nn.Sequential(resize, net)
