"""Grad-CAM of a slice model's log-odds of COVID-19, in log-odds units, and the colour scale calibrated per model.

Grad-CAM (Selvaraju et al., ICCV 2017) weights each channel ``k`` of the last feature layer ``A`` (K, h, w) by the mean
over its cells of ``d target / d A_k`` and sums over channels. The target here is the log-odds of COVID-19
(``out[:, 1] - out[:, 0]``: for one network its logit difference, for a
:class:`~covidctnet.models.slice.SliceEnsemble` ``log p_covid - log p_noncovid`` of the mean probabilities), the
quantity the threshold on ``p_covid`` cuts, so high = evidence for COVID-19.

Each map is multiplied by the number of feature-map cells. For a network that ends in global average pooling and a
linear layer (the slice ResNets and DenseNets) the map then averages over the slice to the log-odds minus the bias: a
value ``v`` is a region that, were the whole slice like it, would move the log-odds by ``v``. For an ensemble the
members' maps are **added** before the positive part is kept: each member's gradient already carries its share of the
ensemble's log-odds (about 1/M each), so the sum, not the mean, is in log-odds units, and a region one member counts
for COVID-19 and another against is not shown as evidence. MONAI's ``GradCAM`` keeps the positive part of each layer's
map on its own and runs one forward and backward pass per layer, so it cannot give that sum; for one network
:func:`log_odds_cam` equals MONAI's raw map times the number of cells (``tests/models/test_grad_cam.py``).

The maps are on an absolute scale, but how strong a model's maps are depends on the model. So each slice model directory
records the top of its colour range once (:class:`CamScale`, ``cam_scale`` in ``config.yaml``): a high percentile of
its map values over the images it was validated on (:class:`CamScaleConfig`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covidctnet.core.errors import ConfigError, ModelDirError

__all__ = ["CAM_UNIT", "CamScaleConfig", "CamScale", "cam_layers", "log_odds_cam", "cam_maps", "cam_scale_of"]

CAM_UNIT = "log-odds of COVID-19 per region"
"""The unit of every Grad-CAM map and colour scale (see the module docstring)."""


@dataclass(frozen=True)
class CamScaleConfig:
    """How a slice model's Grad-CAM colour scale is set (defaults = ``configs/cam_scale.yaml``).

    Attributes:
        percentile: the top of the colour range is this percentile of the model's Grad-CAM values (every pixel of every
            map) over the images it was validated on; stronger regions get the top colour.
        show_from: the overlay colours a pixel only where the map is at least this fraction of the top; below it the
            CT slice is shown as it is.
    """

    percentile: float = 99.0
    show_from: float = 0.25

    def __post_init__(self) -> None:
        if not 50.0 <= self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in [50, 100], not {self.percentile}")
        if not 0.0 <= self.show_from < 1.0:
            raise ConfigError(f"show_from must be in [0, 1), not {self.show_from}")


@dataclass(frozen=True)
class CamScale:
    """A model's Grad-CAM colour scale: ``cam_scale`` in a slice model directory's ``config.yaml``.

    Attributes:
        value: top of the colour range, in :data:`CAM_UNIT` (> 0).
        percentile: which percentile of the map values ``value`` is.
        show_from: fraction of ``value`` from which the overlay colours a pixel.
        images: which images the maps were computed on (``out-of-fold``, ``validation split``, ``held-out fold``,
            ``this run``).
        data: the dataset's name and splits (no path), e.g. ``covid-ct-2d train+val``.
        n_images: how many images.
        unit: :data:`CAM_UNIT`.
    """

    value: float
    percentile: float
    show_from: float
    images: str
    data: str
    n_images: int
    unit: str = CAM_UNIT

    @property
    def floor(self) -> float:
        """The smallest map value the overlay colours: ``show_from * value``."""
        return self.show_from * self.value

    def to_dict(self) -> dict[str, Any]:
        """The ``cam_scale`` mapping of ``config.yaml`` (plain floats and ints)."""
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config.yaml") -> CamScale | None:
        """The recorded scale of a slice model's ``config.yaml`` mapping, or ``None`` where none is recorded.

        Raises:
            ModelDirError: ``cam_scale`` is there but malformed (missing keys, another unit, a top that is not > 0).
        """
        raw = config.get("cam_scale")
        if raw is None:
            return None
        keys = {"value", "percentile", "show_from", "images", "data", "n_images", "unit"}
        if not isinstance(raw, Mapping) or set(raw) != keys:
            raise ModelDirError(f"{source}: 'cam_scale' must be a mapping with the keys {sorted(keys)}, not {raw!r}")
        if raw["unit"] != CAM_UNIT:
            raise ModelDirError(f"{source}: cam_scale.unit must be {CAM_UNIT!r}, not {raw['unit']!r}")
        try:
            scale = cls(value=float(raw["value"]), percentile=float(raw["percentile"]),
                        show_from=float(raw["show_from"]), images=str(raw["images"]), data=str(raw["data"]),
                        n_images=int(raw["n_images"]))
            CamScaleConfig(scale.percentile, scale.show_from)
        except (TypeError, ValueError, ConfigError) as err:
            raise ModelDirError(f"{source}: cam_scale: {err}") from err
        if not (math.isfinite(scale.value) and scale.value > 0):
            raise ModelDirError(f"{source}: cam_scale.value must be a number > 0, not {raw['value']!r}")
        return scale

    def describe(self) -> str:
        """One phrase for a colour bar: where the top of the range comes from."""
        return f"{self.percentile:g}th pct over {self.n_images} images ({self.images})"


def cam_layers(model: nn.Module) -> list[nn.Module]:
    """The last feature layer of the network (``layer4`` of a ResNet, ``class_layers.relu`` of a DenseNet), or of
    every member of an ensemble."""
    members = getattr(model, "members", None)
    nets = list(members) if members is not None else [model]
    return [net.layer4 if hasattr(net, "layer4") else net.get_submodule("class_layers.relu") for net in nets]


def log_odds_cam(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Grad-CAM maps of the log-odds of COVID-19 for a batch of network inputs, in :data:`CAM_UNIT`.

    One forward and one backward pass for the whole batch and every member of an ensemble. The network is run in eval
    mode (so each image's gradient is its own) and left in the mode it was in.

    Args:
        model: a torch slice model (2 outputs) or :class:`~covidctnet.models.slice.SliceEnsemble`.
        x: (B, C, S, S) network input, on the model's device.

    Returns:
        (B, S, S) float32 maps >= 0: ReLU of the members' summed cell maps (each times its number of cells),
        bilinearly upsampled to the input (linear, so the scale survives it, as MONAI's default upsampler).
    """
    layers = cam_layers(model)
    acts: list[torch.Tensor | None] = [None] * len(layers)

    def keep(i: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            acts[i] = output
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # predict runs under no_grad; Grad-CAM needs the backward pass
            # a gradient path even where the weights are frozen; the input's own gradient is never used
            out = model(x.detach().requires_grad_(True)).float()
            # the images of a batch do not interact in eval mode, so the sum's gradient is each image's own
            grads = torch.autograd.grad((out[:, 1] - out[:, 0]).sum(), [a for a in acts if a is not None])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total = None
    for a, g in zip(acts, grads):
        assert a is not None
        n_cells = a.shape[-2] * a.shape[-1]
        cells = n_cells * (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True)  # (B, 1, h, w)
        total = cells if total is None else total + cells
    assert total is not None
    up = F.interpolate(F.relu(total.detach()), size=x.shape[2:], mode="bilinear", align_corners=False)
    return up[:, 0].float().cpu().numpy()


def cam_maps(model: nn.Module, inputs: Sequence[torch.Tensor], batch_size: int = 32) -> np.ndarray:
    """:func:`log_odds_cam` of a sequence of (C, S, S) network inputs, in batches; returns (N, S, S) float32."""
    device = next(model.parameters()).device
    maps = [log_odds_cam(model, torch.stack(list(inputs[i:i + batch_size])).to(device))
            for i in range(0, len(inputs), batch_size)]
    size = inputs[0].shape[-1] if len(inputs) else 0
    return np.concatenate(maps) if maps else np.zeros((0, size, size), np.float32)


def cam_scale_of(maps: np.ndarray | Sequence[np.ndarray], images: str, data: str,
                 cfg: CamScaleConfig | None = None) -> CamScale:
    """The colour scale from a model's maps: ``cfg.percentile`` of all their pixels.

    Args:
        maps: (N, S, S) maps of :func:`log_odds_cam`, or a sequence of such arrays (pooled).
        images: which images they are (``out-of-fold``, ``validation split`` …).
        data: the dataset's name and splits, without a path.
        cfg: percentile and ``show_from`` (default :class:`CamScaleConfig`).

    Raises:
        ConfigError: no maps, or maps that are zero at the percentile (nothing to scale by).
    """
    cfg = cfg or CamScaleConfig()
    arrays = [np.asarray(m, dtype=np.float32) for m in (maps if not isinstance(maps, np.ndarray) else [maps])]
    n = sum(len(a) for a in arrays)
    if n == 0:
        raise ConfigError("no Grad-CAM maps to calibrate the colour scale on")
    value = float(np.percentile(np.concatenate([a.ravel() for a in arrays]), cfg.percentile))
    if not value > 0:
        raise ConfigError(f"the {cfg.percentile:g}th percentile of the Grad-CAM maps of {n} images is {value}: the "
                          "model shows no evidence for COVID-19 on them, so there is no colour scale to set")
    return CamScale(value=value, percentile=cfg.percentile, show_from=cfg.show_from, images=images, data=data,
                    n_images=n)
