"""Residual maps: denoise every slice with the control-trained BCDU-Net, subtract, resample to the classifier's grid.

For a preprocessed scan ``x`` (``(X, Y, Z)`` float32 in [0, 1], axis 2 = axial slices), CovidCTNet computes
``x - denoiser(x)`` slice by slice and resizes the stack to the 3D CNN's input grid (official notebook:
``c = CT_resized - model.predict(...)``, ``resize(c, (50, 128, 128))``). Whatever the denoiser, trained on control
slices only, cannot reproduce is left in the residual.

* :func:`compute_residual`: one in-memory volume (what ``predict`` calls). Slices go through the denoiser in
  batches of ``batch_size`` under ``torch.inference_mode`` in eval mode, so memory is bounded by one batch plus the
  residual stack. The stack is then resized with ``skimage.transform.resize`` (linear, anti-aliased when shrinking,
  as the official code), keeping the axis order: the result is ``(size, size, depth)``, axis 2 = slices.
* :func:`residual_affine`: the affine of the resampled grid. Resizing maps voxel *edges* onto voxel edges
  (``skimage``/``align_corners=False`` convention), so the residual covers exactly the preprocessed scan's field of
  view and overlays on it in a viewer.
* :func:`compute_residuals`: ``covidctnet residuals`` over a preprocessed folder, with ``manifest.csv``, resume and
  per-study error isolation (:func:`covidctnet.io.batch.run_batch`).
The denoiser comes from :func:`covidctnet.models.registry.load_denoiser` (a model directory or a training run
directory holding ``model/``, with its hash, architecture and expected input checked).

The array order of the NIfTI is the preprocessed one (RAS, axis 2 = slices). The official CNN takes
``(depth, rows, columns)`` in its own layout: :func:`covidctnet.preprocessing.preprocess.ras_to_official_layout`
converts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from skimage.transform import resize

from covidctnet.core.config import load_config
from covidctnet.core.device import resolve_device
from covidctnet.core.errors import ConfigError, InputError, ShapeError
from covidctnet.core.files import atomic_write_text
from covidctnet.core.model_dir import dir_stamp
from covidctnet.core.progress import progress_task
from covidctnet.io.batch import Study, discover_studies, read_manifest, run_batch
from covidctnet.io.volume import read_nifti, write_nifti
from covidctnet.models.registry import Denoiser, load_denoiser, resolve_denoiser_dir

if TYPE_CHECKING:
    from covidctnet.io.batch import BatchSummary, Study

__all__ = [
    "cached_denoiser",
    "ResidualGrid",
    "read_residual_grid",
    "compute_residual",
    "residual_affine",
    "resample_stack",
    "residual_study",
    "compute_residuals",
    "RESIDUAL_COLUMNS",
    "RESIDUAL_SUFFIX",
    "PRECISIONS",
]

logger = logging.getLogger(__name__)

RESIDUAL_SUFFIX = "_residual.nii.gz"
RESIDUAL_COLUMNS = ("input_shape", "output_shape", "denoiser_sha256", "residual_min", "residual_max",
                    "residual_mean_abs")
"""Stage columns of ``OUT/manifest.csv`` after the common ones (``study_id, source, label, status, error, output,
sha256``)."""

RUN_INFO = "residuals.yaml"
PRECISIONS = ("fp32", "bf16")
"""Denoiser arithmetic: ``fp32`` (exact, the default) or ``bf16`` (autocast + channels-last; several times faster on
CPUs with AMX/AVX512-BF16 and on recent GPUs, denoised values within about 3e-3 of fp32)."""
# preprocess keys that change the image the denoiser sees; a mismatch between data and denoiser is refused
_PREPROCESS_KEYS = ("size_xy", "profile", "hu_min", "hu_max", "out_of_window")
_RANGE_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------------------------------
# grid config


@dataclass(frozen=True)
class ResidualGrid:
    """Settings of ``covidctnet residuals`` (defaults = ``configs/residuals.yaml``): the classifier's input grid.

    Attributes:
        depth: slices of the residual stack after resampling along z (official 50).
        size_xy: in-plane size of the residual stack (voxels); 240 by default, 128 for the official CNN.
    """

    depth: int = 50
    size_xy: int = 240

    def __post_init__(self) -> None:
        for key in ("depth", "size_xy"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2048:
                raise ConfigError(f"'{key}' must be an integer in [1, 2048], not {value!r}")


def read_residual_grid(path: str | os.PathLike | None = None, depth: int | None = None,
                       size_xy: int | None = None) -> ResidualGrid:
    """The residual grid: defaults, then the YAML at ``path`` (``configs/residuals.yaml`` layout), then overrides.

    Args:
        path: YAML file with ``depth`` and/or ``size_xy``; ``None``: the defaults (50, 240).
        depth, size_xy: command-line overrides (``None``: not given).

    Raises:
        ConfigError: unreadable YAML, an unknown key or a bad value (the message names the key and file).
    """
    return load_config(ResidualGrid, path, {"depth": depth, "size_xy": size_xy})


# --------------------------------------------------------------------------------------------------------------------
# denoiser


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, device: str, stamp: tuple[int, int]) -> Denoiser:
    return load_denoiser(path, device)


def cached_denoiser(path: str, device: str) -> Denoiser:
    """One load per process and model directory (worker processes each get their own); a rewritten directory
    (new ``SHA256SUMS``) is loaded again."""
    return _load_cached(path, device, dir_stamp(path))


# --------------------------------------------------------------------------------------------------------------------
# one volume


def residual_affine(affine: np.ndarray, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> np.ndarray:
    """Affine of a volume resized from ``in_shape`` to ``out_shape`` over the same field of view.

    With the ``align_corners=False`` convention of ``skimage.transform.resize``, output voxel ``o`` sits at input
    index ``(o + 0.5) * s - 0.5`` with ``s = n_in / n_out`` per axis, so voxel edges ``-0.5`` and ``n - 0.5`` of both
    grids coincide.

    Args:
        affine: (4, 4) voxel → world (mm) of the input.
        in_shape, out_shape: the first three dimensions are used.

    Returns:
        (4, 4) float64 affine of the output grid.
    """
    scale = np.array(in_shape[:3], dtype=np.float64) / np.array(out_shape[:3], dtype=np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = (scale - 1.0) / 2.0
    return np.asarray(affine, dtype=np.float64) @ index_map


def _check_volume(volume: np.ndarray, expected: int | None, source: str) -> None:
    if volume.ndim != 3:
        raise ShapeError(f"{source}: expected a 3-D preprocessed volume (X, Y, Z), not shape {tuple(volume.shape)}")
    if expected is not None and volume.shape[:2] != (expected, expected):
        raise ShapeError(f"{source}: in-plane size {volume.shape[0]}x{volume.shape[1]}, the denoiser expects "
                         f"{expected}x{expected}; preprocess with --size {expected}")
    if not np.isfinite(volume).all():
        raise InputError(f"{source}: the volume holds NaN or infinite values")
    lo, hi = float(volume.min()), float(volume.max())
    if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        raise InputError(f"{source}: intensities span {lo:.4g}..{hi:.4g}, expected a preprocessed volume in [0, 1]; "
                         "run `covidctnet preprocess` first")


def _check_precision(precision: str, device: Any) -> None:
    """Refuse an unknown precision; warn when bf16 would be emulated (slower than fp32) on ``device``.

    Raises:
        ConfigError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"'precision' must be one of {list(PRECISIONS)}, not {precision!r}")
    if precision != "bf16":
        return
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not native:
        logger.warning("bf16: %s has no native bfloat16 support; the denoiser will be slower than in fp32", device)


def _autocast(precision: str, device: Any) -> Any:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_residual(
    volume_array: np.ndarray,
    model: Any,
    depth: int = 50,
    size: int = 240,
    batch_size: int = 8,
    device: str | Any | None = None,
    source: str = "volume",
    precision: str = "fp32",
) -> np.ndarray:
    """Residual ``input - denoised`` of a preprocessed volume, resampled to ``(size, size, depth)``.

    Args:
        volume_array: ``(X, Y, Z)`` float32 in [0, 1], axis 2 = axial slices (a ``covidctnet preprocess`` output,
            e.g. ``nib.load(p).get_fdata(dtype=np.float32)``); ``X == Y`` must be the denoiser's input size.
        model: a :class:`Denoiser` from :func:`load_denoiser` (its input size is checked), or a bare BCDU-Net.
        depth: slices of the output (official 50).
        size: in-plane size of the output.
        batch_size: slices per forward pass (memory: one batch of activations).
        device: where to run; ``None``: the model's device (a :class:`Denoiser` knows it).
        source: name for error messages (file or study id).
        precision: ``fp32`` or ``bf16`` (see :data:`PRECISIONS`; a PyTorch model only).

    Returns:
        ``(size, size, depth)`` float32, signed (positive where the slice is brighter than its denoised version).
        Use :func:`residual_affine` for its affine.

    Raises:
        ShapeError: not 3-D, or the in-plane size is not the denoiser's.
        InputError: non-finite values or values outside [0, 1] (not preprocessed).
    """
    expected = model.size_xy if isinstance(model, Denoiser) else None
    net = model.model if isinstance(model, Denoiser) else model
    if device is None:
        dev = model.device if isinstance(model, Denoiser) else next(net.parameters()).device
    else:
        dev = device if isinstance(device, torch.device) else resolve_device(device)
    if batch_size < 1 or depth < 1 or size < 1:
        raise ConfigError(f"batch_size, depth and size must be >= 1, not {batch_size}, {depth}, {size}")
    _check_precision(precision, dev)
    volume = np.asarray(volume_array, dtype=np.float32)
    _check_volume(volume, expected, source)
    was_training = net.training
    # oneDNN's bf16 convolutions are fast in NHWC; fp32 keeps the default layout so that its results do not move
    layout = torch.channels_last if precision == "bf16" else torch.contiguous_format
    net.eval()
    net.to(dev, memory_format=layout)
    residual = np.empty(volume.shape, dtype=np.float32)
    # per-slice progress: on a CPU a 300-slice study takes about a minute, one item of the batch's progress
    bar = progress_task(volume.shape[2], f"denoise {Path(source).name}", "slices")
    try:
        with torch.inference_mode(), _autocast(precision, dev), bar:
            for k in range(0, volume.shape[2], batch_size):
                chunk = np.ascontiguousarray(np.moveaxis(volume[:, :, k : k + batch_size], 2, 0))  # (b, X, Y)
                x = torch.from_numpy(chunk)[:, None].to(dev, memory_format=layout)
                denoised = net(x).float()
                residual[:, :, k : k + batch_size] = np.moveaxis((x - denoised)[:, 0].cpu().numpy(), 0, 2)
                bar.advance(chunk.shape[0])
    finally:
        net.train(was_training)
        if precision == "bf16":
            net.to(memory_format=torch.contiguous_format)
    return resample_stack(residual, (size, size, depth))


def resample_stack(array: np.ndarray, out_shape: tuple[int, int, int]) -> np.ndarray:
    """Resize a ``(X, Y, Z)`` array to ``out_shape`` over the same field of view (affine: :func:`residual_affine`).

    As the official code: ``skimage.transform.resize``, linear, reflect mode, Gaussian anti-aliasing along the
    shrunk axes; values are not clipped or rescaled (signed residuals stay signed).

    Returns:
        ``out_shape`` float32 (the input itself when the shape already matches).
    """
    if tuple(array.shape) == tuple(out_shape):
        return np.asarray(array, dtype=np.float32)
    return resize(array, out_shape, order=1, mode="reflect", anti_aliasing=True, preserve_range=True).astype(
        np.float32)


# --------------------------------------------------------------------------------------------------------------------
# batch


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def residual_study(study: Study, out_dir: Path, denoiser: str, depth: int, size: int, batch_size: int,
                   device: str, precision: str = "fp32") -> dict[str, Any]:
    """Compute one study's residual and write ``out_dir/<study_id>_residual.nii.gz`` atomically (for run_batch).

    Args:
        study: a preprocessed volume (``study.path``).
        denoiser: model directory path (loaded once per process).
        depth, size, batch_size, device, precision: see :func:`compute_residual`.

    Returns:
        The manifest columns (:data:`RESIDUAL_COLUMNS` and ``output``).
    """
    den = cached_denoiser(denoiser, device)
    vol = read_nifti(study.path)
    residual = compute_residual(vol.array, den, depth, size, batch_size, source=str(study.path), precision=precision)
    name = f"{study.study_id}{RESIDUAL_SUFFIX}"
    write_nifti(residual, residual_affine(vol.affine, vol.shape, residual.shape), Path(out_dir) / name)
    logger.info("%s: %s -> residual %s (range %.3f..%.3f)", study.study_id, _fmt(vol.shape), _fmt(residual.shape),
                float(residual.min()), float(residual.max()))
    return {
        "output": name,
        "input_shape": _fmt(vol.shape),
        "output_shape": _fmt(residual.shape),
        "denoiser_sha256": den.weights_sha256,
        "residual_min": f"{float(residual.min()):.6g}",
        "residual_max": f"{float(residual.max()):.6g}",
        "residual_mean_abs": f"{float(np.abs(residual).mean()):.6g}",
    }


def _preprocessed_studies(folder: Path) -> list[Study]:
    rows = read_manifest(folder / "manifest.csv")
    if rows:
        studies = [Study(r["study_id"], folder / r["output"], r["output"], r.get("label") or None)
                   for r in rows if r.get("status") == "ok" and r.get("output")]
        if not studies:
            raise InputError(f"{folder / 'manifest.csv'}: no study with status ok")
        return studies
    logger.warning("%s: no manifest.csv; taking every NIfTI file in the folder as a preprocessed study", folder)
    return [s for s in discover_studies([folder]) if not s.path.name.endswith(RESIDUAL_SUFFIX)]


def _check_preprocess_match(folder: Path, den: Denoiser) -> dict[str, Any]:
    """Compare the folder's ``preprocess.yaml`` with what the denoiser was trained on; refuse a mismatch."""
    path = folder / "preprocess.yaml"
    if not path.is_file():
        logger.warning("%s missing: cannot check the preprocessing against the denoiser's; checking sizes only", path)
        return {}
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from err
    if settings.get("size_xy") != den.size_xy:
        raise ConfigError(f"{path}: size_xy {settings.get('size_xy')}, but the denoiser {den.path} expects "
                          f"{den.size_xy}; preprocess with --size {den.size_xy} or use a matching denoiser")
    diff = [k for k in _PREPROCESS_KEYS if k in den.preprocess and settings.get(k) != den.preprocess[k]]
    if diff:
        pairs = ", ".join(f"{k}: data {settings.get(k)!r} vs denoiser {den.preprocess[k]!r}" for k in diff)
        raise ConfigError(f"{path}: preprocessed differently from the denoiser's training data ({pairs}); "
                          "preprocess again with the denoiser's settings (its config.yaml, key preprocess)")
    return settings


def compute_residuals(
    preprocessed: str | os.PathLike,
    out_dir: str | os.PathLike,
    denoiser: str | os.PathLike,
    grid: ResidualGrid = ResidualGrid(),
    *,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "fp32",
    resume: bool = True,
    workers: int = 0,
    scheduler: str | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> BatchSummary:
    """``covidctnet residuals``: a residual NIfTI for every ``ok`` study of a preprocessed folder.

    Writes ``out_dir/<study_id>_residual.nii.gz`` (float32, ``grid.size_xy`` × ``grid.size_xy`` × ``grid.depth``,
    overlaying on the preprocessed scan), ``out_dir/manifest.csv`` (:data:`RESIDUAL_COLUMNS`) and
    ``out_dir/residuals.yaml`` (denoiser, its hash, the grid, the preprocessing). One bad study is recorded as an
    error and the others go on; with ``resume``, studies already ``ok`` with an unchanged output are skipped.

    Args:
        preprocessed: a ``covidctnet preprocess`` output folder.
        out_dir: output folder; must differ from ``preprocessed``.
        denoiser: model directory or ``train-denoiser`` run folder.
        grid: output grid (``configs/residuals.yaml``).
        batch_size: slices per forward pass.
        device: ``auto`` / ``cpu`` / ``cuda``.
        precision: ``fp32`` or ``bf16`` denoiser arithmetic (:data:`PRECISIONS`); recorded in ``residuals.yaml``.
        resume: skip studies already done by the same denoiser, grid and precision.
        workers: worker processes (0 = inline).
        scheduler: Dask scheduler address; the studies then run on its workers (overrides ``workers``).
        on_result: called with each finished manifest row.

    Raises:
        ConfigError: ``out_dir`` is ``preprocessed``; the data's preprocessing or size does not match the denoiser;
            ``out_dir`` holds residuals of another denoiser or grid (with ``resume``).
        ModelDirError: the denoiser cannot be loaded.
        InputError: ``preprocessed`` is not a preprocessed folder.
    """
    preprocessed, out_dir = Path(preprocessed), Path(out_dir)
    if not preprocessed.is_dir():
        raise InputError(f"{preprocessed}: no such folder; PREPROCESSED must be an output folder of "
                         "`covidctnet preprocess`")
    if out_dir.resolve() == preprocessed.resolve():
        raise ConfigError(f"{out_dir}: -o must differ from PREPROCESSED (its manifest.csv would be overwritten)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, not {batch_size}")
    model_dir = resolve_denoiser_dir(denoiser)
    den = cached_denoiser(str(model_dir), device)
    _check_precision(precision, den.device)  # refused once here, not once per study
    settings = _check_preprocess_match(preprocessed, den)
    studies = _preprocessed_studies(preprocessed)
    info = {"denoiser": str(model_dir), "denoiser_sha256": den.weights_sha256, "depth": grid.depth,
            "size_xy": grid.size_xy, "precision": precision, "preprocessed": str(preprocessed), "preprocess": settings}
    info_path = out_dir / RUN_INFO
    if resume and info_path.is_file():
        old = yaml.safe_load(info_path.read_text()) or {}
        # residuals.yaml files written before `precision` existed were fp32
        changed = [k for k in ("denoiser_sha256", "depth", "size_xy", "precision")
                   if old.get(k, "fp32" if k == "precision" else None) != info[k]]
        if changed:
            raise ConfigError(f"{info_path}: {out_dir} holds residuals made with another "
                              f"{' / '.join(changed)} ({', '.join(f'{k}={old.get(k)!r}' for k in changed)}); "
                              "use a new output folder or --no-resume")
    fn = functools.partial(residual_study, denoiser=str(model_dir), depth=grid.depth, size=grid.size_xy,
                           batch_size=batch_size, device=device, precision=precision)
    summary = run_batch(studies, out_dir, fn, RESIDUAL_COLUMNS, resume=resume, workers=workers, desc="residuals",
                        on_result=on_result, scheduler=scheduler)
    if summary.n_ok + summary.n_skipped > 0:
        atomic_write_text(info_path, yaml.safe_dump(info, sort_keys=False))
    return summary
