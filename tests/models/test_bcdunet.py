"""BCDUNet: shapes, Keras parameter counts, input checks, gradients, config round-trip."""

from __future__ import annotations

import pytest
import torch
import yaml

from covidctnet.core.errors import ConfigError, ShapeError
from covidctnet.models.bcdunet import BCDUNet, keras_param_count


def _meta(**kwargs) -> BCDUNet:
    """A model on the meta device: real shapes, no memory and no weight initialisation (enough to count)."""
    with torch.device("meta"):
        return BCDUNet(**kwargs)


# [kwargs, input shape, expected output shape]; small widths keep these fast on CPU.
SHAPE_CASES = [
    [{"features": 8}, (2, 1, 128, 128), (2, 1, 128, 128)],
    [{"features": 8, "dense_blocks": 1}, (1, 1, 240, 240), (1, 1, 240, 240)],
    [{"features": 4, "bidirectional": True}, (2, 1, 240, 240), (2, 1, 240, 240)],
    [
        {"features": 4, "recurrent_activation": "sigmoid", "in_channels": 2, "out_channels": 3},
        (1, 2, 64, 96),
        (1, 3, 64, 96),
    ],
]


@pytest.mark.parametrize("kwargs, in_shape, out_shape", SHAPE_CASES, ids=["D3-128", "D1-240", "bi-240", "sigm-2to3"])
def test_shape(kwargs, in_shape, out_shape):
    torch.manual_seed(0)
    net = BCDUNet(**kwargs).eval()
    with torch.no_grad():
        y = net(torch.rand(in_shape))
    assert y.shape == out_shape
    assert y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_official_model_forward():
    """The official CovidCTNet configuration (the default) on two 128x128 slices."""
    torch.manual_seed(0)
    net = BCDUNet().eval()
    with torch.no_grad():
        y = net(torch.rand(2, 1, 128, 128))
    assert y.shape == (2, 1, 128, 128)
    assert torch.isfinite(y).all() and 0.0 <= float(y.min()) and float(y.max()) <= 1.0


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, 5_167_365),  # official CovidCTNet: base 32, D3 (mohofar/CovidCtNet Training-CovidCTNet.ipynb)
        ({"features": 32, "dense_blocks": 3}, 5_167_365),
        ({"features": 64, "dense_blocks": 3}, 20_659_717),  # rezazad68/BCDU-Net BCDU_net_D3
        ({"features": 64, "dense_blocks": 1}, 8_861_189),  # rezazad68/BCDU-Net BCDU_net_D1
    ],
    ids=["default", "covidctnet", "bcdunet-D3", "bcdunet-D1"],
)
def test_keras_param_count(kwargs, expected):
    assert keras_param_count(_meta(**kwargs)) == expected


def test_official_model_bn_statistics():
    """448 of the official 5,167,365 are batch-norm moving statistics (mean + variance of 128 + 64 + 32 channels)."""
    net = _meta()
    n_stats = sum(b.numel() for name, b in net.named_buffers() if name.endswith(("running_mean", "running_var")))
    assert n_stats == 448
    assert keras_param_count(net) - sum(p.numel() for p in net.parameters()) == 448
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert bn.eps == 1e-3 and bn.momentum == pytest.approx(0.01)  # Keras epsilon and momentum 0.99


def test_bidirectional_param_count():
    """Each level gains a second cell (4·(9·C·F + 9·F² + F), F = C/2) and F more input channels to its next conv."""
    f = 32
    extra = 0
    for c in (f, 2 * f, 4 * f):
        lstm_f = c // 2
        extra += 4 * (9 * c * lstm_f + 9 * lstm_f**2 + lstm_f) + 9 * lstm_f * c
    assert keras_param_count(_meta(bidirectional=True)) - keras_param_count(_meta()) == extra


@pytest.mark.parametrize("shape", [(1, 1, 250, 250), (1, 1, 128, 100), (1, 1, 4, 8)])
def test_not_divisible_by_8(shape):
    net = BCDUNet(features=4)
    with pytest.raises(ShapeError, match="divisible by 8"):
        net(torch.rand(shape))


@pytest.mark.parametrize("shape", [(1, 128, 128), (1, 3, 128, 128), (1, 1, 1, 128, 128)])
def test_bad_rank_or_channels(shape):
    with pytest.raises(ShapeError, match=r"\(B, 1, H, W\)"):
        BCDUNet(features=4)(torch.rand(shape))


def test_gradient_flows():
    torch.manual_seed(0)
    net = BCDUNet(features=8).train()
    x = torch.rand(2, 1, 32, 32)
    loss = torch.nn.functional.binary_cross_entropy(net(x), x)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # gradients reach the first layer and the ConvLSTMs (recurrent kernels included)
    assert net.conv_0[0].weight.grad.abs().sum() > 0
    for up in (net.upcat_0, net.upcat_1, net.upcat_2):
        assert up.lstm.cell.input_conv.weight.grad.abs().sum() > 0
        assert up.lstm.cell.recurrent_conv.weight.grad.abs().sum() > 0


def test_dropout_only_in_training():
    torch.manual_seed(0)
    net = BCDUNet(features=8)
    x = torch.rand(1, 1, 32, 32)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        net.train()
        assert not torch.equal(net(x), net(x))
        no_drop = BCDUNet(features=8, dropout=0.0)
        no_drop.load_state_dict(net.state_dict())
        no_drop.eval()
        net.eval()
        torch.testing.assert_close(no_drop(x), net(x))


def test_config_round_trip_through_yaml():
    net = BCDUNet(features=8, dense_blocks=1, bidirectional=True, recurrent_activation="sigmoid", dropout=0.25)
    text = yaml.safe_dump({"arch": "BCDUNet", "kwargs": net.config})
    rebuilt = BCDUNet.from_config(yaml.safe_load(text)["kwargs"])
    assert rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict())  # same architecture: every key and shape matches
    x = torch.rand(1, 1, 32, 32)
    net.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x))


@pytest.mark.parametrize(
    "config, match",
    [
        ({"features": 32, "width": 4}, "unknown keys \\['width'\\]"),
        ({"dense_blocks": 2}, "dense_blocks must be 1"),
        ({"features": 31}, "features must be an even int"),
        ({"recurrent_activation": "relu"}, "recurrent_activation must be one of"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_from_config_errors(config, match):
    with pytest.raises(ConfigError, match=match):
        BCDUNet.from_config(config)
