"""The 2D slice classifier: a small factory over MONAI's 2D DenseNet and ResNet.

The paper's baseline for the UCSD COVID-CT slices is an ImageNet-pretrained DenseNet-169. A network starts from random
weights, from an encoder pretrained with ``covidctnet pretrain-slice`` (contrastive, on the training images), or from
torchvision's ImageNet weights or a torchvision/timm state dict (:mod:`covidctnet.models.pretrained`; ResNets then
take torchvision's layout, ``layout="torchvision"``). The input has 1 channel (the grey-scale slice) or 2 (slice +
classical lung mask); the output is 2 logits, index 1 = COVID-19.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from covidctnet.core.errors import ConfigError
from covidctnet.models.pretrained import TORCHVISION_RESNET_KWARGS, load_strict

__all__ = [
    "LAYOUTS",
    "SLICE_ARCHS",
    "SliceEnsemble",
    "build_slice_model",
    "encoder_state_dict",
    "feature_dim",
    "head_name",
    "load_encoder_state_dict",
    "replace_head",
]

logger = logging.getLogger(__name__)

SLICE_ARCHS: tuple[str, ...] = ("densenet121", "densenet169", "resnet18", "resnet50")
LAYOUTS: tuple[str, ...] = ("monai", "torchvision")


def build_slice_model(
    arch: str = "resnet18",
    in_channels: int = 1,
    num_classes: int = 2,
    width: float = 1.0,
    dropout: float = 0.0,
    pretrained: bool = False,
    layout: str = "monai",
) -> nn.Module:
    """Build a MONAI 2D classifier.

    Args:
        arch: one of :data:`SLICE_ARCHS`.
        in_channels: 1 (slice) or 2 (slice + lung mask).
        num_classes: number of logits (2: non-COVID, COVID).
        width: channel multiplier of the ResNets (MONAI ``widen_factor``; 0.5 halves every layer, about 4× fewer
            FLOPs, for CPU training). DenseNets take only 1.0.
        dropout: dropout before the DenseNet classifier (``dropout_prob``); ResNets take only 0.0.
        pretrained: refused: ImageNet weights are loaded by ``train-slice --init imagenet``
            (:func:`covidctnet.models.pretrained.init_slice_model`), which checks every tensor.
        layout: ``monai`` (MONAI's defaults: ResNets with a stride-1 stem and biased shortcut convs, as every model
            trained before) or ``torchvision`` (ResNets with torchvision's stride-2 stem and bias-free shortcuts,
            which torchvision/timm weights need; 4× fewer FLOPs after the stem). DenseNets are the same in both.

    Returns:
        the network; ``forward`` takes (B, in_channels, H, W) float and returns (B, num_classes) logits.

    Raises:
        ConfigError: unknown architecture or an unsupported combination.

    Examples:
        >>> model = build_slice_model("resnet18", in_channels=2, width=0.5)
        >>> model(torch.zeros(1, 2, 128, 128)).shape
        torch.Size([1, 2])
    """
    if arch not in SLICE_ARCHS:
        raise ConfigError(f"arch must be one of {list(SLICE_ARCHS)}, not {arch!r}")
    if pretrained:
        raise ConfigError(f"{arch}: pretrained=True is not how ImageNet weights are loaded; use "
                          "'train-slice --init imagenet'")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {list(LAYOUTS)}, not {layout!r}")
    if in_channels not in (1, 2):
        raise ConfigError(f"in_channels must be 1 (slice) or 2 (slice + lung mask), not {in_channels}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, not {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), not {dropout}")
    # here, not at the top: MONAI takes about 2 s to import, and predict builds no MONAI net
    from monai.networks import nets

    if arch.startswith("densenet"):
        if width != 1.0:
            raise ConfigError(f"{arch}: width {width} is for the ResNets only; DenseNets take width 1.0")
        cls = {"densenet121": nets.DenseNet121, "densenet169": nets.DenseNet169}[arch]
        return cls(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, dropout_prob=dropout)
    if dropout != 0.0:
        raise ConfigError(f"{arch}: dropout is for the DenseNets only; ResNets take dropout 0.0")
    if not 0.125 <= width <= 2.0:
        raise ConfigError(f"{arch}: width must be in [0.125, 2], not {width}")
    factory = {"resnet18": nets.resnet18, "resnet50": nets.resnet50}[arch]
    extra = TORCHVISION_RESNET_KWARGS if layout == "torchvision" else {}
    return factory(spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes, widen_factor=width, **extra)


def head_name(model: nn.Module) -> str:
    """Dotted name of the final linear layer (``fc`` for MONAI ResNets, ``class_layers.out`` for DenseNets)."""
    if isinstance(getattr(model, "fc", None), (nn.Linear, nn.Identity)):
        return "fc"
    layers = getattr(model, "class_layers", None)
    if layers is not None and isinstance(getattr(layers, "out", None), (nn.Linear, nn.Identity)):
        return "class_layers.out"
    raise ConfigError(f"{type(model).__name__}: no known classification head (expected .fc or .class_layers.out)")


def _get(model: nn.Module, dotted: str) -> nn.Module:
    mod = model
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled features that enter the classification head."""
    head = _get(model, head_name(model))
    if not isinstance(head, nn.Linear):
        raise ConfigError("the head was already replaced; feature_dim needs the original linear head")
    return head.in_features


def replace_head(model: nn.Module, new: nn.Module) -> nn.Module:
    """Swap the classification head for ``new`` (e.g. ``nn.Identity()`` to get (B, feature_dim) features)."""
    name = head_name(model)
    parent_name, _, attr = name.rpartition(".")
    setattr(_get(model, parent_name) if parent_name else model, attr, new)
    return model


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight except the classification head: what a pretrained encoder hands to ``train-slice --init``."""
    prefix = head_name(model) + "."
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}


def load_encoder_state_dict(model: nn.Module, state: Mapping[str, Any], source: str = "encoder") -> None:
    """Load encoder weights into ``model``, leaving its (fresh) head as is.

    Raises:
        CheckpointError: a missing or unexpected key or a shape mismatch (another architecture, width or channel
            count), naming the first few offenders.
    """
    load_strict(model, state, source, heads=(head_name(model) + ".",))


class SliceEnsemble(nn.Module):
    """Several slice classifiers of one architecture whose class probabilities are averaged.

    ``forward`` returns the log of the mean probability, so it stands wherever logits are expected: ``softmax`` of
    the output is exactly the members' mean softmax (the averaging MONAI's ``MeanEnsemble`` does on outputs, here
    inside one module, so a model directory, ONNX export and Grad-CAM treat an ensemble like one network).

    Args:
        members: the networks (eval mode is set on the ensemble as a whole).
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ConfigError(f"an ensemble needs at least 2 members, not {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, num_classes) log mean probability."""
        probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(dim=0)
        return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
