"""covidctnet.models.grad_cam: the log-odds Grad-CAM against MONAI's, the ensemble's sum, and the recorded scale."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from monai.visualize import GradCAM

from covidctnet.core.errors import ConfigError, ModelDirError
from covidctnet.models.grad_cam import CAM_UNIT, CamScale, CamScaleConfig, cam_maps, cam_scale_of, log_odds_cam
from covidctnet.models.slice import SliceEnsemble, build_slice_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _LogOdds(torch.nn.Module):
    """The log-odds as MONAI's one output (class 0)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return (out[:, 1] - out[:, 0])[:, None]


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_slice_model("resnet18", in_channels=1, num_classes=2, width=0.25).eval()


def _inputs(n: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(1))


def test_one_network_is_monai_raw_grad_cam_times_the_cells():
    net, x = _net(0), _inputs()
    ours = log_odds_cam(net, x)
    monai = GradCAM(nn_module=_LogOdds(net), target_layers=["net.layer4"], postprocessing=lambda m: m)
    with torch.enable_grad():
        raw = np.stack([monai(x[i:i + 1], class_idx=0)[0, 0].detach().numpy() for i in range(len(x))])
    shapes = []
    hook = net.layer4.register_forward_hook(lambda module, inputs, output: shapes.append(output.shape[-2:]))
    with torch.no_grad():
        net(x[:1])
    hook.remove()
    cells = shapes[0]
    assert ours.shape == (3, 64, 64) and ours.dtype == np.float32 and ours.min() >= 0
    assert ours.max() > 0
    np.testing.assert_allclose(ours, raw * cells[0] * cells[1], rtol=1e-4, atol=1e-5)
    # one batch or one image at a time: the same maps (eval mode: images do not interact)
    np.testing.assert_allclose(log_odds_cam(net, x[1:2])[0], ours[1], rtol=1e-4, atol=1e-5)


def test_an_ensemble_adds_its_members_maps():
    """Two copies of one network: each member's gradient is half the ensemble's log-odds, so their sum is the network's
    own map; the mean (what the maps were before) would be half of it."""
    net, x = _net(0), _inputs()
    twins = SliceEnsemble([net, copy.deepcopy(net)]).eval()
    np.testing.assert_allclose(log_odds_cam(twins, x), log_odds_cam(net, x), rtol=1e-3, atol=1e-4)
    mixed = SliceEnsemble([net, _net(1)]).eval()
    assert not np.allclose(log_odds_cam(mixed, x), log_odds_cam(net, x), atol=1e-3)


def test_the_network_keeps_its_mode_and_cam_maps_batches():
    net, x = _net(0), _inputs(5)
    net.train()
    maps = cam_maps(net, list(x), batch_size=2)
    assert net.training and maps.shape == (5, 64, 64)
    np.testing.assert_allclose(maps, log_odds_cam(net, x), rtol=1e-4, atol=1e-5)


def test_scale_is_the_percentile_of_all_pixels_and_round_trips():
    rng = np.random.default_rng(0)
    maps = [rng.gamma(2.0, 1.0, (4, 8, 8)).astype(np.float32), rng.gamma(2.0, 1.0, (3, 8, 8)).astype(np.float32)]
    scale = cam_scale_of(maps, "validation split", "toy val", CamScaleConfig(percentile=95.0, show_from=0.3))
    pooled = np.concatenate([m.ravel() for m in maps])
    assert scale.value == pytest.approx(float(np.percentile(pooled, 95.0)))
    assert scale.n_images == 7 and scale.unit == CAM_UNIT and scale.floor == pytest.approx(0.3 * scale.value)
    assert CamScale.from_config({"cam_scale": scale.to_dict()}) == scale
    assert CamScale.from_config({}) is None
    with pytest.raises(ConfigError, match="no evidence"):
        cam_scale_of(np.zeros((2, 8, 8)), "x", "y")


@pytest.mark.parametrize("change", [{"unit": "probability"}, {"value": 0.0}, {"show_from": 1.5}, {"extra": 1}])
def test_a_malformed_recorded_scale_is_refused(change):
    raw = {**CamScale(2.0, 99.0, 0.25, "out-of-fold", "d train+val", 10).to_dict(), **change}
    with pytest.raises(ModelDirError, match="cam_scale"):
        CamScale.from_config({"cam_scale": raw}, "m/config.yaml")


def test_config_ranges():
    for bad in ({"percentile": 20.0}, {"show_from": 1.0}, {"show_from": -0.1}):
        with pytest.raises(ConfigError):
            CamScaleConfig(**bad)
