"""Architecture details beside tests/test_models.py: channels_last equivalence, the tutorial net, variants."""
from __future__ import annotations

import pytest
import torch

from models import count_parameters, create_model, list_models


@pytest.mark.parametrize("name", list_models())
def test_channels_last_gives_the_same_logits(name):
    torch.manual_seed(0)
    model = create_model(name, 1, 10, 28).eval()
    x = torch.randn(3, 1, 28, 28)
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
