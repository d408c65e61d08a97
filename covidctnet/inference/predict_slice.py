"""``covidctnet predict-slice``: score CT slice images with a slice model directory (the bundled one by default)
into ``preds.csv`` (``file, p_covid, predicted, status, error``), optionally with Grad-CAM PNGs; a bad image becomes an
error row.
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
from torch import nn

from covidctnet.core.errors import ConfigError, CovidCTNetError, InputError, ModelDirError
from covidctnet.core.files import write_csv
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

__all__ = ["PredictSummary", "predict_slices", "predict_arrays"]

logger = logging.getLogger(__name__)


@dataclass
class PredictSummary:
    """What :func:`predict_slices` did: rows written, failures, CAM files."""

    out_csv: Path
    n_ok: int
    n_failed: int
    cams: list[Path]


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
    # an ONNX model (covidctnet.inference.onnx.OnnxModule) has no parameters and runs on the CPU
    device = next(model.parameters(), torch.empty(0)).device
    xs = []
    for arr in arrays:
        prepared = prepare_slice(arr, pre["size"], pre["lung_mask"])
        item = {"image": prepared[:1], **({"mask": prepared[1:2]} if pre["lung_mask"] else {})}
        xs.append(transform(item)["image"].float())
    with torch.no_grad():
        logits = model(torch.stack(xs).to(device))
    return torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()


def _cam_layers(model: nn.Module) -> list[str]:
    """The last feature layer of the network, or of every member of an ensemble."""
    members = getattr(model, "members", None)
    nets = [(f"members.{i}.", m) for i, m in enumerate(members)] if members is not None else [("", model)]
    return [prefix + ("layer4" if hasattr(m, "layer4") else "class_layers.relu") for prefix, m in nets]


def _write_cam(path: Path, image: np.ndarray, cam: np.ndarray, p_covid: float, name: str) -> Path:

    fig = new_figure((8.0, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.imshow(image, cmap="gray")
    ax1.set_title(name[:40], fontsize=8)
    ax2.imshow(image, cmap="gray")
    heat = ax2.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax2.set_title(f"Grad-CAM for COVID-19 (p = {p_covid:.3f})", fontsize=8)
    for ax in (ax1, ax2):
        ax.axis("off")
    fig.colorbar(heat, ax=ax2, fraction=0.046, pad=0.04)
    return save_figure(fig, path, dpi=100)


def predict_slices(
    inputs: Sequence[str | os.PathLike],
    out_csv: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    cam_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 16,
    threshold: float | None = None,
    backend: str = "torch",
    on_error: Callable[[str], None] | None = None,
) -> PredictSummary:
    """Score slice images into ``preds.csv``; a bad image is an error row and the others go on.

    As for the batch commands, nothing is written when every image failed.

    Args:
        inputs: image files and/or folders (searched recursively for images).
        out_csv: output CSV ``file, p_covid, predicted, status, error`` (``predicted`` in {covid, noncovid};
            ``status`` ok / error), written atomically once all images are done.
        model_dir: a slice model directory; ``None`` = the bundled model.
        cam_dir: write ``<stem>_cam.png`` Grad-CAM overlays (class COVID-19) here.
        device: ``auto`` / ``cpu`` / ``cuda``.
        batch_size: images per forward pass.
        threshold: override of the model's decision threshold on ``p_covid``.
        backend: ``torch``, or ``onnx`` (onnxruntime on the CPU; ``model_dir`` is an ``export-onnx`` output).
        on_error: called with each bad image's one-line message as it happens (the CLI prints ``Error: ...``);
            ``None`` logs it.

    Raises:
        InputError: no input images at all.
        ModelDirError: the model directory is unusable.
        ConfigError: unknown backend, or Grad-CAM asked of the ONNX backend (it needs PyTorch's gradients).
    """
    files = _expand_inputs(inputs)
    if not files:
        raise InputError(f"{', '.join(map(str, inputs))}: no images to predict")
    model, config = _open_slice_model(model_dir, backend, device, cam_dir)
    thr = float(config.get("threshold", 0.5) if threshold is None else threshold)
    rows: list[list[str]] = []
    cams: list[Path] = []
    gradcam = None if cam_dir is None else _grad_cam(model, Path(cam_dir))
    used_names: set[str] = set()
    for start in progress(range(0, len(files), batch_size), total=math.ceil(len(files) / batch_size),
                          desc="predict-slice"):
        batch_rows, batch_cams = _score_batch(
            files[start : start + batch_size], model, config, thr, gradcam, cam_dir, used_names, on_error
        )
        rows += batch_rows
        cams += batch_cams
    n_failed = sum(row[3] == "error" for row in rows)
    if n_failed == len(rows):
        return PredictSummary(Path(out_csv), 0, n_failed, cams)
    write_csv(out_csv, ["file", "p_covid", "predicted", "status", "error"], rows)
    logger.info("%s: %d image(s) scored, %d failed (model %s)", out_csv, len(rows) - n_failed, n_failed,
                config.get("name"))
    return PredictSummary(Path(out_csv), len(rows) - n_failed, n_failed, cams)


def _open_slice_model(
    model_dir: str | os.PathLike | None, backend: str, device: str, cam_dir: str | os.PathLike | None
) -> tuple[nn.Module, dict]:
    """Check the backend against the other options, then open the slice model (the bundled one when ``model_dir`` is
    ``None``).

    Returns:
        the model and its ``config.yaml`` as a dict.

    Raises:
        ConfigError: unknown backend, Grad-CAM asked of the ONNX backend, or the ONNX backend without a model.
        ModelDirError: no bundled model in this installation, or the model directory is unusable.
    """
    if check_backend(backend) == "onnx":
        if cam_dir is not None:
            raise ConfigError("--cam needs gradients, which the onnx backend has not; use --backend torch for Grad-CAM")
        if model_dir is None:
            raise ConfigError("--backend onnx needs --model: an `export-onnx` output folder of a slice model")
    if model_dir is None and not DEFAULT_SLICE_MODEL.is_dir():
        raise ModelDirError(
            f"{DEFAULT_SLICE_MODEL}: no bundled slice model in this installation; pass --model MODEL_DIR"
        )
    return open_model(model_dir or DEFAULT_SLICE_MODEL, backend, device).slice_model()


def _grad_cam(model: nn.Module, cam_dir: Path) -> Any:
    """MONAI's Grad-CAM on the model's last feature layer(s), with ``cam_dir`` created for its PNGs."""
    from monai.visualize import GradCAM

    gradcam = GradCAM(nn_module=model, target_layers=_cam_layers(model))
    cam_dir.mkdir(parents=True, exist_ok=True)
    return gradcam


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
        one ``preds.csv`` row per file (``file, p_covid, predicted, status, error``), in order, and the CAM PNGs
        written.
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
            cams.append(_cam_for(gradcam, model, config, arr, p, f, Path(cam_dir), used_names))
    return rows, cams


def _cam_for(gradcam: Any, model: nn.Module, config: dict, arr: np.ndarray, p: float, f: Path, cam_dir: Path,
             used: set[str]) -> Path:

    pre = config["preprocess"]
    prepared = prepare_slice(arr, pre["size"], pre["lung_mask"])
    item = {"image": prepared[:1], **({"mask": prepared[1:2]} if pre["lung_mask"] else {})}
    x = build_slice_transforms(False, pre["size"], pre["lung_mask"])(item)["image"].float()[None]
    x = x.to(next(model.parameters()).device)
    with torch.enable_grad():  # an ensemble: the mean of its members' maps, each for the ensemble's COVID output
        n_layers = len(_cam_layers(model))
        cam = np.mean([gradcam(x, class_idx=1, layer_idx=i)[0, 0].detach().cpu().numpy() for i in range(n_layers)],
                      axis=0)
    stem = f.stem
    name, k = f"{stem}_cam.png", 1
    while name in used:  # same stem in two folders
        k += 1
        name = f"{stem}_{k}_cam.png"
    used.add(name)
    return _write_cam(cam_dir / name, prepared[0], cam, p, f.name)
