"""Tests of the 2D slice-model factory (covidctnet.models.slice)."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from covidctnet.cli.options import SLICE_ARCHS as CLI_SLICE_ARCHS
from covidctnet.core.errors import CheckpointError, ConfigError
from covidctnet.models.slice import (
    SLICE_ARCHS,
    build_slice_model,
    encoder_state_dict,
    feature_dim,
    head_name,
    load_encoder_state_dict,
    replace_head,
)
from covidctnet.training.slice import Arch

CASES = [
    ({"arch": "resnet18", "in_channels": 1, "width": 0.25}, "fc", 128),
    ({"arch": "resnet18", "in_channels": 2, "width": 0.5}, "fc", 256),
    ({"arch": "densenet121", "in_channels": 2}, "class_layers.out", 1024),
]
# built but not run (a forward pass of these adds seconds on a shared CPU and tests nothing new)
BUILD_ONLY = [
    ({"arch": "resnet50", "in_channels": 1, "width": 0.125}, "fc", 256),
    ({"arch": "densenet169", "in_channels": 1, "dropout": 0.2}, "class_layers.out", 1664),
]


@pytest.mark.parametrize("kwargs, head, dim", CASES, ids=[c[0]["arch"] + str(c[0]["in_channels"]) for c in CASES])
def test_shapes_and_head(kwargs, head, dim):
    torch.manual_seed(0)
    model = build_slice_model(**kwargs).eval()
    x = torch.randn(2, kwargs["in_channels"], 32, 32)  # the smallest size all five downsamplings take
    with torch.no_grad():
        assert model(x).shape == (2, 2)
    assert head_name(model) == head and feature_dim(model) == dim
    replace_head(model, torch.nn.Identity())
    with torch.no_grad():
        assert model(x).shape == (2, dim)


@pytest.mark.parametrize("kwargs, head, dim", BUILD_ONLY, ids=[c[0]["arch"] for c in BUILD_ONLY])
def test_other_archs_build(kwargs, head, dim):
    model = build_slice_model(**kwargs)
    assert head_name(model) == head and feature_dim(model) == dim
    assert getattr(model, "fc", None) is None or model.fc.out_features == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arch": "vgg16"}, "arch must be one of"),
        ({"arch": "densenet169", "pretrained": True}, "--init imagenet"),
        ({"arch": "resnet18", "in_channels": 3}, "in_channels must be 1"),
        ({"arch": "densenet121", "width": 0.5}, "ResNets only"),
        ({"arch": "resnet18", "dropout": 0.3}, "DenseNets only"),
        ({"arch": "resnet18", "width": 0.01}, "width must be in"),
    ],
)
def test_unsupported_combinations(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_slice_model(**kwargs)


def test_encoder_transfer():
    torch.manual_seed(0)
    src = build_slice_model("resnet18", width=0.25)
    dst = build_slice_model("resnet18", width=0.25)
    head_before = dst.fc.weight.clone()
    enc = encoder_state_dict(src)
    assert enc and not any(k.startswith("fc.") for k in enc)
    load_encoder_state_dict(dst, enc)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in enc.items())
    assert torch.equal(dst.fc.weight, head_before)  # the head stays fresh
    with pytest.raises(CheckpointError, match="do not fit"):
        load_encoder_state_dict(build_slice_model("resnet18", width=0.5), enc)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_encoder_state_dict(build_slice_model("resnet18", width=0.25, in_channels=2), enc)


def test_one_list_of_slice_networks():
    """The CLI's --arch choices (written without importing torch) and the training configs' type are this list."""
    assert CLI_SLICE_ARCHS == SLICE_ARCHS
    assert get_args(Arch) == SLICE_ARCHS
