"""The CovidCTNet 3D CNN that classifies residual volumes into control / COVID-19 / CAP, and a classifier factory.

The official network (Javaheri et al., "CovidCTNet: an open-source deep learning approach to diagnose covid-19 using
small cohort of CT images", npj Digit. Med. 4, 29 (2021); Keras code in mohofar/CovidCtNet,
``Codes/training and testing/Training-CovidCTNet.ipynb``) is a plain VGG-like stack: five blocks of two 3×3×3 Conv3D
layers with ReLU (8, 16, 32, 64, 128 filters; the very first convolution is 'valid', all others 'same'), each block
followed by a 2×2×2 max-pool, then Flatten → Dense 32 → ReLU → Dropout 0.3 → Dense 3 (softmax in Keras). At the
official input of 50×128×128 it has 920,715 parameters.

Flatten order: this port flattens in PyTorch's channels-first order ``(c, d, h, w)``. Keras flattens channels-last
``(d, h, w, c)``; :func:`covidctnet.models.keras_import.cnn3d_state_dict_from_keras` permutes the rows of the first
Dense kernel instead, so the imported model computes exactly what the Keras model computes.

:func:`build_classifier` also offers MONAI 3D DenseNets and ResNets; :func:`covidctnet.models.registry.load_classifier`
rebuilds any of them from a model directory and loads its hash-checked weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from covidctnet.core.errors import ConfigError, ShapeError
from covidctnet.core.files import to_jsonable
from covidctnet.preprocessing.preprocess import ras_to_official_layout

__all__ = [
    "CovidCTNet3D",
    "CLASSIFIER_ARCHS",
    "build_classifier",
    "predict_proba",
    "residual_to_network_input",
]

logger = logging.getLogger(__name__)

OFFICIAL_INPUT_SIZE: tuple[int, int, int] = (50, 128, 128)
"""(depth, height, width) of the residual volumes the official Keras CNN was trained on."""


def _pooled_size(size: int, n_blocks: int, first_valid: bool) -> int:
    """Spatial size after ``n_blocks`` blocks: the first conv trims 2 voxels if 'valid', each pool floors size / 2."""
    if first_valid:
        size -= 2
    for _ in range(n_blocks):
        size //= 2  # MaxPool3d(2) with floor, as Keras MaxPooling3D(padding='valid')
    return size


class _ConvBlock(nn.Sequential):
    """Conv3d → ReLU → Conv3d → ReLU → MaxPool3d(2). ``first_padding`` 0 is Keras 'valid', 1 is 'same' for 3×3×3."""

    def __init__(self, in_channels: int, out_channels: int, first_padding: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=first_padding)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.act2 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool3d(kernel_size=2, stride=2)  # floor mode, like Keras MaxPooling3D default


class CovidCTNet3D(nn.Module):
    """The official CovidCTNet 3D CNN (Javaheri et al., npj Digit. Med. 2021), input size configurable.

    Args:
        in_channels: channels of the input volume (1: the BCDU-Net residual).
        num_classes: output classes; 3 = (control, covid, cap) as in the official model.
        input_size: (depth, height, width) in voxels the model is built for; it fixes the size of the first Dense
            layer. Official: (50, 128, 128); this project's default grid: (50, 240, 240). Every dimension must be at
            least 34 (one valid conv and five 2× pools must leave ≥ 1 voxel).
        filters: output channels of the five conv blocks.
        hidden_features: width of the hidden Dense layer.
        dropout: dropout probability before the output layer.

    Examples:
        >>> net = CovidCTNet3D(input_size=(50, 128, 128))
        >>> sum(p.numel() for p in net.parameters())
        920715
        >>> net(torch.zeros(2, 1, 50, 128, 128)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        input_size: Sequence[int] = (50, 240, 240),
        filters: Sequence[int] = (8, 16, 32, 64, 128),
        hidden_features: int = 32,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        input_size = tuple(int(s) for s in input_size)
        filters = tuple(int(f) for f in filters)
        if len(input_size) != 3:
            raise ConfigError(f"input_size must be (depth, height, width), not {input_size}")
        if not filters or any(f < 1 for f in filters):
            raise ConfigError(f"filters must be a non-empty list of positive integers, not {filters}")
        if in_channels < 1 or num_classes < 1 or hidden_features < 1:
            raise ConfigError(
                f"in_channels, num_classes and hidden_features must be ≥ 1, not {in_channels}, {num_classes}, "
                f"{hidden_features}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), not {dropout}")
        out_size = tuple(_pooled_size(s, len(filters), first_valid=True) for s in input_size)
        if min(out_size) < 1:
            min_size = 2 ** len(filters) + 2
            raise ConfigError(
                f"input_size {input_size} is too small for {len(filters)} conv blocks: every dimension must be "
                f"≥ {min_size} voxels"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.filters: tuple[int, ...] = filters
        self.hidden_features = hidden_features
        self.dropout = float(dropout)
        self.input_size: tuple[int, int, int] = input_size  # type: ignore[assignment]
        self.feature_size: tuple[int, int, int] = out_size  # type: ignore[assignment]

        blocks = []
        c_in = in_channels
        for i, c_out in enumerate(filters):
            blocks.append(_ConvBlock(c_in, c_out, first_padding=0 if i == 0 else 1))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        n_flat = c_in * out_size[0] * out_size[1] * out_size[2]
        self.head = nn.Sequential()
        self.head.add_module("flatten", nn.Flatten(1))  # (c, d, h, w) order; see the module docstring
        self.head.add_module("fc", nn.Linear(n_flat, hidden_features))
        self.head.add_module("act", nn.ReLU(inplace=True))
        self.head.add_module("dropout", nn.Dropout(dropout))
        self.head.add_module("out", nn.Linear(hidden_features, num_classes))
        logger.debug("CovidCTNet3D: input %s, features %s x %s, flatten %d", input_size, c_in, out_size, n_flat)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras' initialisers of the official model: He-uniform kernels for the convs and the hidden Dense layer
        (``kernel_initializer='he_uniform'``), Glorot-uniform for the output layer (Keras default), zero biases.

        PyTorch's default (Kaiming-uniform with a=√5) shrinks activations through the ten ReLU convs, so the logits
        start almost constant and training stalls at first."""
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                if m is self.head.out:
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")  # bound √(6 / fan_in), as Keras
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of residual volumes.

        Args:
            x: (B, C, D, H, W) float, D = slices (axial), H = image rows, W = image columns, with
                (D, H, W) == ``input_size`` (the axis order of the official ``(N, 50, 128, 128)`` arrays).

        Returns:
            (B, num_classes) logits; apply softmax (or :func:`predict_proba`) for probabilities.

        Raises:
            ShapeError: the input is not 5-D with ``in_channels`` channels and spatial size ``input_size``.
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.input_size:
            raise ShapeError(
                f"CovidCTNet3D expects (B, {self.in_channels}, D, H, W) with (D, H, W) = {self.input_size}, "
                f"got {tuple(x.shape)}; resample the residual volumes to the model's input_size"
            )
        return self.head(self.features(x))


def _check_densenet_size(arch: str, input_size: Sequence[int] | None) -> None:
    """MONAI's 3D DenseNet shrinks by 4 in its stem and needs ≥ 2 voxels before each of its 3 avg-pool transitions."""
    if input_size is None:
        return
    for s in input_size:
        s = (s - 1) // 2 + 1  # stem conv 7, stride 2, padding 3
        s = (s - 1) // 2 + 1  # max-pool 3, stride 2, padding 1
        ok = s >= 8  # three AvgPool3d(2) transitions each need ≥ 2 voxels
        if not ok:
            raise ConfigError(
                f"{arch} cannot take input_size {tuple(input_size)}: every dimension must be ≥ 29 voxels "
                "(its stem and three transitions downsample by 32)"
            )


def _build_densenet(name: str) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, input_size: Sequence[int] | None, **kwargs: Any) -> nn.Module:
        _check_densenet_size(name, input_size)
        if kwargs.get("pretrained"):
            raise ConfigError(f"{name}: pretrained=True downloads 2D ImageNet weights; not supported for 3D volumes")
        # here, not at the top: MONAI takes about 2 s to import, and predict builds no MONAI net
        from monai.networks import nets

        return getattr(nets, name.replace("densenet", "DenseNet"))(
            spatial_dims=3, in_channels=in_channels, out_channels=num_classes, **kwargs
        )

    return build


def _build_resnet(name: str) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, input_size: Sequence[int] | None, **kwargs: Any) -> nn.Module:
        if kwargs.get("pretrained"):
            raise ConfigError(f"{name}: pretrained=True downloads weights; not supported (runs must work offline)")
        from monai.networks import nets

        return getattr(nets, name)(spatial_dims=3, n_input_channels=in_channels, num_classes=num_classes, **kwargs)

    return build


def _build_covidctnet3d(
    in_channels: int, num_classes: int, input_size: Sequence[int] | None, **kwargs: Any
) -> nn.Module:
    if input_size is None:
        input_size = (50, 240, 240)
    return CovidCTNet3D(in_channels=in_channels, num_classes=num_classes, input_size=input_size, **kwargs)


CLASSIFIER_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "covidctnet3d": _build_covidctnet3d,
    **{n: _build_densenet(n) for n in ("densenet121", "densenet169", "densenet201")},
    **{n: _build_resnet(n) for n in ("resnet10", "resnet18", "resnet34", "resnet50")},
}
"""Architecture name → builder. ``covidctnet3d`` is the official CNN; the others are MONAI 3D networks."""


def build_classifier(
    arch: str,
    in_channels: int = 1,
    num_classes: int = 3,
    input_size: Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a 3D classifier of residual volumes by name.

    The returned module carries ``model.spec = {"arch": arch, "kwargs": {...}}`` — exactly the entry a model
    directory's ``config.yaml`` stores under ``components.classifier`` (without ``weights``), so
    ``build_classifier(spec["arch"], **spec["kwargs"])`` rebuilds the same network.

    Args:
        arch: one of :data:`CLASSIFIER_ARCHS` (``covidctnet3d``, ``densenet121``, ``resnet18`` …).
        in_channels: input channels (1 for a residual volume).
        num_classes: output classes (3: control, covid, cap).
        input_size: (depth, height, width) in voxels. Required by ``covidctnet3d`` (it fixes the Dense layer;
            default (50, 240, 240)); for the MONAI nets (global pooling) it is only checked against their minimum
            size and recorded.
        kwargs: other constructor arguments of the architecture (e.g. ``filters``, ``dropout`` for covidctnet3d;
            ``dropout_prob`` for MONAI DenseNets; ``widen_factor`` for MONAI ResNets).

    Returns:
        The network, producing (B, num_classes) logits from (B, in_channels, D, H, W).

    Raises:
        ConfigError: unknown architecture (the valid ones are listed) or arguments it does not accept.
    """
    if arch not in CLASSIFIER_ARCHS:
        raise ConfigError(f"unknown classifier arch {arch!r}; valid: {sorted(CLASSIFIER_ARCHS)}")
    if input_size is not None:
        input_size = tuple(int(s) for s in input_size)
        if len(input_size) != 3 or min(input_size) < 1:
            raise ConfigError(f"input_size must be (depth, height, width) of positive ints, not {input_size}")
    try:
        model = CLASSIFIER_ARCHS[arch](in_channels, num_classes, input_size, **kwargs)
    except TypeError as err:  # an unexpected keyword: name it instead of a constructor traceback
        raise ConfigError(f"classifier arch {arch!r}: {err}") from err
    if arch == "covidctnet3d":
        assert isinstance(model, CovidCTNet3D)
        resolved = {
            "in_channels": model.in_channels,
            "num_classes": model.num_classes,
            "input_size": model.input_size,
            "filters": model.filters,
            "hidden_features": model.hidden_features,
            "dropout": model.dropout,
        }
    else:
        resolved = {"in_channels": in_channels, "num_classes": num_classes, "input_size": input_size, **kwargs}
        if input_size is None:
            resolved.pop("input_size")
    setattr(model, "spec", {"arch": arch, "kwargs": to_jsonable(resolved)})  # noqa: B010 (nn.Module typing)
    return model


def residual_to_network_input(array: np.ndarray) -> torch.Tensor:
    """Residual NIfTI array → the classifier's input tensor: the one conversion training and prediction share.

    The layout is the official CovidCTNet one (:func:`covidctnet.preprocessing.preprocess.ras_to_official_layout`):
    an axial slice as a radiologist views it, and as the official code stacked its pydicom slices. It matters for
    imported official weights: the Dense layer after Flatten is position dependent, so a transposed or flipped volume
    is a different input.

    Args:
        array: (X, Y, Z) = (size_xy, size_xy, depth) residual (or lesion map) in RAS+ orientation, as ``covidctnet
            residuals`` writes it (axis 2 = axial slices), any float dtype.

    Returns:
        (1, D, H, W) float32 contiguous tensor: D = slices inferior → superior, H = rows anterior → posterior,
        W = columns patient-right → patient-left. Intensities are left as they are (signed residuals; no
        normalisation, as in the official code).

    Raises:
        ShapeError: ``array`` is not 3-D.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ShapeError(f"a residual volume must be 3-D (X, Y, Z), not shape {array.shape}")
    return torch.from_numpy(ras_to_official_layout(array.astype(np.float32, copy=False)))[None]


@torch.no_grad()
def predict_proba(model: nn.Module, volumes: torch.Tensor) -> torch.Tensor:
    """Class probabilities (softmax of the logits) of a batch, without gradients.

    The caller sets the mode (``model.eval()`` for inference: dropout off); :func:`load_classifier` returns eval mode.

    Args:
        model: a classifier from :func:`build_classifier` / :func:`load_classifier`, or a module without parameters
            that returns the same logits (the onnxruntime and OpenVINO modules of
            :mod:`covidctnet.inference.backends`, which run on the CPU).
        volumes: (B, C, D, H, W) residual volumes; moved to the model's device.

    Returns:
        (B, num_classes) float32 probabilities on the CPU, rows summing to 1, columns in ``CLASS_NAMES`` order.
    """
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    logits = model(volumes.to(device=device, dtype=torch.float32))
    return torch.softmax(logits.float(), dim=1).cpu()
