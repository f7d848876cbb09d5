"""Architecture details beside tests/test_models.py: channels_last equivalence, the tutorial nets, variants.

Each tutorial net is pinned layer by layer (types in order, channels, kernels, fc widths, pooling,
dropout placement) and by its parameter count at 1x28x28 and 3x32x32.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import count_parameters, create_model, list_models
from models.zoo import AirbenchBatchNorm, FixedAdaptiveAvgPool, ResidualBlock, Resize

SHAPES = {"1x28x28": (1, 28), "3x32x32": (3, 32)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", list_models())
def test_channels_last_gives_the_same_logits(name, shape):
    channels, size = SHAPES[shape]
    torch.manual_seed(0)
    model = create_model(name, channels, 10, size).eval()
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-5)


def test_tutorial_cnn_matches_the_tutorial():
    model = create_model("cnn", 1, 10, 28)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 10, (5, 5)), (10, 20, (5, 5))]
    assert [m for m in model.modules() if isinstance(m, torch.nn.Linear)][0].in_features == 320


def test_resnet_variants_and_vgg_options():
    assert count_parameters(create_model("resnet", 3, 10, 32)) > 10_000_000  # ResNet-18
    assert count_parameters(create_model("resnet", 1, 10, 28)) < 100_000  # the tutorial's
    assert count_parameters(create_model("resnet", 3, 10, 32, depth=20)) < 300_000
    small = count_parameters(create_model("vgg", 1, 10, 28, depth=11, width=8))
    assert count_parameters(create_model("vgg", 1, 10, 28, depth=16, width=8)) > small


# --- helpers -------------------------------------------------------------------------------------------

def types(model: nn.Module) -> list[str]:
    """The class names of a Sequential's layers, in order."""
    return [type(m).__name__ for m in model]


def convs(model: nn.Module) -> list[tuple]:
    return [(m.in_channels, m.out_channels, m.kernel_size[0], m.padding[0])
            for m in model.modules() if isinstance(m, nn.Conv2d)]


def linears(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def dropouts(model: nn.Module) -> list[tuple[str, float]]:
    return [(type(m).__name__, m.p) for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]


def params(name: str, shape: str, **kwargs) -> int:
    channels, size = SHAPES[shape]
    return count_parameters(create_model(name, channels, 10, size, **kwargs))


# --- the MLPs ------------------------------------------------------------------------------------------

def test_mlp_dropout_is_784_512_512_10_with_dropout_after_each_hidden_layer():
    model = create_model("mlp_dropout", 1, 10, 28)
    assert types(model) == ["Flatten", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert linears(model) == [(784, 512), (512, 512), (512, 10)]
    assert dropouts(model) == [("Dropout", 0.2)] * 2
    assert params("mlp_dropout", "1x28x28") == 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10 == 669_706
    assert linears(create_model("mlp_dropout", 3, 7, 32)) == [(3072, 512), (512, 512), (512, 7)]


def test_mlp5_is_the_plain_five_layer_mlp():
    model = create_model("mlp5", 1, 10, 28)
    assert linears(model) == [(784, 512), (512, 256), (256, 128), (128, 64), (64, 10)]
    assert types(model) == ["Flatten"] + ["Linear", "ReLU"] * 4 + ["Linear"] and not dropouts(model)
    assert params("mlp5", "1x28x28") == 575_050 and params("mlp5", "3x32x32") == 1_746_506


def test_mlp_defaults_and_state_dict_keys_are_unchanged():
    """params.yaml and trained checkpoints use `mlp`: no dropout, the same layer indices as before."""
    model = create_model("mlp", 1, 10, 28)
    assert linears(model) == [(784, 512), (512, 256), (256, 128), (128, 10)] and not dropouts(model)
    assert list(model.state_dict()) == [f"{i}.{p}" for i in (1, 3, 5, 7) for p in ("weight", "bias")]
    assert dropouts(create_model("mlp", 1, 10, 28, hidden=[64, 32], dropout=0.3)) == [("Dropout", 0.3)] * 2


# --- LeNet-5 and the small conv nets ---------------------------------------------------------------------

def test_lenet5_avgpool_is_lenet5_with_average_pooling_and_no_padding():
    model = create_model("lenet5_avgpool", 1, 10, 28)
    assert types(model) == ["Conv2d", "ReLU", "AvgPool2d", "Conv2d", "ReLU", "AvgPool2d",
                            "Flatten", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert convs(model) == [(1, 6, 5, 0), (6, 16, 5, 0)]
    assert [m.kernel_size for m in model if isinstance(m, nn.AvgPool2d)] == [2, 2]
    assert linears(model) == [(256, 120), (120, 84), (84, 10)]  # 28->24->12->8->4: 16*4*4
    assert linears(create_model("lenet5_avgpool", 3, 10, 32))[0] == (400, 120)  # 32->28->14->10->5
    assert params("lenet5_avgpool", "1x28x28") == 156 + 2416 + 30840 + 10164 + 850 == 44_426
    assert params("lenet5_avgpool", "3x32x32") == 62_006
    # the original keeps max pooling and pads 28 px to 32
    original = create_model("lenet5", 1, 10, 28)
    assert "MaxPool2d" in types(original) and "AvgPool2d" not in types(original) and convs(original)[0][3] == 2


def test_cnn_dropout_is_the_pytorch_mnist_example():
    model = create_model("cnn_dropout", 1, 10, 28)
    assert types(model) == ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "Dropout2d", "MaxPool2d", "ReLU",
                            "Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    assert convs(model) == [(1, 10, 5, 0), (10, 20, 5, 0)]
    assert linears(model) == [(320, 50), (50, 10)]
    assert dropouts(model) == [("Dropout2d", 0.5), ("Dropout", 0.5)]
    assert params("cnn_dropout", "1x28x28") == 21_840  # the example's count
    assert linears(create_model("cnn_dropout", 3, 10, 32))[0] == (500, 50)  # 20x5x5
    assert params("cnn_dropout", "3x32x32") == 31_340


def test_cnn_dropout_drops_in_training_only():
    torch.manual_seed(0)
    model, x = create_model("cnn_dropout", 1, 10, 28), torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model(x))
        assert torch.equal(model.eval()(x), model(x))


def test_cnn_3conv_is_the_three_conv_net():
    model = create_model("cnn_3conv", 1, 10, 28)
    assert types(model) == ["Conv2d", "ReLU", "MaxPool2d"] * 3 + ["Flatten", "Linear", "ReLU", "Linear", "ReLU",
                                                                   "Linear"]
    assert convs(model) == [(1, 16, 5, 0), (16, 32, 5, 0), (32, 64, 3, 0)]
    assert linears(model) == [(64, 32), (32, 16), (16, 10)]  # 28->24->12->8->4->2->1
    assert linears(create_model("cnn_3conv", 3, 10, 32))[0] == (64, 32)  # 32->28->14->10->5->3->1
    assert params("cnn_3conv", "1x28x28") == 416 + 12_832 + 18_496 + 2_080 + 528 + 170 == 34_522
    assert params("cnn_3conv", "3x32x32") == 35_322


def test_cnn_3x3_is_the_two_3x3_conv_net():
    model = create_model("cnn_3x3", 1, 10, 28)
    assert types(model) == ["Conv2d", "ReLU", "MaxPool2d"] * 2 + ["Flatten", "Linear", "ReLU", "Linear"]
    assert convs(model) == [(1, 32, 3, 0), (32, 64, 3, 0)]
    assert linears(model) == [(1600, 64), (64, 10)]  # 28->26->13->11->5: 64*5*5
    assert linears(create_model("cnn_3x3", 3, 10, 32))[0] == (2304, 64)  # 32->30->15->13->6: 64*6*6
    assert params("cnn_3x3", "1x28x28") == 320 + 18_496 + 102_464 + 650 == 121_930
    assert params("cnn_3x3", "3x32x32") == 167_562


@pytest.mark.parametrize("name", ["lenet5_avgpool", "cnn_3conv", "cnn_3x3"])
def test_the_dropout_kwarg_follows_each_hidden_fc_layer(name):
    model = create_model(name, 1, 10, 28, dropout=0.25)
    hidden = sum(1 for m in model if isinstance(m, nn.Linear)) - 1
    assert dropouts(model) == [("Dropout", 0.25)] * hidden
    assert all(types(model)[i - 2:i] == ["Linear", "ReLU"] for i, t in enumerate(types(model)) if t == "Dropout")
    assert not dropouts(create_model(name, 1, 10, 28))


# --- the small residual net's blocks ---------------------------------------------------------------------

@pytest.mark.parametrize("shortcut", ResidualBlock.SHORTCUTS)
def test_residual_block_variants_compute_the_tutorials_formulas(shortcut):
    torch.manual_seed(0)
    block, x = ResidualBlock(8, shortcut), torch.randn(2, 8, 6, 6)
    residual = block.conv2(F.relu(block.conv1(x)))  # F = conv-ReLU-conv: both convs
    if shortcut == "identity":
        expected = F.relu(x + residual)
    elif shortcut == "scaled":
        expected = F.relu(0.5 * (x + residual))
    else:
        expected = F.relu(block.shortcut(x) + residual)
    assert torch.allclose(block(x), expected, atol=1e-6)
    with torch.no_grad():  # the first conv is in F (the tutorial's code skipped it)
        block.conv1.weight.zero_(), block.conv1.bias.zero_()
    assert not torch.allclose(block(x), expected, atol=1e-3)


def test_resnet_small_variants():
    identity, scaled, conv = (create_model(n, 1, 10, 28) for n in
                              ("resnet_small", "resnet_small_scaled", "resnet_small_conv1x1"))
    assert [b.mode for b in scaled if isinstance(b, ResidualBlock)] == ["scaled"] * 2
    shortcuts = [b.shortcut for b in conv if isinstance(b, ResidualBlock)]
    assert [(s.in_channels, s.out_channels, s.kernel_size) for s in shortcuts] == [(16, 16, (1, 1)), (32, 32, (1, 1))]
    assert count_parameters(identity) == count_parameters(scaled) == 41_514
    assert count_parameters(conv) == 41_514 + (16 * 16 + 16) + (32 * 32 + 32) == 42_842
    assert params("resnet_small", "3x32x32") == 45_194 and params("resnet_small_conv1x1", "3x32x32") == 46_522
    # `resnet` below 32 px is still this net, keys and all (its checkpoints still load)
    assert list(create_model("resnet", 1, 10, 28).state_dict()) == list(identity.state_dict())
    assert create_model("resnet_small", 1, 10, 28, shortcut="scaled")[3].mode == "scaled"


# --- Vgg_2 --------------------------------------------------------------------------------------------

def test_vgg_2_layers():
    model = create_model("vgg_2", 1, 10, 28)
    block = ["Conv2d", "BatchNorm2d", "ReLU"]
    assert types(model) == block * 2 + ["MaxPool2d"] + block * 2 + ["MaxPool2d", "Flatten", "Linear", "ReLU",
                                                                  "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert convs(model) == [(1, 64, 3, 1), (64, 64, 3, 1), (64, 128, 3, 1), (128, 128, 3, 1)]
    assert linears(model) == [(6272, 256), (256, 128), (128, 10)]  # 128x7x7
    assert dropouts(model) == [("Dropout", 0.5)] * 2
    assert linears(create_model("vgg_2", 3, 10, 32))[0] == (8192, 256)  # 128x8x8
    assert params("vgg_2", "1x28x28") == 1_899_850 and params("vgg_2", "3x32x32") == 2_392_522


# --- airbench -------------------------------------------------------------------------------------------

def test_airbench_layers():
    model = create_model("airbench", 3, 10, 32)
    group = ["Conv2d", "MaxPool2d", "AirbenchBatchNorm", "GELU", "Conv2d", "AirbenchBatchNorm", "GELU"]
    assert types(model) == (["WhiteningConv", "GELU"] + ["ConvGroup"] * 3
                            + ["AdaptiveMaxPool2d", "Flatten", "Linear", "Scale"])
    assert all(types(model[i]) == group for i in (2, 3, 4))
    assert convs(model) == [(3, 24, 2, 0), (24, 64, 3, 1), (64, 64, 3, 1), (64, 256, 3, 1), (256, 256, 3, 1),
                            (256, 256, 3, 1), (256, 256, 3, 1)]
    assert convs(create_model("airbench", 1, 10, 28))[0] == (1, 8, 2, 0)  # 2 * C * 2 * 2 whitening filters
    assert linears(model) == [(256, 10)] and model[-2].bias is None and model[-1].factor == 1 / 9
    assert params("airbench", "3x32x32") == 1_971_352 and params("airbench", "1x28x28") == 1_962_120  # trainable
    assert params("airbench", "3x32x32", widths=[32, 128, 128]) == 497_240
    for size in (28, 32):  # the last group's map is 3x3 at both sizes: airbench's 3x3 pool is the global one
        trunk = create_model("airbench", 1, 10, size)[:-4]
        assert trunk(torch.zeros(1, 1, size, size)).shape[-2:] == (3, 3)
    with pytest.raises(ValueError, match="three positive integers"):
        create_model("airbench", 3, 10, 32, widths=[32, 0, 128])
    with pytest.raises(ValueError, match="at least 9 px"):
        create_model("airbench", 3, 10, 8)
    with pytest.raises(ValueError, match="flip_tta must be true or false"):
        create_model("airbench", 3, 10, 32, flip_tta="yes")


def correlated_images(n: int = 32, channels: int = 3, size: int = 32) -> torch.Tensor:
    """Noise blurred along the width and mixed across channels: 2x2 patches far from white."""
    x = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))
    x = x + torch.roll(x, 1, dims=3) + 0.5 * x.mean(dim=1, keepdim=True)
    return x


def test_airbench_whitens_its_stem_from_the_first_training_batch():
    torch.manual_seed(0)
    model = create_model("airbench", 3, 10, 32, widths=[8, 16, 16])
    stem, x = model[0], correlated_images()
    assert not stem.weight.requires_grad and stem.bias.requires_grad  # frozen filters, a trained bias
    model.eval()
    model(x)
    assert not stem.whitened  # evaluating an untrained net changes nothing
    model.train()
    model(x)
    assert stem.whitened
    with torch.no_grad():  # the first 12 filters' outputs on these patches: unit variance, uncorrelated
        z = F.conv2d(x, stem.weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
        covariance = z.T @ z / len(z)
    torch.testing.assert_close(covariance, torch.eye(12), atol=2e-3, rtol=0)
    torch.testing.assert_close(stem.weight[12:], -stem.weight[:12])
    whitened = stem.weight.clone()
    model(torch.randn(8, 3, 32, 32))  # later batches leave the filters alone
    torch.testing.assert_close(stem.weight, whitened)
    fresh = create_model("airbench", 3, 10, 32, widths=[8, 16, 16])
    fresh.load_state_dict(model.state_dict())  # a checkpoint keeps the filters and the flag
    assert fresh[0].whitened and torch.equal(fresh[0].weight, whitened)
    fresh.train()
    fresh(torch.randn(8, 3, 32, 32))  # a resumed run does not re-whiten
    assert torch.equal(fresh[0].weight, whitened)
    model.load_state_dict(create_model("airbench", 3, 10, 32, widths=[8, 16, 16]).state_dict())
    model(x)  # an unwhitened state loaded into a whitened model: whitened again from the next batch
    assert model[0].whitened and torch.allclose(model[0].weight, whitened)


def test_airbench_groups_start_as_identity_convs():
    group = create_model("airbench", 3, 10, 32, widths=[8, 16, 16])[2]  # 24 -> 8 channels, then 8 -> 8
    x = torch.randn(2, 24, 16, 16)
    torch.testing.assert_close(group[4](x[:, :8]), x[:, :8])  # in == out: the whole conv is the identity
    torch.testing.assert_close(F.conv2d(x, group[0].weight), x[:, :8, 1:-1, 1:-1])  # the first 8 of 24 pass through


def test_airbench_batchnorm_bias_learns_64x_faster_under_sgd():
    torch.manual_seed(0)
    x, target = torch.randn(16, 4, 5, 5), torch.randn(16, 4, 5, 5)
    steps = []
    for norm, scale in ((nn.BatchNorm2d(4, eps=1e-12), 1), (AirbenchBatchNorm(4), AirbenchBatchNorm.BIAS_SCALE)):
        opt = torch.optim.SGD([norm.bias], lr=1e-3)
        ((norm(x) - target) ** 2).mean().backward()
        opt.step()
        steps.append(norm.bias.detach() * scale)  # the bias the layer adds, after one step from 0
    assert steps[0].abs().min() > 0
    torch.testing.assert_close(steps[1], 64 * steps[0])
    bn = AirbenchBatchNorm(4)
    assert not bn.weight.requires_grad and bn.momentum == 0.4 and bn.eps == 1e-12


def test_airbench_flip_tta_averages_the_mirror_image_when_evaluating():
    torch.manual_seed(0)
    model = create_model("airbench", 3, 10, 32, widths=[8, 16, 16], flip_tta=True)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        plain, mirrored = model.net(x), model.net(x.flip(3))
        torch.testing.assert_close(model(x), (plain + mirrored) / 2)
        torch.testing.assert_close(model(x.flip(3)), model(x))  # a mirror image gets the same answer
    model.train()
    torch.testing.assert_close(model(x), model.net(x))  # training sees each image once
    assert count_parameters(model) == params("airbench", "3x32x32", widths=[8, 16, 16])


def test_vgg_2_initialization_statistics():
    torch.manual_seed(0)
    model = create_model("vgg_2", 3, 10, 32)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):  # Kaiming normal, fan_out, ReLU gain
            expected = math.sqrt(2 / (m.out_channels * 9))
            assert abs(m.weight.std().item() / expected - 1) < 0.1 and abs(m.weight.mean().item()) < 0.1 * expected
            assert not m.bias.any()
        elif isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and not m.bias.any()
        elif isinstance(m, nn.Linear):  # N(0, 0.01)
            assert abs(m.weight.std().item() / 0.01 - 1) < 0.1 and abs(m.weight.mean().item()) < 1e-3
            assert not m.bias.any()


def test_the_init_kwarg():
    torch.manual_seed(0)
    default = create_model("cnn_3x3", 1, 10, 28)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), create_model("cnn_3x3", 1, 10, 28,
                                                                                   init="default").parameters()))
    fc = create_model("cnn_3x3", 1, 10, 28, init="kaiming")[7]  # Linear(1600, 64): He normal, fan_in
    assert abs(fc.weight.std().item() / math.sqrt(2 / 1600) - 1) < 0.05 and not fc.bias.any()
    fc = create_model("cnn_3x3", 1, 10, 28, init="xavier")[7]  # Glorot uniform: bound sqrt(6 / (in + out))
    bound = math.sqrt(6 / (1600 + 64))
    assert bound * 0.99 < fc.weight.abs().max().item() <= bound and not fc.bias.any()
    fc = create_model("mlp", 1, 10, 28, init="vgg")[1]  # torchvision's VGG: linear N(0, 0.01)
    assert abs(fc.weight.std().item() / 0.01 - 1) < 0.05 and not fc.bias.any()


# --- torchvision's VGG-16 and ResNet-18 ---------------------------------------------------------------

def test_torchvision_vgg16_adapted_as_the_tutorial_did():
    from torchvision.models import VGG

    model = create_model("torchvision_vgg16", 1, 10, 28)
    resize, net = model
    assert isinstance(resize, Resize) and resize.size == 64 and isinstance(net, VGG)
    conv = convs(net)
    assert len(conv) == 13 and conv[0] == (1, 64, 3, 1) and conv[-1] == (512, 512, 3, 1)
    assert linears(net) == [(25088, 4096), (4096, 4096), (4096, 10)]
    assert dropouts(net) == [("Dropout", 0.5)] * 2
    assert isinstance(net.avgpool, FixedAdaptiveAvgPool) and net.avgpool.weights.shape == (7, 2)  # 64 px -> 2x2
    # torchvision's 138,357,544 at 3 channels and 1000 classes, less the classes and channels dropped
    assert count_parameters(model) == 138_357_544 - 990 * 4097 - 2 * 64 * 9 == 134_300_362
    assert params("torchvision_vgg16", "3x32x32") == 134_301_514
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_torchvision_vgg16_resize_option():
    assert isinstance(create_model("torchvision_vgg16", 3, 10, 32, resize_to=None)[0], nn.Identity)
    assert isinstance(create_model("torchvision_vgg16", 3, 10, 32, resize_to=32)[0], nn.Identity)
    net = create_model("torchvision_vgg16", 1, 10, 28, resize_to=96)[1]
    assert net.avgpool.weights.shape == (7, 3)


def test_torchvision_resnet18_adapted_as_the_tutorial_did():
    from torchvision.models import ResNet

    model = create_model("torchvision_resnet18", 1, 10, 28)
    resize, net = model
    assert isinstance(resize, nn.Identity) and isinstance(net, ResNet)
    assert (net.conv1.in_channels, net.conv1.out_channels, net.conv1.kernel_size, net.conv1.stride) == (
        1, 64, (7, 7), (2, 2))
    assert linears(net) == [(512, 10)]
    # torchvision's 11,689,512 at 3 channels and 1000 classes, less the classes and channels dropped
    assert count_parameters(model) == 11_689_512 - 990 * 513 - 2 * 64 * 49 == 11_175_370
    assert params("torchvision_resnet18", "3x32x32") == 11_181_642
    resized = create_model("torchvision_resnet18", 3, 10, 32, resize_to=64)
    assert isinstance(resized[0], Resize) and resized[0].size == 64


@pytest.mark.parametrize("in_size", [1, 2, 3, 4, 5, 7, 9, 14])
def test_fixed_adaptive_avg_pool_is_adaptive_avg_pool(in_size):
    x = torch.randn(2, 5, in_size, in_size)
    assert torch.allclose(FixedAdaptiveAvgPool(in_size, 7)(x), nn.AdaptiveAvgPool2d(7)(x), atol=1e-6)


def test_resize_is_bilinear_without_corner_alignment():
    x = torch.randn(2, 3, 28, 28)
    expected = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(Resize(64)(x), expected)
