"""Keras BCDU-Net → BCDUNet: numeric parity with the seeded-random Keras reference (output and intermediate layers)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from covidctnet.core.errors import CheckpointError
from covidctnet.models.bcdunet import BCDUNet, keras_param_count
from covidctnet.models.keras_import import (
    bcdunet_config_from_keras,
    bcdunet_from_keras,
    bcdunet_state_dict_from_keras,
    read_keras_h5,
)

H5 = "bcdunet_keras_seeded_random.h5"
IO = "bcdunet_keras_seeded_random_io.npz"

# Keras layer name in the reference -> our module whose forward output it equals (Keras outputs are NHWC).
INTERMEDIATES = {
    "batch_normalization": "upcat_2.up.1",
    "conv_lstm2d": "upcat_2.lstm",
    "conv_lstm2d_1": "upcat_1.lstm",
    "conv_lstm2d_2": "upcat_0.lstm",
    "conv2d_18": "head",  # 3x3 conv to 2 channels + ReLU (Keras Conv2D(2, 3, activation='relu'))
}


@pytest.fixture(scope="module")
def keras_weights(reference_dir):
    return read_keras_h5(reference_dir / H5)


@pytest.fixture(scope="module")
def io(reference_dir):
    d = np.load(reference_dir / IO)
    return {k: d[k] for k in d.files}


def _forward_with_hooks(net: BCDUNet, x_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """Run ``net`` in eval mode; return the output and the INTERMEDIATES, all as NHWC arrays."""
    modules = dict(net.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [
        # clone: the ReLU after the batch norm works in place
        modules[ours].register_forward_hook(lambda m, i, o, k=keras: captured.__setitem__(k, o.detach().clone()))
        for keras, ours in INTERMEDIATES.items()
    ]
    try:
        net.eval()
        with torch.no_grad():
            captured["y"] = net(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous())
    finally:
        for h in handles:
            h.remove()
    return {k: v.permute(0, 2, 3, 1).numpy() for k, v in captured.items()}


@pytest.fixture(scope="module")
def loaded(keras_weights):
    return bcdunet_from_keras(keras_weights)


@pytest.fixture(scope="module")
def fresh():
    """A default (official-configuration) BCDUNet, used as a template for the converter."""
    return BCDUNet()


@pytest.fixture(scope="module")
def outputs(loaded, io):
    return _forward_with_hooks(loaded, io["x"])


def test_config_inferred_from_weights(keras_weights, loaded):
    expected = {"in_channels": 1, "out_channels": 1, "features": 32, "dense_blocks": 3, "head_channels": 2}
    cfg = bcdunet_config_from_keras(keras_weights)
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["bidirectional"] is False and cfg["recurrent_activation"] == "hard_sigmoid"
    n_keras = sum(a.size for arrays in keras_weights.values() for a in arrays)
    assert keras_param_count(loaded) == n_keras == 5_167_365
    assert not loaded.training


def test_output_parity(outputs, io):
    assert outputs["y"].shape == io["y"].shape == (2, 128, 128, 1)
    np.testing.assert_allclose(outputs["y"], io["y"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("layer", list(INTERMEDIATES))
def test_intermediate_parity(outputs, io, layer):
    assert outputs[layer].shape == io[layer].shape
    np.testing.assert_allclose(outputs[layer], io[layer], atol=1e-4, rtol=0)


def test_parity_needs_backwards_time_order(loaded, io):
    """Reading [skip, up] forwards (skip first) does not reproduce Keras: the reference pins go_backwards=True."""
    net = copy.deepcopy(loaded)
    for up in (net.upcat_0, net.upcat_1, net.upcat_2):
        up.lstm.go_backwards = False
    out = _forward_with_hooks(net, io["x"])
    assert np.abs(out["conv_lstm2d"] - io["conv_lstm2d"]).max() > 1e-2


def test_parity_needs_hard_sigmoid(keras_weights, io):
    """The logistic gate does not reproduce Keras either: Keras 2's hard_sigmoid is needed."""
    net = BCDUNet(recurrent_activation="sigmoid")
    net.load_state_dict(bcdunet_state_dict_from_keras(keras_weights, net))
    out = _forward_with_hooks(net, io["x"])
    assert np.abs(out["conv_lstm2d"] - io["conv_lstm2d"]).max() > 1e-2


def test_path_and_dict_and_renumbered_names_agree(reference_dir, keras_weights, loaded, fresh):
    """Layers are matched by kind and order, so other Keras name numbering (a second model in a session) works."""
    renamed = {}
    for name, arrays in keras_weights.items():
        m = re.fullmatch(r"(.*?)(?:_(\d+))?", name)
        renamed[f"{m.group(1)}_{int(m.group(2) or 0) + 40}"] = arrays
    from_path = bcdunet_state_dict_from_keras(reference_dir / H5, fresh)
    from_renamed = bcdunet_state_dict_from_keras(renamed, fresh)
    reference = loaded.state_dict()
    assert from_path.keys() == from_renamed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(from_path[k], reference[k]), k
        assert torch.equal(from_renamed[k], reference[k]), k


def test_sets_keras_batchnorm_epsilon(keras_weights, fresh):
    net = fresh
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.eps = 1e-5
    bcdunet_state_dict_from_keras(keras_weights, net)
    assert {m.eps for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"features": 4}, "shape"),
        ({"features": 4, "dense_blocks": 1}, "layers"),
        ({"features": 4, "bidirectional": True}, "bidirectional=False"),
    ],
    ids=["width", "D1", "bidirectional"],
)
def test_wrong_configuration(keras_weights, kwargs, match):
    with pytest.raises(CheckpointError, match=match):
        bcdunet_state_dict_from_keras(keras_weights, BCDUNet(**kwargs))


def test_not_a_bcdunet(tmp_path, reference_dir):
    with pytest.raises(CheckpointError, match="not a BCDU-Net"):
        bcdunet_from_keras(reference_dir / "weight_cnn_CovidCtNet_v2_final.h5")  # the official 3D CNN
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(CheckpointError, match="bad.h5"):
        bcdunet_from_keras(bad)
