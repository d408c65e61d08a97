"""Residual maps: denoise every slice with the control-trained BCDU-Net, subtract, resample to the classifier's grid.

For a preprocessed scan ``x`` (``(X, Y, Z)`` float32 in [0, 1], axis 2 = axial slices), CovidCTNet computes
``x - denoiser(x)`` slice by slice and resizes the stack to the 3D CNN's input grid (official notebook:
``c = CT_resized - model.predict(...)``, ``resize(c, (50, 128, 128))``). Whatever the denoiser, trained on control
slices only, cannot reproduce is left in the residual.

* :func:`compute_residual` (:mod:`covidctnet.inference.denoise`, re-exported here): one in-memory volume (what
  ``predict`` calls). Slices go through the denoiser in
  batches of ``batch_size`` under ``torch.inference_mode`` in eval mode, so memory is bounded by one batch plus the
  residual stack. The stack is then resized with ``skimage.transform.resize`` (linear, anti-aliased when shrinking,
  as the official code), keeping the axis order: the result is ``(size, size, depth)``, axis 2 = slices.
* :func:`~covidctnet.preprocessing.preprocess.resize_affine`: the affine of the resampled grid. Resizing maps voxel
  *edges* onto voxel edges (``skimage``/``align_corners=False`` convention), so the residual covers exactly the
  preprocessed scan's field of view and overlays on it in a viewer.
* :func:`compute_residuals`: ``covidctnet residuals`` over a preprocessed folder, with ``manifest.csv``, resume and
  per-study error isolation (:func:`covidctnet.io.batch.run_batch`).
The denoiser comes from :func:`covidctnet.inference.backends.open_model` (a model directory or a training run
directory holding ``model/``, with its hash, architecture and expected input checked), on the backend ``auto``
picks (PyTorch on CUDA; on the CPU OpenVINO or onnxruntime running a cached ONNX export, whose residuals equal
PyTorch's within 1e-4) unless one is forced.

The array order of the NIfTI is the preprocessed one (RAS, axis 2 = slices). The official CNN takes
``(depth, rows, columns)`` in its own layout: :func:`covidctnet.preprocessing.preprocess.ras_to_official_layout`
converts.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from covidctnet.core.config import load_config
from covidctnet.core.errors import ConfigError, InputError
from covidctnet.core.files import atomic_write_text
from covidctnet.core.model_dir import cached_by_model_dir
from covidctnet.inference.backends import open_model, resolve_backend
from covidctnet.inference.denoise import (
    PRECISIONS,
    check_torch_precision,
    compute_residual,
    resample_stack,
)
from covidctnet.inference.lesion_maps import cached_lesion_model, lesion_evidence
from covidctnet.io.batch import Study, discover_studies, read_manifest, run_batch
from covidctnet.io.volume import read_nifti, write_nifti
from covidctnet.models.registry import Denoiser, LesionModel, resolve_denoiser_dir
from covidctnet.preprocessing.preprocess import resize_affine

if TYPE_CHECKING:
    from covidctnet.io.batch import BatchSummary, Study

__all__ = [
    "cached_denoiser",
    "ResidualGrid",
    "read_residual_grid",
    "compute_residual",
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
# preprocess keys that change the image the denoiser sees; a mismatch between data and denoiser is refused
_PREPROCESS_KEYS = ("size_xy", "profile", "hu_min", "hu_max", "out_of_window")


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


@cached_by_model_dir(maxsize=4)
def cached_denoiser(path: str, device: str, backend: str = "auto", precision: str = "fp32") -> Denoiser:
    """The denoiser of a model directory on ``backend`` (:func:`covidctnet.inference.backends.open_model`; ``auto``
    picks by device and what is installed), loaded once per process and model directory (worker processes each get
    their own); a rewritten directory (new ``SHA256SUMS``) is loaded again.

    Raises:
        ConfigError: unknown backend, or a precision it does not offer.
        ModelDirError: not a model directory, a hash mismatch, or no denoiser.
    """
    return open_model(path, backend, device, precision).denoiser()


# --------------------------------------------------------------------------------------------------------------------
# batch


def _shape_text(shape: tuple[int, ...]) -> str:
    """``(240, 240, 50)`` → ``240x240x50``, as the manifest records shapes."""
    return "x".join(str(int(s)) for s in shape)


def residual_study(study: Study, out_dir: Path, denoiser: str, depth: int, size: int, batch_size: int,
                   device: str, precision: str = "fp32", backend: str = "auto",
                   lesion_model: str | None = None) -> dict[str, Any]:
    """Compute one study's residual and write ``out_dir/<study_id>_residual.nii.gz`` atomically (for run_batch).

    Args:
        study: a preprocessed volume (``study.path``).
        denoiser: model directory path (loaded once per process).
        depth, size, batch_size, device, precision: see :func:`compute_residual`.
        backend: see :func:`covidctnet.inference.backends.open_model`.
        lesion_model: write the lesion model's map instead (``evidence: lesion``,
            :func:`covidctnet.inference.lesion_maps.lesion_evidence`) on the same grid; the denoiser is not run.

    Returns:
        The manifest columns (:data:`RESIDUAL_COLUMNS` and ``output``).
    """
    vol = read_nifti(study.path)
    if lesion_model is not None:
        model = cached_lesion_model(lesion_model, device)
        residual = resample_stack(lesion_evidence(vol.array, vol.affine, model, batch_size), (size, size, depth))
        sha = model.weights_sha256
    else:
        den = cached_denoiser(denoiser, device, backend, precision)
        residual = compute_residual(vol.array, den, depth, size, batch_size, source=str(study.path),
                                    precision=precision)
        sha = den.weights_sha256
    name = f"{study.study_id}{RESIDUAL_SUFFIX}"
    write_nifti(residual, resize_affine(vol.affine, vol.shape, residual.shape), Path(out_dir) / name)
    logger.info("%s: %s -> residual %s (range %.3f..%.3f)", study.study_id, _shape_text(vol.shape),
                _shape_text(residual.shape), float(residual.min()), float(residual.max()))
    return {
        "output": name,
        "input_shape": _shape_text(vol.shape),
        "output_shape": _shape_text(residual.shape),
        "denoiser_sha256": sha,
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
    backend: str = "auto",
    lesion_model: str | os.PathLike | None = None,
    resume: bool = True,
    workers: int = 0,
    scheduler: str | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> BatchSummary:
    """``covidctnet residuals``: a residual NIfTI for every ``ok`` study of a preprocessed folder.

    With ``lesion_model`` the volumes written are the lesion model's maps instead (``evidence: lesion`` in
    ``residuals.yaml``, the lesion model and its hash beside the denoiser's): the input of a classifier that follows
    that evidence. The denoiser is then only recorded, so that ``train-classifier`` bundles it for slice scores.

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
        backend: ``auto``, ``torch``, ``onnx`` or ``openvino`` (:func:`covidctnet.inference.backends.open_model`);
            the one used is recorded in ``residuals.yaml``. Not part of what resume compares: the fp32 backends
            agree within 1e-4.
        resume: skip studies already done by the same denoiser, grid and precision.
        workers: worker processes (0 = inline).
        scheduler: Dask scheduler address; the studies then run on its workers (overrides ``workers``).
        on_result: called with each finished manifest row.
        lesion_model: a model directory with a ``lesion`` component (``train-lesion-model``).

    Raises:
        ConfigError: ``out_dir`` is ``preprocessed``; the data's preprocessing or size does not match the denoiser;
            ``out_dir`` holds residuals of another denoiser or grid (with ``resume``).
        ModelDirError: the denoiser cannot be loaded.
        InputError: ``preprocessed`` is not a preprocessed folder.
    """
    preprocessed, out_dir = Path(preprocessed), Path(out_dir)
    _check_arguments(preprocessed, out_dir, batch_size, precision)
    model_dir = resolve_denoiser_dir(denoiser)
    den = cached_denoiser(str(model_dir), device, backend, precision)
    used = resolve_backend(backend, device, precision, model_dir)
    if used == "torch":
        check_torch_precision(precision, den.device)  # warned once here, not once per study
    settings = _check_preprocess_match(preprocessed, den)
    studies = _preprocessed_studies(preprocessed)
    info = {"evidence": "residual", "denoiser": str(model_dir), "denoiser_sha256": den.weights_sha256,
            "depth": grid.depth, "size_xy": grid.size_xy, "precision": precision, "backend": used,
            "preprocessed": str(preprocessed), "preprocess": settings}
    lesion_dir = None if lesion_model is None else str(resolve_denoiser_dir(lesion_model).resolve())
    if lesion_dir is not None:
        info.update(evidence="lesion", lesion_model=lesion_dir,
                    lesion_model_sha256=_checked_lesion_model(lesion_dir, device, den.size_xy).weights_sha256)
    info_path = out_dir / RUN_INFO
    if resume:
        _check_resumable(info_path, info)
    fn = functools.partial(residual_study, denoiser=str(model_dir), depth=grid.depth, size=grid.size_xy,
                           batch_size=batch_size, device=device, precision=precision, backend=backend,
                           lesion_model=lesion_dir)
    summary = run_batch(studies, out_dir, fn, RESIDUAL_COLUMNS, resume=resume, workers=workers, desc="residuals",
                        on_result=on_result, scheduler=scheduler)
    if summary.n_ok + summary.n_skipped > 0:
        atomic_write_text(info_path, yaml.safe_dump(info, sort_keys=False))
    return summary


def _check_arguments(preprocessed: Path, out_dir: Path, batch_size: int, precision: str) -> None:
    """Refuse bad folders and settings before anything is loaded."""
    if not preprocessed.is_dir():
        raise InputError(f"{preprocessed}: no such folder; PREPROCESSED must be an output folder of "
                         "`covidctnet preprocess`")
    if out_dir.resolve() == preprocessed.resolve():
        raise ConfigError(f"{out_dir}: -o must differ from PREPROCESSED (its manifest.csv would be overwritten)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, not {batch_size}")
    if precision not in PRECISIONS:
        raise ConfigError(f"'precision' must be one of {list(PRECISIONS)}, not {precision!r}")


def _checked_lesion_model(lesion_dir: str, device: str, size_xy: int) -> LesionModel:
    """The lesion model whose maps are written, refused unless it takes the preprocessed slices' size."""
    lesion = cached_lesion_model(lesion_dir, device)
    if lesion.size_xy != size_xy:
        raise ConfigError(f"{lesion_dir}: the lesion model takes {lesion.size_xy}x{lesion.size_xy} slices, the "
                          f"preprocessed data are {size_xy}x{size_xy}")
    return lesion


def _check_resumable(info_path: Path, info: dict[str, Any]) -> None:
    """Refuse to resume into a folder of residuals made with another denoiser, grid, precision or evidence."""
    if not info_path.is_file():
        return
    old = yaml.safe_load(info_path.read_text()) or {}
    # residuals.yaml files written before `precision` existed were fp32
    changed = [k for k in ("denoiser_sha256", "depth", "size_xy", "precision", "evidence", "lesion_model_sha256")
               if old.get(k, {"precision": "fp32", "evidence": "residual"}.get(k)) != info.get(k)]
    if changed:
        raise ConfigError(f"{info_path}: {info_path.parent} holds residuals made with another "
                          f"{' / '.join(changed)} ({', '.join(f'{k}={old.get(k)!r}' for k in changed)}); "
                          "use a new output folder or --no-resume")
