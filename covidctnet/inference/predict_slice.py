"""``covidctnet predict-slice``: score CT slice images with a slice model directory (the bundled one by default)
into ``OUT/preds.csv`` (``file, p_covid, predicted, status, error, model, weights_sha256, threshold``), optionally
with Grad-CAM PNGs; a bad image becomes an error row.

Grad-CAM maps (:func:`grad_cam_maps`) explain the **log-odds of COVID-19** (``log p_covid - log p_noncovid``, the
quantity the threshold cuts), so high = evidence for COVID-19, and are drawn on one **absolute** scale: the same
colour means the same evidence in every image and every run (see :data:`CAM_VMAX`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from torch import nn

from covidctnet.core.errors import ConfigError, CovidCTNetError, InputError, ModelDirError
from covidctnet.core.files import atomic_path, sha256_file, write_csv
from covidctnet.core.labels import BINARY_CLASS_NAMES
from covidctnet.core.progress import progress
from covidctnet.data.ucsd import (
    IMAGE_SUFFIXES,
    build_slice_transforms,
    load_grey,
    prepare_slice,
)
from covidctnet.evaluation.plots import new_figure, save_figure
from covidctnet.inference.backends import check_backend, open_model
from covidctnet.models.registry import DEFAULT_SLICE_MODEL

__all__ = ["PREDS_COLUMNS", "CAM_VMAX", "PredictSummary", "predict_slices", "predict_arrays", "grad_cam_maps",
           "check_threshold"]

logger = logging.getLogger(__name__)

PREDS_COLUMNS = ("file", "p_covid", "predicted", "status", "error", "model", "weights_sha256", "threshold")
"""Columns of ``OUT/preds.csv`` (docs/architecture.md)."""

CAM_VMAX = math.log(99.0)
"""Top of the fixed Grad-CAM colour scale, in log-odds of COVID-19 per region: logit(0.99) ≈ 4.6, i.e. full colour is
a region that, were the whole slice like it, would on its own take the model to p_covid = 0.99. Stronger regions are
clipped to full colour."""


@dataclass
class PredictSummary:
    """What :func:`predict_slices` did: rows written, failures, CAM files."""
    out_csv: Path
    n_ok: int
    n_failed: int
    cams: list[Path]
    threshold: float = 0.5
    model: str = ""


def _expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                logger.warning("%s: no images (%s) in this folder", path, ", ".join(IMAGE_SUFFIXES))
            files.extend(found)
        else:
            files.append(path)  # a missing or non-image file becomes an error row, not an abort
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def predict_arrays(model: nn.Module, config: dict, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """p(COVID) of grey-scale images ((H, W) float in [0, 1]) with a loaded slice model; returns (N,) float."""
    pre = config["preprocess"]
    transform = build_slice_transforms(False, pre["size"], pre["lung_mask"])
    # an ONNX model (covidctnet.inference.onnx_export.OnnxModule) has no parameters and runs on the CPU
    device = next(model.parameters(), torch.empty(0)).device
    xs = []
    for arr in arrays:
        prepared = prepare_slice(arr, pre["size"], pre["lung_mask"])
        item = {"image": prepared[:1], **({"mask": prepared[1:2]} if pre["lung_mask"] else {})}
        xs.append(transform(item)["image"].float())
    with torch.no_grad():
        logits = model(torch.stack(xs).to(device))
    return torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()


def check_threshold(value: float, what: str = "threshold") -> float:
    """``value`` as a float if it is a probability threshold in [0, 1].

    Raises:
        ConfigError: not a finite number in [0, 1].
    """
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number in [0, 1], not {value!r}") from None
    if not 0.0 <= t <= 1.0:  # also False for NaN
        raise ConfigError(f"{what} must be in [0, 1] (a threshold on p_covid), not {value!r}")
    return t


class _LogOdds(nn.Module):
    """(B, 2) logits or log-probabilities → (B, 1) log-odds of class 1 (COVID-19).

    Both a single network's logits and :class:`~covidctnet.models.slice.SliceEnsemble`'s log mean probabilities give
    ``log p_covid - log p_noncovid`` as the difference of the two outputs, so Grad-CAM of this one output explains what
    the threshold on ``p_covid`` decides, without the softmax's saturation near 0 and 1.
    """
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x).float()
        return (out[:, 1] - out[:, 0])[:, None]


def _cam_layers(model: nn.Module) -> list[str]:
    """The last feature layer of the network, or of every member of an ensemble."""
    members = getattr(model, "members", None)
    nets = [(f"members.{i}.", m) for i, m in enumerate(members)] if members is not None else [("", model)]
    return [prefix + ("layer4" if hasattr(m, "layer4") else "class_layers.relu") for prefix, m in nets]


def _write_cam(path: Path, image: np.ndarray, cam: np.ndarray, p_covid: float, threshold: float, name: str) -> Path:
    """The Grad-CAM figure: the slice, and the slice under the map on the fixed scale [0, CAM_VMAX].

    The overlay's opacity follows the map, so regions with no evidence show the slice itself rather than a colour.
    """
    fig = new_figure((8.4, 4.4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax1.set_title(name[:48], fontsize=8)
    ax2.imshow(image, cmap="gray", vmin=0, vmax=1)
    level = np.clip(cam / CAM_VMAX, 0.0, 1.0)
    heat = ax2.imshow(cam, cmap="jet", vmin=0.0, vmax=CAM_VMAX, alpha=0.15 + 0.5 * level)
    call = BINARY_CLASS_NAMES[int(p_covid >= threshold)]
    ax2.set_title(f"Grad-CAM, evidence for COVID-19\np_covid = {p_covid:.3f}, threshold {threshold:.4g} → {call}",
                  fontsize=8)
    for ax in (ax1, ax2):
        ax.axis("off")
    bar = fig.colorbar(heat, ax=ax2, fraction=0.046, pad=0.04, extend="max")
    bar.solids.set_alpha(1.0)  # the bar shows the colour scale, not the overlay's varying opacity
    bar.set_label("log-odds of COVID-19 per region (fixed scale)", fontsize=7)
    return save_figure(fig, path, dpi=100)


def predict_slices(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    cam_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 16,
    threshold: float | None = None,
    backend: str = "auto",
    on_error: Callable[[str], None] | None = None,
) -> PredictSummary:
    """Score slice images into ``OUT/preds.csv``; a bad image is an error row and the others go on.

    As for the batch commands, nothing is written when every image failed.

    Args:
        inputs: image files and/or folders (searched recursively for images).
        out_dir: output folder (created if needed); gets ``preds.csv`` with the columns :data:`PREDS_COLUMNS`:
            ``predicted`` in {covid, noncovid}, ``status`` ok / error, and on every row the model's name,
            ``weights_sha256`` (the sha256 of its ``SHA256SUMS``, as in ``predict``'s report) and the threshold used,
            so that ``evaluate`` decides as this run did. Written atomically once all images are done.
        model_dir: a slice model directory; ``None`` = the bundled model.
        cam_dir: write ``<stem>_cam.png`` Grad-CAM overlays (evidence for COVID-19, see :func:`grad_cam_maps`) here,
            each with ``<stem>_cam.npy``, the (S, S) float32 map drawn (log-odds units, over the network input).
        device: ``auto`` / ``cpu`` / ``cuda``.
        batch_size: images per forward pass.
        threshold: override of the model's decision threshold on ``p_covid``, in [0, 1].
        backend: ``auto`` (:func:`covidctnet.inference.backends.resolve_backend`; PyTorch with ``cam_dir``),
            ``torch``, ``onnx`` or ``openvino`` (on the CPU, from an ``export-onnx`` folder or the model directory's
            cached export).
        on_error: called with each bad image's one-line message as it happens (the CLI prints ``Error: ...``);
            ``None`` logs it.

    Raises:
        InputError: no input images at all, or ``out_dir`` is an existing file.
        ModelDirError: the model directory is unusable, or its threshold is not in [0, 1].
        ConfigError: unknown backend, threshold not in [0, 1], batch size below 1, or Grad-CAM asked of the ONNX
            backend (it needs PyTorch's gradients).
    """
    out_dir = Path(out_dir)
    # checked before the model is loaded, so that a wrong -o costs nothing and leaves nothing behind
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: is an existing file; the output must be a folder (preds.csv is written into it)")
    if threshold is not None:
        threshold = check_threshold(threshold, "--threshold")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, not {batch_size}")
    files = _expand_inputs(inputs)
    if not files:
        raise InputError(f"{', '.join(map(str, inputs))}: no images to predict")
    model, config, weights_sha256 = _open_slice_model(model_dir, backend, device, cam_dir)
    if threshold is None:
        try:
            thr = check_threshold(config.get("threshold", 0.5), "the model's threshold")
        except ConfigError as err:
            raise ModelDirError(f"{model_dir or DEFAULT_SLICE_MODEL}/config.yaml: {err}") from err
    else:
        thr = threshold
    provenance = [str(config.get("name", "")), weights_sha256, repr(thr)]
    rows: list[list[str]] = []
    cams: list[Path] = []
    gradcam = None if cam_dir is None else _grad_cam(model)
    used_names: set[str] = set()
    for start in progress(range(0, len(files), batch_size), total=math.ceil(len(files) / batch_size),
                          desc="predict-slice"):
        batch_rows, batch_cams = _score_batch(
            files[start : start + batch_size], model, config, thr, gradcam, cam_dir, used_names, on_error
        )
        rows += [row + provenance for row in batch_rows]
        cams += batch_cams
    out_csv = out_dir / "preds.csv"
    n_failed = sum(row[3] == "error" for row in rows)
    summary = PredictSummary(out_csv, len(rows) - n_failed, n_failed, cams, thr, provenance[0])
    if n_failed == len(rows):
        return summary
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_csv, PREDS_COLUMNS, rows)
    logger.info("%s: %d image(s) scored, %d failed (model %s, threshold %.4g)", out_csv, len(rows) - n_failed,
                n_failed, config.get("name"), thr)
    return summary


def _open_slice_model(
    model_dir: str | os.PathLike | None, backend: str, device: str, cam_dir: str | os.PathLike | None
) -> tuple[nn.Module, dict, str]:
    """Check the backend against the other options, then open the slice model (the bundled one when ``model_dir`` is
    ``None``).

    Returns:
        the model, its ``config.yaml`` as a dict, and the sha256 of its ``SHA256SUMS`` (one value for the config and
        every weights file; an ONNX export carries its source's, so both backends report the same).

    Raises:
        ConfigError: unknown backend, or Grad-CAM asked of the onnx or openvino backend.
        ModelDirError: no bundled model in this installation, or the model directory is unusable.
    """
    if cam_dir is not None and check_backend(backend) == "auto":
        backend = "torch"  # Grad-CAM needs PyTorch's gradients
    if cam_dir is not None and backend != "torch":
        raise ConfigError(f"--cam needs gradients, which the {backend} backend has not; use --backend torch (or auto) "
                          "for Grad-CAM")
    if model_dir is None and not DEFAULT_SLICE_MODEL.is_dir():
        raise ModelDirError(
            f"{DEFAULT_SLICE_MODEL}: no bundled slice model in this installation; pass --model MODEL_DIR"
        )
    opened = open_model(model_dir or DEFAULT_SLICE_MODEL, backend, device)
    model, config = opened.slice_model()
    return model, config, sha256_file(opened.md.path / "SHA256SUMS")


def _grad_cam(model: nn.Module) -> Any:
    """MONAI's Grad-CAM of the model's log-odds of COVID-19 on its last feature layer(s), without MONAI's
    post-processing.

    MONAI's default ``postprocessing`` maps each map's (min, max) to (1, 0): it inverts the map and rescales every
    image on its own. Identity keeps Grad-CAM's own values (ReLU of the gradient-weighted activations), which
    :func:`grad_cam_maps` puts on an absolute scale.
    """
    target = _LogOdds(model)
    # A new module starts in training mode, and MONAI's hooks restore the wrapper's mode after each map: left so, the
    # first map would switch the network to training mode (batch statistics, running means updated) for good.
    target.train(model.training)
    return GradCAM(nn_module=target, target_layers=["net." + name for name in _cam_layers(model)],
                   postprocessing=lambda m: m)


def _network_input(config: dict, arr: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(H, W) grey image → the (1, C, S, S) network input and the (C, S, S) prepared slice before normalisation."""
    pre = config["preprocess"]
    prepared = prepare_slice(arr, pre["size"], pre["lung_mask"])
    item = {"image": prepared[:1], **({"mask": prepared[1:2]} if pre["lung_mask"] else {})}
    x = build_slice_transforms(False, pre["size"], pre["lung_mask"])(item)["image"].float()[None]
    return x, prepared


def grad_cam_maps(model: nn.Module, config: dict, arrays: Sequence[np.ndarray], gradcam: Any = None) -> np.ndarray:
    """Grad-CAM maps of COVID-19 evidence for grey-scale images, on an absolute scale.

    The target is the model's log-odds of COVID-19 (for the usual 2-output models, MONAI's raw Grad-CAM of the
    COVID-19 output times a positive factor per image: the same map, unlike MONAI's default output, which is inverted).
    Each map is ReLU(sum_k alpha_k A_k) on the last feature layer, bilinearly upsampled to the network input, and
    multiplied by the number of feature-map cells. For a network that ends in global average pooling and a linear
    layer (the slice ResNets and DenseNets), the map before the ReLU then averages over the slice to the log-odds
    minus the bias: a value v is a region that, were the whole slice like it, would move the log-odds by v. So the
    scale is **absolute**, not min–max per image nor shared by a batch: an image the model finds unremarkable gets a
    faint map, and the same colour means the same evidence in every image and every run. For an ensemble the map is
    the mean of its members' maps, each for the ensemble's log-odds.

    Args:
        model: a loaded torch slice model (eval mode).
        config: its ``config.yaml`` as a dict (``preprocess.size``, ``preprocess.lung_mask``).
        arrays: (H, W) grey images, float in [0, 1].
        gradcam: a Grad-CAM object from :func:`_grad_cam` to reuse (its hooks are registered once); ``None`` makes one.

    Returns:
        (N, S, S) float32 maps >= 0 over the network input (S = ``preprocess.size``), in log-odds units; drawn on
        [0, :data:`CAM_VMAX`].
    """
    gradcam = gradcam if gradcam is not None else _grad_cam(model)
    device = next(model.parameters()).device
    n_layers = len(_cam_layers(model))
    maps = []
    for arr in arrays:
        x = _network_input(config, arr)[0].to(device)
        layer_maps = []
        with torch.enable_grad():  # predict runs under no_grad; Grad-CAM needs the backward pass
            for i in range(n_layers):
                cells = gradcam.compute_map(x, class_idx=0, layer_idx=i)  # (1, 1, h, w), already ReLU'd
                n_cells = cells.shape[-2] * cells.shape[-1]
                # bilinear, as MONAI's default upsampler: linear, so the scale survives it
                up = F.interpolate(cells, size=x.shape[2:], mode="bilinear", align_corners=False)
                layer_maps.append(n_cells * up[0, 0].detach().float().cpu().numpy())
        maps.append(np.mean(layer_maps, axis=0))
    return np.asarray(maps, dtype=np.float32)


def _score_batch(
    chunk: Sequence[Path],
    model: nn.Module,
    config: dict,
    thr: float,
    gradcam: Any,
    cam_dir: str | os.PathLike | None,
    used_names: set[str],
    on_error: Callable[[str], None] | None,
) -> tuple[list[list[str]], list[Path]]:
    """Score one batch of image files in one forward pass; a file that cannot be read is an error row.

    Args:
        chunk: the image files.
        model: the slice model.
        config: its ``config.yaml`` as a dict.
        thr: the decision threshold on ``p_covid``.
        gradcam: a Grad-CAM (see :func:`_grad_cam`), or ``None`` for no CAM PNGs.
        cam_dir: where the CAM PNGs go (when ``gradcam`` is given).
        used_names: CAM file names taken so far; the new ones are added.
        on_error: called with each bad image's message; ``None`` logs it.

    Returns:
        one row per file (``file, p_covid, predicted, status, error``: the first five of :data:`PREDS_COLUMNS`), in
        order, and the CAM PNGs written.
    """
    rows: list[list[str]] = []
    cams: list[Path] = []
    arrays: list[np.ndarray | None] = []
    errors: list[str] = []
    for f in chunk:
        try:
            arrays.append(load_grey(f))
            errors.append("")
        except CovidCTNetError as err:
            arrays.append(None)
            errors.append(str(err))
    good = [a for a in arrays if a is not None]
    probs = iter(predict_arrays(model, config, good).tolist()) if good else iter(())
    for f, arr, err in zip(chunk, arrays, errors):
        if arr is None:
            (on_error or logger.error)(err)
            rows.append([str(f), "", "", "error", err])
            continue
        p = float(next(probs))
        rows.append([str(f), f"{p:.6f}", BINARY_CLASS_NAMES[int(p >= thr)], "ok", ""])
        if gradcam is not None:
            assert cam_dir is not None
            cams.append(_cam_for(gradcam, model, config, arr, p, thr, f, Path(cam_dir), used_names))
    return rows, cams


def _cam_for(gradcam: Any, model: nn.Module, config: dict, arr: np.ndarray, p: float, thr: float, f: Path,
             cam_dir: Path, used: set[str]) -> Path:
    """Write the Grad-CAM of one image under a file name not yet ``used``: ``<stem>_cam.png`` (the figure) and
    ``<stem>_cam.npy`` ((S, S) float32, the map drawn, see :func:`grad_cam_maps`); returns the PNG's path."""
    cam = grad_cam_maps(model, config, [arr], gradcam)[0]
    prepared = _network_input(config, arr)[1]
    stem = f.stem
    name, k = f"{stem}_cam.png", 1
    while name in used:  # same stem in two folders
        k += 1
        name = f"{stem}_{k}_cam.png"
    used.add(name)
    cam_dir.mkdir(parents=True, exist_ok=True)  # here, not up front: a run in which every image failed leaves nothing
    # the map itself beside the picture, so its values (log-odds units, over the network input) can be used and checked
    with atomic_path(cam_dir / f"{name.removesuffix('.png')}.npy", suffix=".npy") as tmp:
        np.save(tmp, cam.astype(np.float32))
    return _write_cam(cam_dir / name, prepared[0], cam, p, thr, f.name)
