"""Import official Keras (h5) weights into our PyTorch models.

Keras stores channels-last kernels: Conv2D (kh, kw, in, out), Conv3D (kd, kh, kw, in, out), Conv2DTranspose
(kh, kw, out, in), Dense (in, out). Each converter below maps one Keras model onto its PyTorch port and is tested for
numeric parity against a reference forward pass. h5py is an optional dependency (``pip install covidctnet[keras]``).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from covidctnet.core.checkpoint import load_checkpoint
from covidctnet.core.config import config_to_dict, validate_config
from covidctnet.core.errors import CheckpointError, ConfigError, ModelDirError
from covidctnet.core.files import sha256_file
from covidctnet.core.labels import CLASS_NAMES
from covidctnet.core.model_dir import CONFIG_NAME, SUMS_NAME, load_model_dir, save_model_dir
from covidctnet.models.bcdunet import BCDUNet
from covidctnet.models.cnn3d import CovidCTNet3D, build_classifier
from covidctnet.models.convlstm import ConvLSTM2D
from covidctnet.models.registry import state_dict_mismatch
from covidctnet.preprocessing.preprocess import OFFICIAL_PROFILE, PreprocessConfig

__all__ = [
    "read_keras_h5",
    "bcdunet_state_dict_from_keras",
    "bcdunet_config_from_keras",
    "bcdunet_from_keras",
    "cnn3d_state_dict_from_keras",
    "import_keras_model",
]


def read_keras_h5(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Read a Keras ``save_weights`` h5 file into ``{layer name: [weight arrays in Keras order]}``.

    Layers are in the file's ``layer_names`` order; layers without weights map to an empty list.

    Raises:
        CheckpointError: h5py missing, or the file is not a Keras weights file.
    """
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - depends on the install
        raise CheckpointError("reading Keras weights needs h5py: pip install 'covidctnet[keras]'") from err
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in root.attrs:
                raise CheckpointError(f"{path}: not a Keras weights file (no 'layer_names' attribute)")
            out: dict[str, list[np.ndarray]] = {}
            for raw in root.attrs["layer_names"]:
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                group = root[name]
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
                out[name] = [np.asarray(group[n]) for n in names]
            return out
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read HDF5 file: {err}") from err


# --- BCDU-Net (the denoiser) -------------------------------------------------------------------------------------

_BCDUNET_KINDS = ("conv", "conv_transpose", "batchnorm", "convlstm")


def _as_keras_weights(path_or_weights: Any) -> dict[str, list[np.ndarray]]:
    if isinstance(path_or_weights, (str, os.PathLike)):
        return read_keras_h5(path_or_weights)
    return {str(k): [np.asarray(a) for a in v] for k, v in path_or_weights.items()}


def _keras_bcdunet_layers(weights: Mapping[str, Sequence[np.ndarray]]) -> dict[str, list[tuple[str, list[np.ndarray]]]]:
    """Group the weighted Keras layers of a BCDU-Net by kind, each list in file (topological) order.

    Kinds are told apart by their weights, not by their numbered names: ConvLSTM2D has 3 arrays (kernel, recurrent
    kernel, bias), BatchNormalization 4 vectors, Conv2D / Conv2DTranspose a 4-D kernel and a bias (a transposed conv
    has ``transpose`` in its name or, failing that, a 2×2 kernel, which no BCDU-Net Conv2D has).
    """
    kinds: dict[str, list[tuple[str, list[np.ndarray]]]] = {k: [] for k in _BCDUNET_KINDS}
    for name, arrays in weights.items():
        arrays = list(arrays)
        if not arrays:
            continue
        ndims = [a.ndim for a in arrays]
        if ndims == [4, 4, 1]:
            kinds["convlstm"].append((name, arrays))
        elif ndims == [1, 1, 1, 1]:
            kinds["batchnorm"].append((name, arrays))
        elif ndims == [4, 1]:
            transpose = "transpose" in name.lower() or tuple(arrays[0].shape[:2]) == (2, 2)
            kinds["conv_transpose" if transpose else "conv"].append((name, arrays))
        else:
            raise CheckpointError(
                f"not a BCDU-Net: Keras layer {name!r} has weights of shapes {[a.shape for a in arrays]}"
            )
    return kinds


def _torch_bcdunet_layers(model: Any) -> dict[str, list[tuple[str, Any]]]:
    """The BCDUNet's layers by kind, in registration order (the order of the Keras graph)."""
    kinds: dict[str, list[tuple[str, Any]]] = {k: [] for k in _BCDUNET_KINDS}
    lstm_prefixes: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in lstm_prefixes):
            continue
        if isinstance(m, ConvLSTM2D):
            lstm_prefixes.append(name)
            kinds["convlstm"].append((name, m))
        elif isinstance(m, nn.ConvTranspose2d):
            kinds["conv_transpose"].append((name, m))
        elif isinstance(m, nn.Conv2d):
            kinds["conv"].append((name, m))
        elif isinstance(m, nn.BatchNorm2d):
            kinds["batchnorm"].append((name, m))
    return kinds


def _kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Keras (kh, kw, a, b) → torch (b, a, kh, kw): Conv2D (kh, kw, in, out) → (out, in, kh, kw), and
    Conv2DTranspose (kh, kw, out, in) → ConvTranspose2d (in, out, kh, kw). No flip is needed for either."""
    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def bcdunet_state_dict_from_keras(path_or_weights: Any, model: Any) -> dict[str, Any]:
    """Convert Keras BCDU-Net weights into a ``state_dict`` for a :class:`~covidctnet.models.bcdunet.BCDUNet`.

    Layers are matched by kind and order (Conv2D, Conv2DTranspose, BatchNormalization and ConvLSTM2D each in graph
    order), so the Keras layer-name numbering does not matter. Kernels are transposed from channels-last; batch-norm
    gamma, beta, moving mean and variance map to weight, bias, running_mean and running_var, and every batch-norm
    layer of ``model`` gets Keras' epsilon (1e-3).

    Args:
        path_or_weights: a Keras ``save_weights``/``save`` ``.h5`` file, or ``{layer name: [arrays]}`` as returned by
            :func:`read_keras_h5` (in the file's layer order).
        model: the ``BCDUNet`` to fill; it must have the Keras model's configuration (Keras models are
            ``bidirectional=False``). The model itself is not modified apart from the batch-norm epsilon.

    Returns:
        A complete state dict (CPU tensors, the model's dtype) for ``model.load_state_dict(..., strict=True)``.

    Raises:
        CheckpointError: the file is not a BCDU-Net of this configuration (layer counts or shapes differ).
    """
    keras = _keras_bcdunet_layers(_as_keras_weights(path_or_weights))
    ours = _torch_bcdunet_layers(model)
    counts_k = {k: len(v) for k, v in keras.items()}
    counts_t = {k: len(v) for k, v in ours.items()}
    if counts_k != counts_t:
        raise CheckpointError(
            f"Keras weights have {counts_k} layers, the model {counts_t} "
            f"(model config {getattr(model, 'config', '?')}); build the model with the Keras configuration, "
            "e.g. with bcdunet_from_keras()"
        )
    for _, lstm in ours["convlstm"]:
        if lstm.bidirectional:
            raise CheckpointError("Keras BCDU-Net weights need bidirectional=False (Keras' ConvLSTM2D reads one way)")
        if not lstm.go_backwards:
            logging.getLogger(__name__).warning(
                "loading Keras BCDU-Net weights into a ConvLSTM with go_backwards=False; outputs will differ"
            )
        if lstm.cell.recurrent_activation != "hard_sigmoid":
            logging.getLogger(__name__).warning(
                "Keras 2 ConvLSTM2D uses recurrent_activation='hard_sigmoid'; the model uses %r",
                lstm.cell.recurrent_activation,
            )

    reference = model.state_dict()
    out = {k: v.detach().clone() for k, v in reference.items()}

    def put(key: str, array: np.ndarray, keras_name: str) -> None:
        target = reference[key]
        if tuple(array.shape) != tuple(target.shape):
            raise CheckpointError(
                f"Keras layer {keras_name!r} gives {key} the shape {tuple(array.shape)}, the model expects "
                f"{tuple(target.shape)} (model config {getattr(model, 'config', '?')})"
            )
        out[key] = torch.from_numpy(np.array(array, copy=True)).to(dtype=target.dtype)

    convs = zip(keras["conv"] + keras["conv_transpose"], ours["conv"] + ours["conv_transpose"])
    for (kname, arrays), (tname, _) in convs:
        put(f"{tname}.weight", _kernel_to_torch(arrays[0]), kname)
        put(f"{tname}.bias", arrays[1], kname)
    for (kname, arrays), (tname, bn) in zip(keras["batchnorm"], ours["batchnorm"]):
        for suffix, array in zip(("weight", "bias", "running_mean", "running_var"), arrays):
            put(f"{tname}.{suffix}", array, kname)
        bn.eps = 1e-3
    for (kname, arrays), (tname, _) in zip(keras["convlstm"], ours["convlstm"]):
        put(f"{tname}.cell.input_conv.weight", _kernel_to_torch(arrays[0]), kname)
        put(f"{tname}.cell.recurrent_conv.weight", _kernel_to_torch(arrays[1]), kname)
        put(f"{tname}.cell.input_conv.bias", arrays[2], kname)
    return out


def bcdunet_config_from_keras(path_or_weights: Any) -> dict[str, Any]:
    """Infer the :class:`~covidctnet.models.bcdunet.BCDUNet` keyword arguments of a Keras BCDU-Net from its weights.

    Reads the input channels and base width from the first Conv2D, the output and head channels from the last, and
    D1/D3 from the number of Conv2D layers (14 outside the bottleneck, 2 per bottleneck block).

    Raises:
        CheckpointError: the weights do not look like a BCDU-Net.
    """
    keras = _keras_bcdunet_layers(_as_keras_weights(path_or_weights))
    convs = keras["conv"]
    n_bottleneck = len(convs) - 14
    if len(convs) < 16 or n_bottleneck % 2 or n_bottleneck // 2 not in (1, 3) or len(keras["convlstm"]) != 3:
        raise CheckpointError(
            f"not a BCDU-Net: {len(convs)} Conv2D and {len(keras['convlstm'])} ConvLSTM2D layers "
            "(expected 16 or 20 Conv2D and 3 ConvLSTM2D)"
        )
    first = convs[0][1][0]  # (3, 3, in, f)
    last = convs[-1][1][0]  # (1, 1, head, out)
    return {
        "in_channels": int(first.shape[2]),
        "out_channels": int(last.shape[3]),
        "features": int(first.shape[3]),
        "dense_blocks": n_bottleneck // 2,
        "bidirectional": False,
        "recurrent_activation": "hard_sigmoid",
        "head_channels": int(last.shape[2]),
    }


def bcdunet_from_keras(path_or_weights: Any) -> Any:
    """Build a :class:`~covidctnet.models.bcdunet.BCDUNet` with the Keras model's configuration and load its weights.

    Returns:
        The model in eval mode (batch norm uses the Keras moving statistics, dropout is off).

    Example:
        >>> net = bcdunet_from_keras("weight_bcdunet_v2.hdf5")  # doctest: +SKIP
        >>> net.config["features"], net.config["dense_blocks"]  # doctest: +SKIP
        (32, 3)
    """
    weights = _as_keras_weights(path_or_weights)
    model = BCDUNet(**bcdunet_config_from_keras(weights))
    model.load_state_dict(bcdunet_state_dict_from_keras(weights, model), strict=True)
    return model.eval()


# --- CovidCTNet 3D CNN (the classifier) and model-directory import --------------------------------------------------

CNN3D_KERAS_INPUT_SIZE: tuple[int, int, int] = (50, 128, 128)
"""(depth, height, width) the official Keras CNN was built for: ``input_shape=(50, 128, 128, 1)``."""

OFFICIAL_CNN3D_SOURCE: dict[str, str] = {
    "repository": "https://github.com/mohofar/CovidCtNet",
    "commit": "626b644703fed625869f72b2293abfda3f4e1542",
    "path": "Model_weight/weight_cnn_CovidCtNet_v2_final.h5",
    "sha256": "3fc18a478c8f793ea171759843de41e48930df2ca702074eb0be1e5adaf50c90",
    "license": "none stated (the repository has no LICENSE file)",
    "paper": "Javaheri T. et al., npj Digit. Med. 4, 29 (2021), doi:10.1038/s41746-021-00399-3",
}
"""Provenance of the official CNN weights; a file is called official only when its sha256 matches."""


def _cnn3d_expected_keras_shapes(model: Any) -> list[tuple[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
    """``[(torch module prefix, (Keras kernel shape, bias shape))]`` for the weighted layers of ``model``, in order."""
    out: list[tuple[str, tuple[tuple[int, ...], tuple[int, ...]]]] = []
    for i, block in enumerate(model.features):
        for j, conv in enumerate((block.conv1, block.conv2), start=1):
            o, c, kd, kh, kw = conv.weight.shape
            out.append((f"features.{i}.conv{j}", ((kd, kh, kw, c, o), (o,))))
    for name in ("fc", "out"):
        lin = getattr(model.head, name)
        out.append((f"head.{name}", ((lin.in_features, lin.out_features), (lin.out_features,))))
    return out


def cnn3d_state_dict_from_keras(path_or_weights: Any) -> dict[str, Any]:
    """Convert the official CovidCTNet Keras 3D CNN into a ``state_dict`` for ``CovidCTNet3D`` at 50×128×128.

    Layers are matched in file order by their weight shapes (10 Conv3D then 2 Dense, each kernel + bias), not by
    their numbered Keras names. Conv3D kernels ``(kd, kh, kw, in, out)`` become ``(out, in, kd, kh, kw)`` (Keras and
    PyTorch both compute cross-correlation, so no flip). Dense kernels ``(in, out)`` are transposed. The first Dense
    layer's rows are also reordered: Keras flattens the last feature map ``(d, h, w, c)`` channels-last, our model
    flattens ``(c, d, h, w)``, so row ``((d·H + h)·W + w)·C + c`` moves to ``((c·D + d)·H + h)·W + w``. Output
    column ``k`` of the last Dense layer stays class ``k`` (0 control, 1 covid, 2 cap).

    Args:
        path_or_weights: the Keras ``save_weights`` ``.h5`` file, or ``{layer name: [arrays]}`` from
            :func:`read_keras_h5`.

    Returns:
        ``{key: float32 CPU tensor}`` for ``load_state_dict(strict=True)`` of the official-size model.

    Raises:
        CheckpointError: unreadable file, or weights of another architecture (the first differing layer is named).
    """
    where = str(path_or_weights) if isinstance(path_or_weights, (str, os.PathLike)) else "Keras weights"
    weights = _as_keras_weights(path_or_weights)
    model = CovidCTNet3D(input_size=CNN3D_KERAS_INPUT_SIZE)  # only its shapes are used
    expected = _cnn3d_expected_keras_shapes(model)
    found = [(name, arrays) for name, arrays in weights.items() if arrays]
    if len(found) != len(expected) or any(len(arrays) != 2 for _, arrays in found):
        first = ", ".join(f"{n} {[tuple(a.shape) for a in arrs]}" for n, arrs in found[:2])
        raise CheckpointError(
            f"{where}: not the CovidCTNet 3D CNN: expected 10 Conv3D + 2 Dense layers with a kernel and a bias each, "
            f"found {len(found)} layers with weights (first: {first})"
        )
    state: dict[str, Any] = {}
    feat_c = model.filters[-1]
    feat_dhw = model.feature_size
    for (prefix, (k_shape, b_shape)), (kname, (kernel, bias)) in zip(expected, found):
        if tuple(kernel.shape) != k_shape or tuple(bias.shape) != b_shape:
            raise CheckpointError(
                f"{where}: not the CovidCTNet 3D CNN at 50x128x128: Keras layer {kname!r} has kernel "
                f"{tuple(kernel.shape)} and bias {tuple(bias.shape)}, expected {k_shape} and {b_shape}"
            )
        kernel = np.asarray(kernel, dtype=np.float32)
        if kernel.ndim == 5:
            w = kernel.transpose(4, 3, 0, 1, 2)
        elif prefix == "head.fc":
            # Keras rows are (d, h, w, c)-flattened; ours are (c, d, h, w)-flattened.
            w = kernel.reshape(*feat_dhw, feat_c, -1).transpose(3, 0, 1, 2, 4).reshape(kernel.shape).T
        else:
            w = kernel.T
        state[f"{prefix}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
        state[f"{prefix}.bias"] = torch.from_numpy(np.asarray(bias, dtype=np.float32).copy())
    return state


def _denoiser_profile(config: Mapping[str, Any]) -> str | None:
    """The preprocessing profile a model directory's config says it expects, if it says."""
    profile = config.get("preprocess_profile")
    if profile is None and isinstance(config.get("preprocess"), Mapping):
        profile = config["preprocess"].get("profile")
    return None if profile is None else str(profile)


def _check_bcdunet_fits(entry: Mapping[str, Any], state: Mapping[str, Any], where: str) -> None:
    """Refuse a ``bcdunet`` denoiser whose weights do not fit the architecture its kwargs describe."""
    try:
        with torch.device("meta"):  # shapes only: no memory, no (slow) initialisation
            net = BCDUNet.from_config(entry.get("kwargs") or {})
    except ConfigError as err:
        raise ModelDirError(f"{where}: denoiser kwargs: {err}") from err
    problem = state_dict_mismatch(net, dict(state))
    if problem:
        raise ModelDirError(f"{where}: denoiser weights do not fit BCDUNet({entry.get('kwargs') or {}}): {problem}")


def _find_denoiser(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Resolve ``--denoiser``: ``(state_dict, component entry (arch, kwargs), provenance, preprocess config or None)``.

    Accepted, in this order:

    1. a model directory (``config.yaml`` + ``SHA256SUMS``) with a ``denoiser`` component: taken as is, hash-checked;
    2. a training run directory whose immediate subfolder is such a model directory (the first in name order, folders
       named ``model*`` or ``best*`` first), e.g. what ``train-denoiser`` exports;
    3. a run directory with raw weights: ``best.safetensors``, ``model.safetensors``, ``checkpoints/best.safetensors``,
       ``checkpoints/model.safetensors`` or ``checkpoints/best.pt`` (a trainer checkpoint, read with
       ``weights_only=True``); the architecture is ``bcdunet`` with the keyword arguments that the run's ``config.yaml``
       gives for ``BCDUNet`` (top level, under ``model``, or under ``components.denoiser.kwargs``). Raw weights carry
       no preprocessing record (None is returned for it).

    ``bcdunet`` weights are checked against their kwargs (keys and shapes), so a broken pairing is refused here and not
    at prediction time.

    Raises:
        ModelDirError: nothing usable found, a hash mismatch, or weights that do not fit their architecture.
    """
    if not path.is_dir():
        raise ModelDirError(f"{path}: --denoiser must be a model directory or a train-denoiser run directory")
    for cand in _denoiser_model_dirs(path):
        found = _model_dir_denoiser(cand)
        if found is not None:
            return found

    weights_path = _raw_denoiser_weights(path)
    state = _read_raw_denoiser(weights_path)
    entry = {"arch": "bcdunet", "kwargs": _run_bcdunet_kwargs(path / "config.yaml")}
    _check_bcdunet_fits(entry, state, str(weights_path))

    provenance = {"path": str(weights_path.resolve()), "weights_sha256": sha256_file(weights_path)}
    return state, entry, provenance, None


def _is_model_dir(p: Path) -> bool:
    """Whether ``p`` holds a model directory's ``config.yaml`` and ``SHA256SUMS``."""
    return (p / CONFIG_NAME).is_file() and (p / SUMS_NAME).is_file()


def _denoiser_model_dirs(path: Path) -> list[Path]:
    """The model directories ``--denoiser`` may name, in the order they are tried: ``path`` itself if it is one, then
    its immediate subfolders that are one, in name order with folders named ``model*`` or ``best*`` first."""
    candidates = [path] if _is_model_dir(path) else []
    subdirs = sorted((p for p in path.iterdir() if p.is_dir() and _is_model_dir(p)), key=lambda p: p.name)
    candidates += sorted(subdirs, key=lambda p: not p.name.lower().startswith(("model", "best")))
    return candidates


def _model_dir_denoiser(
    cand: Path,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any] | None] | None:
    """The ``denoiser`` component of one model directory, as :func:`_find_denoiser` returns it.

    Args:
        cand: a model directory (``config.yaml`` + ``SHA256SUMS``).

    Returns:
        ``(state_dict, component entry without weights, provenance, preprocess config or None)``, or ``None`` when the
        directory has no ``denoiser`` component.

    Raises:
        ModelDirError: a hash mismatch, ``bcdunet`` weights that do not fit their kwargs, or a denoiser whose
            ``input.size_xy`` is not the official CNN's 128.
    """
    md = load_model_dir(cand)
    if "denoiser" not in md.config.get("components", {}):
        return None
    entry = {k: v for k, v in md.component("denoiser").items() if k != "weights"}
    state = md.state_dict("denoiser")
    if entry.get("arch") == "bcdunet":
        _check_bcdunet_fits(entry, state, str(cand))
    else:
        logging.getLogger(__name__).warning("%s: denoiser arch %r is not checked here", cand, entry.get("arch"))
    provenance = {"path": str(cand.resolve()), "weights_sha256": md.weights_sha256("denoiser")}
    profile = _denoiser_profile(md.config)
    if profile is not None:
        provenance["preprocess_profile"] = profile
    size = (md.config.get("input") or {}).get("size_xy")
    if size is not None and size != CNN3D_KERAS_INPUT_SIZE[1]:
        raise ModelDirError(
            f"{cand}: the denoiser takes {size}x{size} slices (input.size_xy), the official CNN 128x128 residuals; "
            "train a denoiser on `covidctnet preprocess --profile official` output"
        )
    preprocess = md.config.get("preprocess")
    return dict(state), entry, provenance, dict(preprocess) if isinstance(preprocess, Mapping) else None


def _raw_denoiser_weights(path: Path) -> Path:
    """The first raw weights file of a run directory: ``best.safetensors``, ``model.safetensors``, then the same under
    ``checkpoints/``, then ``checkpoints/best.pt``.

    Raises:
        ModelDirError: none of them exists (and no model directory was found before).
    """
    raw_names = ["best.safetensors", "model.safetensors"]
    raw = [path / n for n in raw_names] + [path / "checkpoints" / n for n in raw_names + ["best.pt"]]
    weights_path = next((p for p in raw if p.is_file()), None)
    if weights_path is None:
        raise ModelDirError(
            f"{path}: no denoiser found: not a model directory with a 'denoiser' component, no such model directory "
            f"inside, and none of {[str(p.relative_to(path)) for p in raw]}"
        )
    return weights_path


def _read_raw_denoiser(weights_path: Path) -> dict[str, Any]:
    """The state dict in raw weights: a trainer checkpoint (``.pt``, its ``model``, read with ``weights_only=True``)
    or a safetensors file.

    Raises:
        ModelDirError: the file cannot be read.
    """
    if weights_path.suffix == ".pt":
        try:
            return dict(load_checkpoint(weights_path)["model"])
        except CheckpointError as err:
            raise ModelDirError(str(err)) from err

    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelDirError(f"{weights_path}: cannot read safetensors weights: {err}") from err


def _run_bcdunet_kwargs(run_cfg_path: Path) -> dict[str, Any]:
    """The ``BCDUNet`` keyword arguments a run's ``config.yaml`` gives: its top level, then ``model``, then
    ``components.denoiser.kwargs`` (later ones win); only ``BCDUNet.__init__``'s parameters, ``{}`` without the file.

    Raises:
        ModelDirError: the file is not valid YAML.
    """
    kwargs: dict[str, Any] = {}
    if run_cfg_path.is_file():
        try:
            run_cfg = yaml.safe_load(run_cfg_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ModelDirError(f"{run_cfg_path}: not valid YAML: {str(err).splitlines()[0]}") from err

        valid = [p for p in inspect.signature(BCDUNet.__init__).parameters if p != "self"]
        comp = (run_cfg.get("components") or {}).get("denoiser") if isinstance(run_cfg, dict) else None
        nested = run_cfg.get("model") if isinstance(run_cfg, dict) else None
        for source in (run_cfg, nested, (comp or {}).get("kwargs")):
            if isinstance(source, Mapping):
                kwargs.update({k: v for k, v in source.items() if k in valid})
    return kwargs


def _imported_model_card(
    h5_path: Path,
    h5_sha: str,
    official: bool,
    denoiser: dict[str, Any] | None,
    denoiser_entry: dict[str, Any] | None,
    profile: str,
    profile_recorded: bool,
) -> str:
    src = OFFICIAL_CNN3D_SOURCE
    if official:
        origin = (
            f"the official CovidCTNet Keras CNN weights, `{src['path']}` of {src['repository']} at commit "
            f"`{src['commit']}` (sha256 `{h5_sha}`, identical to the published file)"
        )
    else:
        origin = (
            f"`{h5_path.name}`, a Keras h5 with the CovidCTNet CNN architecture whose sha256 `{h5_sha}` is **not** "
            f"that of the official file ({src['path']} at {src['repository']}@{src['commit'][:12]}, sha256 "
            f"`{src['sha256']}`); its origin is whatever the person who ran the import knows"
        )
    if denoiser is None:
        denoiser_text = (
            "**No denoiser is included.** `covidctnet predict` needs one to make residual maps, so it cannot use this "
            "directory until a denoiser is added: re-run `covidctnet import-keras WEIGHTS.h5 -o DIR --denoiser "
            "RUN_OR_MODEL_DIR` with a BCDU-Net trained by `covidctnet train-denoiser` on control slices preprocessed "
            "with `--profile official` at 128×128."
        )
    else:
        denoiser_entry = denoiser_entry or {}
        if not profile_recorded:
            profile_text = (
                "Its source does not record its preprocessing; the `official` profile at 128×128 is assumed "
                "(`preprocess` in config.yaml)."
            )
        else:
            profile_text = f"Its model directory says it was trained on preprocessing profile `{profile}` at 128×128."
        if profile != "official":
            profile_text += " **This differs from `official`, which the CNN needs: residuals will not match training.**"
        denoiser_text = (
            f"The denoiser (`denoiser.safetensors`, arch `{denoiser_entry.get('arch')}`, kwargs "
            f"`{denoiser_entry.get('kwargs')}`) was **trained by this project**, not by the CovidCTNet authors; it "
            f"comes from `{denoiser['path']}` (weights sha256 `{denoiser['weights_sha256']}`). {profile_text}"
        )
    return f"""# CovidCTNet 3D CNN imported from Keras

## What this is
- `classifier.safetensors`: {origin}, converted to this project's PyTorch `CovidCTNet3D` (input 50×128×128 residual
  volumes; classes 0 `control`, 1 `covid`, 2 `cap`) by `covidctnet import-keras`.
- The official BCDU-Net denoiser weights were **never published**: the official repository lists
  `Model_weight/weight_bcdunet_v2.hdf5`, but the file itself is missing there. So the official pipeline cannot be
  reproduced exactly.
- {denoiser_text}

## Expected input
Residual volumes made with preprocessing profile `official` (the official notebooks' steps at 128×128 in-plane;
`preprocess` in config.yaml holds the settings `predict` uses, here profile `{profile}`): each slice minus its BCDU-Net
reconstruction, the stack resized to 50×128×128 (slices, rows, columns; see `input` in config.yaml).

## Training data and evaluation
The CNN was trained by the CovidCTNet authors; see Javaheri et al., npj Digit. Med. 4, 29 (2021),
doi:10.1038/s41746-021-00399-3 for their data and results. This project did not retrain it and has **not** evaluated
its diagnostic performance. What was checked: the PyTorch port reproduces a NumPy re-implementation of the Keras
forward pass computed from the same h5 file to 1e-4 (`tests/models/test_keras_import.py`).

## License
The source repository states **no license** for its code or weights (it has no LICENSE file). Check with the authors
before redistributing these weights.

## Intended use
Research and education only. **Not a medical device**; not for diagnosis, triage or any clinical decision.
"""


def _paired_preprocess(den_preprocess: Mapping[str, Any] | None, denoiser: Any) -> dict[str, Any]:
    """The preprocessing config of the paired model directory: the denoiser's own (it must be 128×128, the CNN's
    in-plane size), or the official profile when the denoiser records none or there is no denoiser.

    Raises:
        ModelDirError: the denoiser's ``preprocess`` is invalid or not 128×128.
    """
    if den_preprocess is None:
        return config_to_dict(PreprocessConfig(**OFFICIAL_PROFILE))
    try:
        cfg = validate_config(PreprocessConfig, den_preprocess, f"{denoiser}: preprocess")
    except ConfigError as err:
        raise ModelDirError(str(err)) from err
    if cfg.size_xy != CNN3D_KERAS_INPUT_SIZE[1]:
        raise ModelDirError(
            f"{denoiser}: the denoiser was trained on {cfg.size_xy}x{cfg.size_xy} slices (preprocess.size_xy), the "
            "official CNN takes 128x128 residuals; train one on `covidctnet preprocess --profile official` output"
        )
    return config_to_dict(cfg)


def import_keras_model(
    h5_path: str | os.PathLike, out_dir: str | os.PathLike, denoiser: str | os.PathLike | None = None
) -> Any:
    """Convert the official CovidCTNet Keras CNN into a model directory, optionally paired with a denoiser.

    Writes ``config.yaml`` (classifier arch ``covidctnet3d`` + kwargs at 50×128×128; ``preprocess``: the denoiser's
    preprocessing config, or the ``official`` profile when it records none or no denoiser is given, and its
    ``preprocess_profile``; ``input``: depth 50, size_xy 128; the class names; provenance), ``classifier.safetensors``,
    ``denoiser.safetensors`` when ``denoiser`` is given, ``MODEL_CARD.md`` and ``SHA256SUMS``, atomically.

    Args:
        h5_path: the Keras ``.h5`` (``weight_cnn_CovidCtNet_v2_final.h5``).
        out_dir: the model directory to write; an existing model directory there is replaced, any other non-empty
            folder is refused.
        denoiser: a model directory with a ``denoiser`` component, or a train-denoiser run directory (see
            :func:`_find_denoiser` for what is accepted).

    Returns:
        The written :class:`~covidctnet.core.model_dir.ModelDir`.

    Raises:
        CheckpointError: the h5 is unreadable or not the CovidCTNet CNN.
        ModelDirError: the denoiser cannot be found or does not fit its architecture, or ``out_dir`` is a non-empty
            folder that is not a model directory.
    """
    log = logging.getLogger(__name__)
    h5_path, out_dir = Path(h5_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (
        any(out_dir.iterdir()) and not ((out_dir / CONFIG_NAME).is_file() and (out_dir / SUMS_NAME).is_file())
    )):
        # save_model_dir replaces out_dir wholesale: never let a typo wipe an unrelated folder.
        raise ModelDirError(f"{out_dir}: exists and is not a model directory; refusing to replace it")
    state = cnn3d_state_dict_from_keras(h5_path)
    model = build_classifier(
        "covidctnet3d", in_channels=1, num_classes=len(CLASS_NAMES), input_size=CNN3D_KERAS_INPUT_SIZE
    )
    model.load_state_dict(state, strict=True)  # cannot fail after the shape checks; a cheap guarantee all the same
    h5_sha = sha256_file(h5_path)
    official = h5_sha == OFFICIAL_CNN3D_SOURCE["sha256"]
    if not official:
        log.warning("%s: sha256 %s… is not the official CovidCTNet CNN file's; importing it anyway",
                    h5_path, h5_sha[:12])
    source = dict(OFFICIAL_CNN3D_SOURCE) if official else {"file": h5_path.name, "sha256": h5_sha, "license": "unknown"}
    spec: dict[str, Any] = getattr(model, "spec")  # noqa: B009 (set by build_classifier)
    components: dict[str, Any] = {"classifier": {**spec, "source": source}}
    state_dicts = {"classifier": state}
    den_prov = den_entry = den_preprocess = None
    if denoiser is not None:
        den_state, den_entry, den_prov, den_preprocess = _find_denoiser(Path(denoiser))
        components["denoiser"] = {**den_entry, "source": den_prov}
        state_dicts["denoiser"] = den_state
    preprocess = _paired_preprocess(den_preprocess, denoiser)
    if preprocess["profile"] != "official":
        log.warning("%s: the denoiser was trained with preprocess profile %r; the official CNN expects 'official'",
                    denoiser, preprocess["profile"])
    depth, height, _ = CNN3D_KERAS_INPUT_SIZE
    config = {
        "name": "covidctnet-official-cnn" + ("" if denoiser is not None else "-no-denoiser"),
        "task": "classifier",
        "class_names": list(CLASS_NAMES),
        "preprocess_profile": preprocess["profile"],
        "preprocess": preprocess,  # what `predict` runs before the denoiser (size_xy 128 = the CNN's height, width)
        "input": {
            "depth": depth,
            "size_xy": height,
            "channels": 1,
            "layout": "(1, D, H, W) = residual_to_network_input((size_xy, size_xy, depth) RAS residual)",
            "converter": "covidctnet.models.cnn3d.residual_to_network_input",
        },
        "components": components,
    }
    card = _imported_model_card(h5_path, h5_sha, official, den_prov, den_entry, preprocess["profile"],
                                den_preprocess is not None)
    md = save_model_dir(out_dir, config, state_dicts, card)
    log.info("wrote %s (classifier %s…%s)", out_dir, md.weights_sha256("classifier")[:12],
             "" if denoiser is not None else "; no denoiser: add one before predict")
    return md
