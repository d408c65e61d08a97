"""One registry for every network: build it from a model directory's ``config.yaml`` and load its hash-checked
weights.

Each loader checks the architecture named in ``config.yaml``, rebuilds the network from its ``kwargs`` and names the
first mismatching keys and shapes when the weights do not fit (torch's own message starts with a bare "Error(s) in
loading state_dict"). The bundled models live under ``covidctnet/assets/``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidctnet.core.device import resolve_device
from covidctnet.core.errors import ConfigError, ModelDirError
from covidctnet.core.model_dir import ModelDir, load_model_dir
from covidctnet.models.bcdunet import DOWNSAMPLE_FACTOR, BCDUNet
from covidctnet.models.cnn3d import build_classifier
from covidctnet.models.slice import SliceEnsemble, build_slice_model

__all__ = [
    "ASSETS",
    "DEMO_MODEL",
    "DEFAULT_SLICE_MODEL",
    "DENOISER_COMPONENT",
    "Denoiser",
    "SliceNetwork",
    "build_denoiser",
    "resolve_denoiser_dir",
    "load_denoiser",
    "load_classifier",
    "load_slice_model",
    "state_dict_mismatch",
    "LESION_COMPONENT",
    "LesionModel",
    "build_lesion_model",
    "load_lesion_model",
]

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_MODEL = ASSETS / "demo_model"
DEFAULT_SLICE_MODEL = ASSETS / "slice_model"


def load_slice_model(model_dir: str | os.PathLike | None = None, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Load a slice model directory (default: the bundled model) into an eval-mode network.

    A directory whose ``model`` component has ``members: N`` holds an ensemble
    (:class:`~covidctnet.models.slice.SliceEnsemble`, made by ``covidctnet ensemble-slice``).

    Returns:
        ``(model, config)``; ``config`` is the directory's ``config.yaml`` (``preprocess``, ``threshold`` …).

    Raises:
        ModelDirError: not a slice model directory, missing bundled model, hash mismatch, or weights that do not fit.
    """
    path = Path(model_dir) if model_dir is not None else DEFAULT_SLICE_MODEL
    if model_dir is None and not path.is_dir():
        raise ModelDirError(f"{path}: no bundled slice model in this installation; pass --model MODEL_DIR")
    md = load_model_dir(path)
    if md.config.get("task") != "slice" or "model" not in md.config.get("components", {}):
        raise ModelDirError(f"{path}: not a slice model directory (task {md.config.get('task')!r}; expected 'slice' "
                            "with a 'model' component)")
    comp = md.component("model")
    n_members = comp.get("members")
    try:
        if n_members is None:
            model = build_slice_model(comp["arch"], **comp.get("kwargs", {}))
        else:
            model = SliceEnsemble([build_slice_model(comp["arch"], **comp.get("kwargs", {})) for _ in range(n_members)])
    except (ConfigError, TypeError) as err:
        raise ModelDirError(f"{path}: cannot build {comp.get('arch')!r} from config.yaml: {err}") from err
    _load_weights(model, md, "model", f"arch {comp['arch']!r} {comp.get('kwargs', {})}")
    model.eval().to(resolve_device(device))
    config = dict(md.config)
    config["weights_sha256"] = md.weights_sha256("model")
    return model, config


DENOISER_COMPONENT = "denoiser"
"""Component name of the denoiser weights in a model directory (``denoiser.safetensors``)."""


def build_denoiser(kwargs: Mapping[str, Any]) -> nn.Module:
    """A BCDU-Net from the ``kwargs`` of a model directory's ``components.denoiser``."""
    return BCDUNet.from_config(kwargs)


def state_dict_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor], limit: int = 3) -> str | None:
    """Describe in one line how ``state_dict`` fails to fit ``model`` (missing/unexpected keys, shapes), or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {what}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts) or None


def _load_weights(model: nn.Module, md: ModelDir, component: str, arch: str) -> None:
    """Load ``component``'s hash-checked weights into ``model`` (strict), or raise one line naming what does not fit.

    Raises:
        ModelDirError: missing or unexpected keys or other shapes (the first ones named: torch's own message starts
            with a bare "Error(s) in loading state_dict"), or another problem torch finds (e.g. dtypes).
    """
    state = md.state_dict(component)
    problem = state_dict_mismatch(model, state)
    if problem:
        raise ModelDirError(f"{md.path}: {component} weights do not fit {arch}: {problem}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelDirError(f"{md.path}: {component} weights do not fit {arch}: "
                            f"{' '.join(str(err).split())[:300]}") from err


def load_classifier(
    model_dir: str | os.PathLike | ModelDir,
    component: str = "classifier",
    device: str | torch.device | None = None,
) -> nn.Module:
    """Rebuild a model directory's classifier from its ``config.yaml`` and load its hash-checked weights.

    Args:
        model_dir: a model directory path, or an already loaded :class:`~covidctnet.core.model_dir.ModelDir`.
        component: the component name in ``config.yaml`` (``classifier``).
        device: where to put the model (``"auto"`` takes CUDA when present); None keeps it on the CPU.

    Returns:
        The network in eval mode; ``model.spec`` holds its arch and kwargs.

    Raises:
        ModelDirError: missing component, unknown architecture, hash mismatch, or weights of another architecture
            (the first mismatching keys and shapes are named).
    """
    md = model_dir if isinstance(model_dir, ModelDir) else load_model_dir(model_dir)
    entry = md.component(component)
    arch = entry.get("arch")
    kwargs = entry.get("kwargs") or {}
    if not isinstance(arch, str) or not isinstance(kwargs, dict):
        raise ModelDirError(f"{md.path}: components.{component} needs 'arch' (a name) and 'kwargs' (a mapping)")
    try:
        model = build_classifier(arch, **kwargs)
    except ConfigError as err:
        raise ModelDirError(f"{md.path}: components.{component}: {err}") from err
    _load_weights(model, md, component, f"arch {arch!r} {kwargs}")
    if device is not None:
        model = model.to(resolve_device(device) if isinstance(device, str) else device)
    logger.info("loaded %s classifier %s from %s", arch, md.weights_sha256(component)[:12], md.path)
    return model.eval()


@dataclass
class SliceNetwork:
    """A loaded slice-by-slice network of a model directory, in eval mode on ``device``.

    Attributes:
        model: the network (``(B, C, S, S)`` slices in).
        size_xy: the in-plane size ``S`` its input must have.
        path: the model directory.
        weights_sha256: hash of the component's weights file.
        device: where the model runs.
        preprocess: the preprocessing settings it was trained with (``config.yaml`` ``preprocess``; may be empty).
    """
    model: Any
    size_xy: int
    path: Path
    weights_sha256: str
    device: Any
    preprocess: dict[str, Any] = field(default_factory=dict)


@dataclass
class Denoiser(SliceNetwork):
    """A loaded denoiser: ``model`` is the BCDU-Net (``(B, 1, S, S)`` in [0, 1] → denoised slice);
    ``weights_sha256`` is that of ``denoiser.safetensors``."""


def resolve_denoiser_dir(path: str | os.PathLike) -> Path:
    """The model directory of ``path``: ``path`` itself, or ``path/model`` for a ``train-denoiser`` run folder.

    Raises:
        ModelDirError: neither is a model directory.
    """
    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "SHA256SUMS").is_file():
        return path
    if (path / "model" / "config.yaml").is_file():
        return path / "model"
    raise ModelDirError(f"{path}: not a model directory (config.yaml + SHA256SUMS) nor a train-denoiser run folder "
                        "with model/; train one with `covidctnet train-denoiser`")


def _load_slice_network(path: str | os.PathLike, component: str, arch: str,
                        build: Any) -> tuple[ModelDir, nn.Module, int, dict[str, Any]]:
    """A slice-by-slice network of a model directory (or a training run folder's ``model/``): its directory, the
    network with its hash-checked weights, its in-plane input size and the preprocessing it records.

    Raises:
        ModelDirError: missing directory or component, another architecture than ``arch``, weights that do not fit,
            no recorded input size, bad hash.
    """
    mdir = load_model_dir(resolve_denoiser_dir(path))
    comp = mdir.component(component)
    if comp.get("arch") != arch:
        raise ModelDirError(f"{mdir.path / 'config.yaml'}: {component} architecture {comp.get('arch')!r} is not "
                            f"supported; expected {arch!r}")
    try:
        model = build(comp.get("kwargs") or {})
    except ConfigError as err:
        raise ModelDirError(f"{mdir.path / 'config.yaml'}: {err}") from err
    _load_weights(model, mdir, component, f"the architecture in config.yaml ({comp.get('kwargs')})")
    preprocess = dict(mdir.config.get("preprocess") or {})
    size = (mdir.config.get("input") or {}).get("size_xy", preprocess.get("size_xy"))
    if isinstance(size, bool) or not isinstance(size, int):
        raise ModelDirError(f"{mdir.path / 'config.yaml'}: no input size (input.size_xy or preprocess.size_xy)")
    return mdir, model, size, preprocess


def load_denoiser(path: str | os.PathLike, device: str | Any = "auto") -> Denoiser:
    """Load the ``denoiser`` component of a model directory (hash-checked) into a BCDU-Net in eval mode.

    Args:
        path: model directory, or a ``train-denoiser`` run folder (its ``model/`` is used).
        device: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` or a ``torch.device``.

    Raises:
        ModelDirError: missing directory or component, unknown architecture, weights that do not fit, an input
            size that is not a multiple of 8, bad hash.
    """
    mdir, model, size, preprocess = _load_slice_network(path, DENOISER_COMPONENT, "bcdunet", build_denoiser)
    if size < DOWNSAMPLE_FACTOR or size % DOWNSAMPLE_FACTOR:
        # refuse at load time, naming the model: otherwise every study would fail inside the network instead
        raise ModelDirError(f"{mdir.path / 'config.yaml'}: denoiser input size {size} is not a multiple of "
                            f"{DOWNSAMPLE_FACTOR}, which the BCDU-Net needs (three 2x2 poolings)")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model.to(dev).eval()
    return Denoiser(model, size, mdir.path, mdir.weights_sha256(DENOISER_COMPONENT), dev, preprocess)


LESION_COMPONENT = "lesion"
"""Component name of the label-free lesion model in a model directory (``lesion.safetensors``)."""


def build_lesion_model(kwargs: Mapping[str, Any]) -> nn.Module:
    """A 2D MONAI ``UNet`` from the ``kwargs`` of a model directory's ``components.lesion``.

    Raises:
        ConfigError: arguments MONAI's ``UNet`` does not take.
    """
    from monai.networks.nets import UNet  # MONAI is imported where one of its networks is built (about 2 s)

    try:
        return UNet(spatial_dims=2, **dict(kwargs))
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"lesion model arguments {dict(kwargs)}: {err}") from err


@dataclass
class LesionModel(SliceNetwork):
    """A loaded lesion model: ``model`` is the 2D U-Net (``(B, 2, S, S)``: slice in [0, 1], lung mask →
    ``(B, 1, S, S)`` lesion logits); ``weights_sha256`` is that of ``lesion.safetensors``."""


def load_lesion_model(path: str | os.PathLike, device: str | Any = "auto") -> LesionModel:
    """Load the ``lesion`` component of a model directory (or of a ``train-lesion-model`` run folder's ``model/``).

    Raises:
        ModelDirError: no such directory or component, another architecture, weights that do not fit, bad hash.
    """
    mdir, model, size, preprocess = _load_slice_network(path, LESION_COMPONENT, "unet2d", build_lesion_model)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model.to(dev).eval()
    return LesionModel(model, size, mdir.path, mdir.weights_sha256(LESION_COMPONENT), dev, preprocess)
