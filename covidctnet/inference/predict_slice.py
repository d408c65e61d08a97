"""``covidctnet predict-slice``: score CT slice images with a slice model directory (the bundled one by default)
into ``OUT/preds.csv`` (``file, p_covid, predicted, status, error, model, weights_sha256, threshold``), optionally
with Grad-CAM PNGs; a bad image becomes an error row.

Grad-CAM maps (:func:`grad_cam_maps`) explain the **log-odds of COVID-19** (``log p_covid - log p_noncovid``, the
quantity the threshold cuts), so high = evidence for COVID-19, in log-odds units per region. They are drawn on the
model's own colour scale, recorded once in its ``config.yaml`` (``cam_scale``: a high percentile of its maps over the
images it was validated on; :mod:`covidctnet.models.grad_cam`): the same colour means the same evidence in every image
and every run. Only regions from ``cam_scale.show_from`` of the top up are coloured; the rest of the slice is shown as
it is. A model directory without ``cam_scale`` gets one from the maps of the run's own images, and a warning says so.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covidctnet.core.errors import ConfigError, CovidCTNetError, InputError, ModelDirError
from covidctnet.core.files import atomic_path, write_csv
from covidctnet.core.labels import BINARY_CLASS_NAMES
from covidctnet.core.progress import progress
from covidctnet.data.ucsd import (
    IMAGE_SUFFIXES,
    build_slice_transforms,
    load_grey,
    prepare_slice,
)
from covidctnet.evaluation.plots import plot_grad_cam
from covidctnet.inference.backends import check_backend, open_model
from covidctnet.models.grad_cam import CamScale, CamScaleConfig, cam_scale_of, log_odds_cam
from covidctnet.models.registry import DEFAULT_SLICE_MODEL

__all__ = ["PREDS_COLUMNS", "PredictSummary", "predict_slices", "predict_arrays", "grad_cam_maps", "check_threshold"]

logger = logging.getLogger(__name__)

PREDS_COLUMNS = ("file", "p_covid", "predicted", "status", "error", "model", "weights_sha256", "threshold")
"""Columns of ``OUT/preds.csv`` (docs/architecture.md)."""

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
            drawn on the model's ``cam_scale``, each with ``<stem>_cam.npy``, the raw (S, S) float32 map (log-odds
            units, over the network input).
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
        ModelDirError: the model directory is unusable, its threshold is not in [0, 1], or (with ``cam_dir``) its
            ``cam_scale`` is malformed.
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
    thr = threshold if threshold is not None else _model_threshold(config, model_dir)
    provenance = [str(config.get("name", "")), weights_sha256, repr(thr)]
    rows: list[list[str]] = []
    cams: list[Path] = []
    writer = None if cam_dir is None else _CamWriter(Path(cam_dir), config, str(model_dir or DEFAULT_SLICE_MODEL))
    for start in progress(range(0, len(files), batch_size), total=math.ceil(len(files) / batch_size),
                          desc="predict-slice"):
        batch_rows, batch_cams = _score_batch(
            files[start : start + batch_size], model, config, thr, writer, on_error
        )
        rows += [row + provenance for row in batch_rows]
        cams += batch_cams
    if writer is not None:
        writer.finish()
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


def _model_threshold(config: dict[str, Any], model_dir: str | os.PathLike | None) -> float:
    """The decision threshold the model directory records (0.5 when it records none), checked to be in [0, 1]."""
    try:
        return check_threshold(config.get("threshold", 0.5), "the model's threshold")
    except ConfigError as err:
        raise ModelDirError(f"{model_dir or DEFAULT_SLICE_MODEL}/config.yaml: {err}") from err


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
    return model, config, opened.md.sums_sha256


def _network_input(config: dict, arr: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(H, W) grey image → the (1, C, S, S) network input and the (C, S, S) prepared slice before normalisation."""
    pre = config["preprocess"]
    prepared = prepare_slice(arr, pre["size"], pre["lung_mask"])
    item = {"image": prepared[:1], **({"mask": prepared[1:2]} if pre["lung_mask"] else {})}
    x = build_slice_transforms(False, pre["size"], pre["lung_mask"])(item)["image"].float()[None]
    return x, prepared


def grad_cam_maps(model: nn.Module, config: dict, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Grad-CAM maps of COVID-19 evidence for grey-scale images, on an absolute scale.

    :func:`~covidctnet.models.grad_cam.log_odds_cam` of the model's log-odds of COVID-19, one forward and backward
    pass for all ``arrays``: a value v is a region that, were the whole slice like it, would move the log-odds by v.
    Not min-max per image nor shared by a batch: an image the model finds unremarkable gets a faint map.

    Args:
        model: a loaded torch slice model.
        config: its ``config.yaml`` as a dict (``preprocess.size``, ``preprocess.lung_mask``).
        arrays: (H, W) grey images, float in [0, 1].

    Returns:
        (N, S, S) float32 maps >= 0 over the network input (S = ``preprocess.size``), in log-odds of COVID-19 per
        region.
    """
    if not len(arrays):
        size = int(config["preprocess"]["size"])
        return np.zeros((0, size, size), np.float32)
    device = next(model.parameters()).device
    x = torch.cat([_network_input(config, arr)[0] for arr in arrays]).to(device)
    return log_odds_cam(model, x)


class _CamWriter:
    """Writes each image's ``<stem>_cam.npy`` (the raw map) at once and its ``<stem>_cam.png`` on the model's colour
    scale: at once where ``config.yaml`` records one, else at the end of the run on the scale of the run's own maps."""

    def __init__(self, cam_dir: Path, config: dict, source: str) -> None:
        self.cam_dir = cam_dir
        self.model = str(config.get("name", source))
        self.scale = CamScale.from_config(config, f"{source}/config.yaml")
        self.used: set[str] = set()
        self.pending: list[tuple[Path, np.ndarray, np.ndarray, tuple[str, str]]] = []

    def add(self, f: Path, prepared: np.ndarray, cam: np.ndarray, p: float, thr: float) -> Path:
        """Save one image's map (under a file name not yet used) and draw it now or at :meth:`finish`; returns the
        PNG's path."""
        name, k = f"{f.stem}_cam.png", 1
        while name in self.used:  # same stem in two folders
            k += 1
            name = f"{f.stem}_{k}_cam.png"
        self.used.add(name)
        # here, not up front: a run in which every image failed leaves nothing
        self.cam_dir.mkdir(parents=True, exist_ok=True)
        # the raw map beside the picture, so its values (log-odds units, over the network input) can be used
        with atomic_path(self.cam_dir / f"{name.removesuffix('.png')}.npy", suffix=".npy") as tmp:
            np.save(tmp, cam.astype(np.float32))
        call = BINARY_CLASS_NAMES[int(p >= thr)]
        titles = (f.name[:48], f"Grad-CAM, evidence for COVID-19\np_covid = {p:.3f}, threshold {thr:.4g} → {call}")
        if self.scale is None:
            self.pending.append((self.cam_dir / name, prepared[0], cam, titles))
        else:
            self._draw(self.cam_dir / name, prepared[0], cam, titles, self.scale)
        return self.cam_dir / name

    def finish(self) -> None:
        """Draw the maps that waited for the run's own scale (a model directory without ``cam_scale``)."""
        if not self.pending:
            return
        maps = np.stack([cam for _, _, cam, _ in self.pending])
        cfg = CamScaleConfig()
        try:
            scale = cam_scale_of(maps, "this run", "the images of this run", cfg)
        except ConfigError:  # no evidence anywhere: any positive top draws nothing
            scale = CamScale(1.0, cfg.percentile, cfg.show_from, "this run", "the images of this run", len(maps))
        logger.warning("%s: its config.yaml records no Grad-CAM colour scale (cam_scale), so this run's %d image(s) "
                       "set it: 0-%.3g %s (%s); colours compare within this run only (`covidctnet calibrate-cam` "
                       "records one)", self.model, len(maps), scale.value, scale.unit, scale.describe())
        for path, image, cam, titles in self.pending:
            self._draw(path, image, cam, titles, scale)
        self.pending = []

    @staticmethod
    def _draw(path: Path, image: np.ndarray, cam: np.ndarray, titles: tuple[str, str], scale: CamScale) -> None:
        note = (f"colour from {scale.floor:.2f} ({100 * scale.show_from:g}% of the top) to {scale.value:.2f}, the "
                f"model's {scale.describe()}; weaker regions not coloured")
        plot_grad_cam(path, image, cam, top=scale.value, floor=scale.floor, bar_label=scale.unit, titles=titles,
                      note=note)


def _score_batch(
    chunk: Sequence[Path],
    model: nn.Module,
    config: dict,
    thr: float,
    writer: _CamWriter | None,
    on_error: Callable[[str], None] | None,
) -> tuple[list[list[str]], list[Path]]:
    """Score one batch of image files in one forward pass; a file that cannot be read is an error row.

    Args:
        chunk: the image files.
        model: the slice model.
        config: its ``config.yaml`` as a dict.
        thr: the decision threshold on ``p_covid``.
        writer: where the Grad-CAM maps and PNGs go, or ``None`` for none.
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
    maps = iter(grad_cam_maps(model, config, good)) if writer is not None else iter(())
    for f, arr, err in zip(chunk, arrays, errors):
        if arr is None:
            (on_error or logger.error)(err)
            rows.append([str(f), "", "", "error", err])
            continue
        p = float(next(probs))
        rows.append([str(f), f"{p:.6f}", BINARY_CLASS_NAMES[int(p >= thr)], "ok", ""])
        if writer is not None:
            cams.append(writer.add(f, _network_input(config, arr)[1], next(maps), p, thr))
    return rows, cams
