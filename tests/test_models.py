"""The model registry and every registered architecture, for both input shapes (1x28x28, 3x32x32)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models import count_macs, count_parameters, create_model, list_models, register_model, summarize
from models.registry import _REGISTRY

SHAPES = {"1x28x28": (1, 28), "3x32x32": (3, 32)}
NUM_CLASSES = 10


@pytest.fixture
def scratch_registry():
    """Lets a test register throwaway architectures; they are removed afterwards."""
    before = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(before)


def test_the_zoo_is_registered():
    assert {"mlp", "lenet5", "cnn", "inception", "resnet", "resnet20", "vgg"} <= set(list_models())
    tutorials = {"mlp_dropout", "mlp5", "lenet5_avgpool", "cnn_dropout", "cnn_3conv", "cnn_3x3", "resnet_small",
                 "resnet_small_scaled", "resnet_small_conv1x1", "vgg_2", "torchvision_vgg16", "torchvision_resnet18",
                 "airbench"}
    assert tutorials <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", list_models())
def test_forward_backward_and_summary(name, shape):
    channels, size = SHAPES[shape]
    torch.manual_seed(0)
    model = create_model(name, channels, NUM_CLASSES, size)
    assert isinstance(model, nn.Module)
    model.train()
    x = torch.randn(2, channels, size, size)
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()

    nn.functional.cross_entropy(logits, torch.tensor([3, 7])).backward()
    params = list(model.named_parameters())
    assert params
    no_grad = [n for n, p in params if p.requires_grad and p.grad is None]
    assert not no_grad, f"{name}: parameters without a gradient: {no_grad}"
    bad = [n for n, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients in {bad}"
    assert sum(float(p.grad.abs().sum()) for _, p in params if p.grad is not None) > 0, f"{name}: every gradient is zero"

    num_params = count_parameters(model)
    macs = count_macs(model, (channels, size, size))
    assert num_params == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0  # trainable ones
    assert macs > 0
    assert summarize(model, (channels, size, size)) == {"num_params": num_params, "macs": macs,
                                                        "input_shape": [channels, size, size]}


@pytest.mark.parametrize("name", list_models())
def test_builders_leave_the_model_on_cpu_in_fp32(name):
    model = create_model(name, 1, NUM_CLASSES, 28)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_counts_of_the_tutorial_cnn_are_exact():
    model = create_model("cnn", 1, 10, 28)
    # conv1 1->10 k5: 10*25+10; conv2 10->20 k5: 20*250+20; fc 320->10: 3200+10
    assert count_parameters(model) == 260 + 5020 + 3210
    # conv1 10x24x24 outputs x 25; conv2 20x8x8 outputs x 250; fc 10 outputs x 320
    assert count_macs(model, (1, 28, 28)) == 10 * 24 * 24 * 25 + 20 * 8 * 8 * 250 + 10 * 320


def test_count_macs_restores_the_training_mode():
    model = create_model("resnet20", 3, 10, 32).train()
    count_macs(model, (3, 32, 32))
    assert model.training
    model.eval()
    count_macs(model, (3, 32, 32))
    assert not model.training


def test_resnet_is_resnet18_at_32_pixels_and_the_tutorial_net_below():
    assert 11_000_000 < count_parameters(create_model("resnet", 3, 10, 32)) < 11_300_000  # ResNet-18
    assert count_parameters(create_model("resnet", 1, 10, 28)) < 100_000
    assert count_parameters(create_model("resnet", 3, 10, 32, depth=20)) == count_parameters(
        create_model("resnet20", 3, 10, 32))


def test_registering_a_duplicate_name_raises(scratch_registry):
    with pytest.raises(ValueError, match="'cnn' is already registered"):
        @register_model
        def cnn(in_channels, num_classes, image_size):  # noqa: F811
            return nn.Identity()
    assert create_model("cnn", 1, 10, 28)[0].out_channels == 10  # the original is still the one built


def test_register_model_adds_a_new_architecture(scratch_registry):
    @register_model
    def tiny_test_net(in_channels, num_classes, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))

    assert "tiny_test_net" in list_models()
    assert models.create_model("tiny_test_net", 1, 3, 8)(torch.zeros(4, 1, 8, 8)).shape == (4, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_model(tiny_test_net)


def test_unknown_model_raises_value_error_naming_it():
    with pytest.raises(ValueError, match=r"unknown model 'resnet9000'.*cnn"):
        create_model("resnet9000", 1, 10, 28)


@pytest.mark.parametrize("name, kwargs, message", [
    ("cnn", {"wings": 2}, r"bad arguments for model 'cnn'.*wings"),
    ("mlp", {"hidden": (8,), "depth": 3}, r"bad arguments for model 'mlp'.*depth"),
    ("mlp_dropout", {"hidden": (8,)}, r"bad arguments for model 'mlp_dropout'.*hidden"),
    ("mlp", {"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1\.0"),
    ("cnn_dropout", {"dropout": -0.1}, r"dropout .* got -0\.1"),
    ("vgg_2", {"dropout": "0.5"}, r"dropout .* got '0\.5'"),
    ("cnn_3x3", {"init": "he"}, r"init must be one of 'default', 'kaiming', 'xavier', 'vgg', got 'he'"),
    ("resnet_small", {"shortcut": "projection"}, r"shortcut must be one of .*'conv1x1', got 'projection'"),
    ("resnet_small_scaled", {"shortcut": "conv1x1"}, r"bad arguments for model 'resnet_small_scaled'.*shortcut"),
    ("torchvision_vgg16", {"resize_to": None}, r"torchvision_vgg16 needs inputs of at least 32 px.*28 px"),
    ("torchvision_vgg16", {"resize_to": 16}, r"torchvision_vgg16 needs inputs of at least 32 px.*16 px"),
    ("torchvision_vgg16", {"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1\.0"),
    ("torchvision_resnet18", {"resize_to": 0}, r"torchvision_resnet18 resize_to must be a positive integer"),
    ("torchvision_resnet18", {"resize_to": 64.0}, r"resize_to must be a positive integer or None, got 64\.0"),
    ("vgg", {"depth": 12}, "vgg depth"),
    ("vgg", {"width": 0}, "vgg width"),
    ("resnet", {"depth": 7}, "resnet depth"),
])
def test_bad_kwargs_raise_value_error(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, 1, 10, 28, **kwargs)


@pytest.mark.parametrize("args, message", [
    ((0, 10, 28), "in_channels"),
    ((1, 0, 28), "num_classes"),
    ((1, 10, -5), "image_size"),
    ((1, 10, 28.0), "image_size"),
])
def test_bad_shapes_raise_value_error(args, message):
    with pytest.raises(ValueError, match=message):
        create_model("cnn", *args)


def test_kwargs_reach_the_builder():
    small = create_model("vgg", 1, 10, 28, depth=11, width=8)
    assert count_parameters(create_model("vgg", 1, 10, 28, depth=16, width=8)) > count_parameters(small)
    assert [m for m in create_model("mlp", 1, 10, 28, hidden=(32,)).modules()
            if isinstance(m, nn.Linear)][0].out_features == 32
