"""Pretrained starts from weights the user has: torchvision's ImageNet 2D nets and MedicalNet's 3D ResNets.

* **ImageNet** (``train-slice --init imagenet``): torchvision's ``IMAGENET1K_V1`` files of DenseNet-121/169 and
  ResNet-18/50 (the paper's slice baseline is an ImageNet DenseNet-169), looked up and downloaded in torchvision's own
  cache, ``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME/hub/checkpoints``), with
  ``torch.hub.load_state_dict_from_url``: a file another tool already downloaded is reused, and offline the error says
  which file to put where. torchvision itself is not needed (it does not install beside every torch build).
* **A state-dict file** (``train-slice --init FILE``): torchvision or timm key names (``.pth``/``.pt``/``.bin`` or
  ``.safetensors``; ``state_dict`` / ``model`` wrappers and DataParallel's ``module.`` prefix are taken off).
* **MedicalNet** (``train-classifier --init FILE``): Tencent MedicalNet's 3D ResNet-10/18/34/50 checkpoints
  (``{"state_dict": {"module.conv1.weight": …}}``), into MONAI's 3D ResNet built with MedicalNet's layout
  (:func:`medicalnet_resnet_kwargs`, from MONAI's ``get_medicalnet_pretrained_resnet_args``).

The networks are MONAI's. Their ResNet keys are torchvision's; their DenseNet dense layers nest their modules under
``layers.`` (``denselayer1.layers.norm1`` for torchvision's ``denselayer1.norm1``, or ``norm.1`` in torchvision's old
checkpoints: the mapping of MONAI's own ``densenet._load_state_dict``, which cannot be called on a local file and
silently skips what does not fit). A MONAI ResNet matches torchvision's only with a stride-2 stem and bias-free
shortcut convolutions (:data:`TORCHVISION_RESNET_KWARGS`).

The grey input: ImageNet stems take RGB. Their three kernels are summed into the one grey channel, which computes
exactly what the stem computes on the grey image repeated to RGB (timm's ``adapt_input_conv`` does the same for one
channel), so the slice data, its per-image z-score and ``predict-slice`` stay as they are. A second input channel
(the lung mask) starts at zero weights. The classification head (1000 ImageNet classes) is never loaded; the new
head starts at random. Every other tensor must be in the file with its shape: nothing is skipped silently.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from covidctnet.core.errors import CheckpointError, ConfigError, InputError
from covidctnet.core.files import sha256_file

__all__ = [
    "HEADS",
    "IMAGENET",
    "IMAGENET_URLS",
    "MEDICALNET_ARCHS",
    "TORCHVISION_RESNET_KWARGS",
    "imagenet_cache_dir",
    "imagenet_state_dict",
    "init_slice_model",
    "load_medicalnet_weights",
    "load_strict",
    "load_torchvision_weights",
    "medicalnet_resnet_kwargs",
    "read_state_dict",
    "torchvision_to_monai",
]

logger = logging.getLogger(__name__)

IMAGENET = "imagenet"
"""The ``--init`` value that asks for torchvision's ImageNet weights."""

IMAGENET_URLS: dict[str, str] = {
    # torchvision's IMAGENET1K_V1 weights (models/densenet.py, models/resnet.py); the 8 hex digits are the start of
    # the file's sha256, which load_state_dict_from_url checks after a download
    "densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",
    "densenet169": "https://download.pytorch.org/models/densenet169-b2777c0a.pth",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}

TORCHVISION_RESNET_KWARGS: dict[str, Any] = {"conv1_t_stride": 2, "bias_downsample": False}
"""MONAI ResNet arguments that give torchvision's ResNet: a stride-2 7×7 stem and shortcut convs without bias."""

MEDICALNET_ARCHS: tuple[str, ...] = ("resnet10", "resnet18", "resnet34", "resnet50")
"""3D ResNets with MedicalNet weights (Chen et al., "Med3D", arXiv:1904.00625; huggingface.co/TencentMedicalNet)."""

HEADS: tuple[str, ...] = ("fc.", "classifier.", "class_layers.out.", "conv_seg.")
"""Key prefixes of classification / segmentation heads (torchvision, timm, MONAI, MedicalNet): never loaded."""
# torchvision's old DenseNet checkpoints name dense-layer modules 'norm.1', its newer code and timm 'norm1'
_DENSE_LAYER = re.compile(r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(.+)$")


def imagenet_cache_dir() -> Path:
    """torchvision's download cache: ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_state_dict(arch: str) -> tuple[dict[str, torch.Tensor], Path]:
    """torchvision's ImageNet state dict of ``arch`` from its cache, downloaded there first if it is missing.

    Returns:
        ``(state_dict, path)`` with torchvision's key names.

    Raises:
        ConfigError: no ImageNet weights for this architecture.
        InputError: the file is not in the cache and cannot be downloaded (one line: what to download, where to).
        CheckpointError: the downloaded file fails its hash, or the cached file cannot be read.
    """
    if arch not in IMAGENET_URLS:
        raise ConfigError(f"no ImageNet weights for {arch!r}; torchvision's are used for {sorted(IMAGENET_URLS)}")
    url = IMAGENET_URLS[arch]
    cache = imagenet_cache_dir()
    path = cache / url.rsplit("/", 1)[1]
    if path.is_file():  # downloaded before, by covidctnet, torchvision or by hand
        return read_state_dict(path), path
    logger.info("downloading torchvision's ImageNet weights for %s to %s", arch, path)
    try:
        state = torch.hub.load_state_dict_from_url(url, model_dir=str(cache), map_location="cpu", check_hash=True,
                                                   weights_only=True)
    except (urllib.error.URLError, OSError) as err:  # offline, proxy, DNS, a read-only cache ...
        reason = getattr(err, "reason", err)
        raise InputError(f"ImageNet weights for {arch} not found: download {url} to {cache}/ ({reason})") from err
    except RuntimeError as err:  # the download fails its hash
        raise CheckpointError(f"{url}: the download is damaged ({err}); download it again to {cache}/") from err
    return _plain_state_dict(state, path), path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.pt``/``.bin`` (read with ``weights_only=True``) or ``.safetensors`` file.

    ``state_dict`` and ``model`` wrappers (training checkpoints of timm, MedicalNet) and DataParallel's ``module.``
    prefix are taken off.

    Raises:
        InputError: missing file.
        CheckpointError: unreadable, or not a mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for a bad file; say which file, in one line
        raise CheckpointError(f"{path}: cannot read weights ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:200]})") from err
    return _plain_state_dict(state, path)


def _plain_state_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def torchvision_to_monai(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision/timm DenseNet keys to MONAI's (``denselayerN.norm1`` or ``norm.1`` → ``layers.norm1``).

    ResNet keys are the same in both and pass unchanged.
    """
    out = {}
    for key, value in state.items():
        m = _DENSE_LAYER.match(key)
        out[f"{m[1]}.layers.{m[2]}{m[3]}.{m[4]}" if m else key] = value
    return out


def _first_conv(model: nn.Module) -> str:
    """Key of the stem convolution's weight (``conv1.weight`` in ResNets, ``features.conv0.weight`` in DenseNets)."""
    for key in ("conv1.weight", "features.conv0.weight"):
        if key in model.state_dict():
            return key
    raise ConfigError(f"{type(model).__name__}: no known stem convolution (conv1 or features.conv0)")


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                heads: tuple[str, ...] = HEADS) -> int:
    """Load every non-head tensor of ``model`` from ``state``, or raise one line naming what does not fit.

    Args:
        model: the network; its head keeps its weights.
        state: the weights, under the model's key names; head keys in it are ignored.
        source: the file, for messages.
        heads: key prefixes of the heads (default :data:`HEADS`).

    BatchNorm's ``num_batches_tracked`` may be absent (torchvision's older checkpoints predate it); the model's own
    value stays. Returns the number of tensors loaded.

    Raises:
        CheckpointError: a missing or unexpected key or another shape, the first three of each named.
    """
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(heads)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.startswith(heads)]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(items)} {what}: {', '.join(items[:3])}{' …' if len(items) > 3 else ''}"
                 for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                 if items]
        raise CheckpointError(f"{source}: weights do not fit {type(model).__name__} "
                              f"(another architecture, layout, width or input channels?): {'; '.join(parts)}")
    loaded = {k: state[k].to(own[k].dtype) for k in own if k in state}
    model.load_state_dict({**model.state_dict(), **loaded})
    return len(loaded)


def load_torchvision_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> int:
    """Load a torchvision/timm-style 2D state dict into a MONAI slice model, grey stem and new head.

    The stem's RGB kernels (out, 3, k, k) are summed into the model's first input channel; further channels (the lung
    mask) start at zero. A stem with as many channels as the model's is loaded as it is.

    Args:
        model: a slice network from :func:`covidctnet.models.slice.build_slice_model` (ResNets with
            ``layout="torchvision"``).
        state: the file's tensors, torchvision or timm key names.
        source: the file, for messages.

    Returns:
        The number of tensors loaded (all but the head).

    Raises:
        CheckpointError: a key missing or left over, or a shape that does not fit (first offenders named).
    """
    state = torchvision_to_monai(state)
    stem = _first_conv(model)
    own = model.state_dict()[stem]
    rgb = state.get(stem)
    same_kernels = rgb is not None and rgb.shape[:1] + rgb.shape[2:] == own.shape[:1] + own.shape[2:]
    if same_kernels and rgb.shape[1] == 3 != own.shape[1]:  # otherwise load_strict names the mismatch
        grey = torch.zeros_like(own)
        grey[:, :1] = rgb.sum(dim=1, keepdim=True)  # = the RGB stem on grey repeated to 3 channels
        state = {**state, stem: grey}
    return load_strict(model, state, source)


def init_slice_model(model: nn.Module, arch: str, init: str | os.PathLike) -> dict[str, Any]:
    """Start a slice model from ImageNet (``init == "imagenet"``) or from a torchvision/timm state-dict file.

    Returns:
        What to record in the model directory: ``{"source", "file", "sha256", "tensors", "stem"}``.

    Raises:
        InputError, CheckpointError, ConfigError: see :func:`imagenet_state_dict` and :func:`load_torchvision_weights`.
    """
    if str(init) == IMAGENET:
        state, path = imagenet_state_dict(arch)
        source = IMAGENET
    else:
        path = Path(init)
        state, source = read_state_dict(path), "file"
    n = load_torchvision_weights(model, state, str(path))
    logger.info("initialised %s from %s (%d tensors; stem summed over RGB into the grey channel)", arch, path, n)
    return {"source": source, "file": path.name, "sha256": sha256_file(path), "tensors": n,
            "stem": "RGB kernels summed into the grey channel; a lung-mask channel starts at zero"}


def medicalnet_resnet_kwargs(arch: str) -> dict[str, Any]:
    """MONAI 3D ResNet arguments of MedicalNet's layout (MONAI's ``get_medicalnet_pretrained_resnet_args``).

    MedicalNet's ResNet-18/34 use parameter-free shortcuts (type A), ResNet-10/50 1×1 convolutions without bias
    (type B); all have a stride-2 stem.

    Raises:
        ConfigError: not a MedicalNet architecture.
    """
    if arch not in MEDICALNET_ARCHS:
        raise ConfigError(f"MedicalNet weights are for the 3D ResNets {list(MEDICALNET_ARCHS)}, not {arch!r}")
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

    bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(int(arch.removeprefix("resnet")))
    return {"shortcut_type": shortcut_type, "bias_downsample": bias_downsample, "conv1_t_stride": 2}


def load_medicalnet_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a MedicalNet-style 3D ResNet checkpoint into ``model`` (built with :func:`medicalnet_resnet_kwargs`).

    The file's segmentation head (``conv_seg``) and the model's classification head (``fc``) are left out.

    Returns:
        What to record in the model directory: ``{"source", "file", "sha256", "tensors"}``.

    Raises:
        InputError, CheckpointError: missing or unreadable file, or weights of another depth or layout.
    """
    path = Path(path)
    n = load_strict(model, read_state_dict(path), str(path))
    logger.info("initialised the 3D ResNet from %s (%d tensors)", path, n)
    return {"source": "medicalnet", "file": path.name, "sha256": sha256_file(path), "tensors": n}
