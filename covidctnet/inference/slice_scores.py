"""``covidctnet slice-scores``: per original slice, how much of the lung the denoiser could not reproduce.

For each scan (DICOM folder, NIfTI/NRRD file), ``OUT/<study_id>_slices.csv`` holds one row per **original input
slice**, in ascending z:

* ``study_id``, ``slice`` (0-based, ascending z), ``z_mm``: the slice centre's world z (mm, patient superior; for an
  axial DICOM series this is ImagePositionPatient z, since LPS and RAS share the z axis);
* ``lung_ml``: lung volume in that slice (3D lung mask of :mod:`covidctnet.preprocessing.lungmask3d`, on the original
  grid): the lung cross-section times the slice spacing;
* ``residual_score``: a statistic (``SliceScoresConfig.statistic``) of the residual ``input - denoised`` inside the
  lungs. The residual is computed as in ``covidctnet residuals`` (preprocessed 1 mm grid, the denoiser's in-plane
  size) but **not** resampled to the classifier's 50 slices; the lung mask is resampled onto that grid, and the
  residual voxels of the grid slices whose centres lie inside the original slice (within half its spacing; the nearest
  one when none does) are pooled;
* ``hu_score``: a transparent density baseline: the fraction of the slice's lung voxels with
  ``hu_low <= HU <= hu_high`` (ground glass and denser), on the original grid;
* ``residual_mean_pos``, ``residual_mean_abs``, ``residual_p95``, ``residual_frac_pos``: every candidate statistic,
  so that the choice of ``residual_score`` can be checked (docs/validation.md says how it was made).

Slices without lung have an empty ``residual_score`` and ``hu_score``. A scan with less lung than ``min_lung_ml``
fails the chest-coverage check (:class:`~covidctnet.core.errors.NoLungsError`, "no lungs found: not a chest CT?") and
gets no CSV. ``OUT/manifest.csv`` as the other batch commands (resume, bad study recorded, exit 1 when some
failed, 2 when all did).
"""

from __future__ import annotations

import csv
import functools
import io as _io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from covidctnet.core.errors import ConfigError, ModelDirError
from covidctnet.core.files import atomic_write_text
from covidctnet.core.model_dir import load_model_dir
from covidctnet.core.slice_table import SLICE_COLUMNS, SLICES_SUFFIX
from covidctnet.inference.backends import check_precision
from covidctnet.inference.lesion_maps import cached_lesion_model, lesion_preprocess, lesion_probability
from covidctnet.inference.residuals import cached_denoiser, compute_residual
from covidctnet.io.batch import discover_studies, run_batch
from covidctnet.io.checks import check_volume
from covidctnet.io.volume import read_volume
from covidctnet.models.registry import LESION_COMPONENT, LesionModel, resolve_denoiser_dir
from covidctnet.preprocessing.lungmask3d import mask_to_grid, ras_lung_mask
from covidctnet.preprocessing.preprocess import preprocess_record, preprocess_volume, to_ras

if TYPE_CHECKING:
    from covidctnet.io.batch import BatchSummary, Study
    from covidctnet.io.volume import Volume
    from covidctnet.preprocessing.lungmask3d import LungMask

__all__ = [
    "SliceScoresConfig",
    "STATISTICS",
    "residual_statistics",
    "score_residual",
    "score_volume",
    "resolve_evidence",
    "slice_scores",
    "write_slices_csv",
]

logger = logging.getLogger(__name__)

STATISTICS = ("mean_pos", "mean_abs", "p95", "frac_pos")
"""Candidate residual statistics inside the lungs: mean of max(r, 0); mean |r|; 95th percentile of r; fraction of
voxels with r > ``frac_threshold``."""
MANIFEST_COLUMNS = ("n_slices", "lung_ml_total", "evidence", "statistic", "denoiser", "denoiser_sha256",
                    "lesion_model_sha256")
EVIDENCE = ("residual", "lesion", "hu")
"""What ``evidence_score`` can be: the denoiser's ``residual_score``, the lesion model's ``lesion_score``, or the
density baseline ``hu_score``."""


@dataclass(frozen=True)
class SliceScoresConfig:
    """Settings of ``covidctnet slice-scores`` (defaults = ``configs/slice_scores.yaml``).

    Attributes:
        evidence: which score is the slice's ``evidence_score`` (see :data:`EVIDENCE`); ``lesion`` needs a model
            directory with a ``lesion`` component; ``auto``: ``lesion`` when a lesion model is there (the bundled
            model has one: the rule in docs/evidence_selection_rule.md chose it, figures in docs/validation.md),
            else ``residual``.
        statistic: which candidate is ``residual_score`` (see :data:`STATISTICS`). ``p95``, the 95th percentile
            of the residual inside the slice's lungs, was chosen for the bundled denoiser on the shared P001, cap001
            and normal001 series by the rule written before any AUC was seen (docs/validation.md).
        frac_threshold: residual above which a voxel counts for ``frac_pos`` (intensity units of [0, 1]).
        hu_low, hu_high: HU range counted by ``hu_score`` (ground glass and denser lung).
        min_lung_ml: chest-coverage check: scans with less lung (ml) are refused.
        batch_size: slices per denoiser forward pass.
        device: ``auto`` / ``cpu`` / ``cuda[:N]``.
        precision: denoiser arithmetic, ``fp32`` or ``bf16``.
        backend: where the denoiser runs: ``auto``, ``torch``, ``onnx`` or ``openvino``
            (:mod:`covidctnet.inference.backends`).
    """

    evidence: Literal["auto", "residual", "lesion", "hu"] = "auto"
    statistic: Literal["mean_pos", "mean_abs", "p95", "frac_pos"] = "p95"
    frac_threshold: float = 0.05
    hu_low: float = -750.0
    hu_high: float = -300.0
    min_lung_ml: float = 500.0
    batch_size: int = 8
    device: str = "auto"
    precision: str = "fp32"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.hu_high <= self.hu_low:
            raise ConfigError(f"'hu_high' must be greater than 'hu_low', not {self.hu_high} <= {self.hu_low}")
        if not 0.0 < self.frac_threshold < 1.0:
            raise ConfigError(f"'frac_threshold' must be in (0, 1), not {self.frac_threshold}")
        if self.min_lung_ml < 0:
            raise ConfigError(f"'min_lung_ml' must be >= 0, not {self.min_lung_ml}")
        if self.batch_size < 1:
            raise ConfigError(f"'batch_size' must be >= 1, not {self.batch_size}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"'precision' must be one of ['fp32', 'bf16'], not {self.precision!r}")
        check_precision(self.backend, self.precision)


def residual_statistics(values: np.ndarray, frac_threshold: float = 0.05) -> dict[str, float]:
    """Every candidate statistic of residual values inside the lungs.

    Args:
        values: (N,) residuals (input − denoised, [0, 1] intensity units) of the lung voxels.

    Returns:
        ``{name: value}`` for each name in :data:`STATISTICS` (NaN when ``values`` is empty).
    """
    if values.size == 0:
        return {k: float("nan") for k in STATISTICS}
    return {
        "mean_pos": float(np.mean(np.maximum(values, 0.0))),
        "mean_abs": float(np.mean(np.abs(values))),
        "p95": float(np.percentile(values, 95)),
        "frac_pos": float(np.mean(values > frac_threshold)),
    }


def _slice_centres_z(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World z (mm) of the centre of each slice along axis 2."""
    k = np.arange(shape[2], dtype=np.float64)
    ijk = np.stack([np.full_like(k, (shape[0] - 1) / 2), np.full_like(k, (shape[1] - 1) / 2), k, np.ones_like(k)])
    return (affine @ ijk)[2]


def score_volume(volume: Volume, denoiser: Any, preprocess: Any, cfg: SliceScoresConfig = SliceScoresConfig(),
                 study_id: str = "", lungs: LungMask | None = None,
                 lesion_model: LesionModel | None = None) -> list[dict[str, Any]]:
    """Slice scores of one CT.

    Args:
        volume: the CT in HU (checked beforehand with :func:`covidctnet.io.checks.check_volume`).
        denoiser: a :class:`covidctnet.inference.residuals.Denoiser`.
        preprocess: the :class:`covidctnet.preprocessing.preprocess.PreprocessConfig` the denoiser was trained with.
        cfg: statistic, HU range, chest-coverage minimum.
        study_id: written in each row.
        lungs: a lung mask on the volume's RAS grid to use instead of computing one (e.g. the mask of the clean scan
            when lesions were inserted into it); the chest-coverage check is then not run.
        lesion_model: the lesion model (:mod:`covidctnet.inference.lesion_maps`); adds ``lesion_score``.

    Returns:
        One dict per original slice (ascending z) with the :data:`SLICE_COLUMNS` and ``residual_<statistic>`` keys
        (and ``lesion_score`` with a lesion model).

    Raises:
        NoLungsError: the chest-coverage check failed.
    """

    if lungs is None:
        hu, affine, lungs = ras_lung_mask(volume, cfg.min_lung_ml)
    else:

        hu, affine = to_ras(volume)
        if lungs.mask.shape != hu.shape:
            raise ValueError(f"lung mask shape {lungs.mask.shape} differs from the volume's {hu.shape}")
    array, pre_affine = preprocess_volume(volume, preprocess)
    residual = compute_residual(array, denoiser, depth=array.shape[2], size=array.shape[0],
                                batch_size=cfg.batch_size, source=str(volume.source), precision=cfg.precision)
    lesion = None
    if lesion_model is not None:
        lesion_pre = lesion_preprocess(lesion_model)
        if lesion_pre != preprocess:
            array, pre_affine = preprocess_volume(volume, lesion_pre)
        lesion = (lesion_probability(array, mask_to_grid(lungs.mask > 0, array.shape), lesion_model,
                                     cfg.batch_size), pre_affine)
    return score_residual(hu, affine, lungs, residual, pre_affine, cfg, study_id, lesion)


def score_residual(hu: np.ndarray, affine: np.ndarray, lungs: LungMask, residual: np.ndarray,
                   pre_affine: np.ndarray, cfg: SliceScoresConfig = SliceScoresConfig(),
                   study_id: str = "", lesion: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Slice scores of one CT from its residual, already computed (``predict --slice-scores`` passes the residual of
    its own denoising pass; :func:`score_volume` computes one).

    Args:
        hu, affine, lungs: the CT in RAS and its lung mask (:func:`ras_lung_mask`).
        residual: ``(X, Y, Z)`` residual on the preprocessed grid, not resampled (:func:`compute_residual` with
            ``depth``/``size`` of the preprocessed array).
        pre_affine: the preprocessed grid's (4, 4) affine.
        cfg, study_id: as for :func:`score_volume`.
        lesion: ``(probability, affine)``: the lesion model's (S, S, Z) map
            (:func:`~covidctnet.inference.lesion_maps.lesion_probability`) and its grid's affine, or None.

    Returns:
        As :func:`score_volume`.
    """
    z_orig = _slice_centres_z(affine, hu.shape)
    dz = float(np.linalg.norm(affine[:3, 2]))
    lung = lungs.mask > 0
    slice_ml = lungs.slice_ml()
    in_range = (hu >= cfg.hu_low) & (hu <= cfg.hu_high)
    n_lung = np.count_nonzero(lung, axis=(0, 1))
    hu_frac = np.count_nonzero(in_range & lung, axis=(0, 1)) / np.maximum(n_lung, 1)

    grid_lung = mask_to_grid(lung, residual.shape)
    near = _near_slices(_slice_centres_z(pre_affine, residual.shape), z_orig, dz)
    if lesion is not None:
        lesion_map, lesion_affine = lesion
        lesion_lung = mask_to_grid(lung, lesion_map.shape)
        lesion_near = _near_slices(_slice_centres_z(lesion_affine, lesion_map.shape), z_orig, dz)

    evidence = resolve_evidence(cfg.evidence, lesion is not None)
    rows: list[dict[str, Any]] = []
    for k in range(hu.shape[2]):
        values = residual[:, :, near[k]][grid_lung[:, :, near[k]]]
        stats = residual_statistics(values, cfg.frac_threshold) if n_lung[k] else residual_statistics(values[:0])
        row = {
            "study_id": study_id,
            "slice": k,
            "z_mm": float(z_orig[k]),
            "lung_ml": float(slice_ml[k]),
            "residual_score": stats[cfg.statistic],
            "hu_score": float(hu_frac[k]) if n_lung[k] else float("nan"),
            **{f"residual_{name}": value for name, value in stats.items()},
        }
        if lesion is not None:
            probs = lesion_map[:, :, lesion_near[k]][lesion_lung[:, :, lesion_near[k]]]
            row["lesion_score"] = float(probs.mean()) if n_lung[k] and probs.size else float("nan")
        row["evidence"] = evidence
        row["evidence_score"] = row.get(f"{evidence}_score", float("nan"))
        rows.append(row)
    return rows  # ascending z: the RAS array runs from inferior to superior along axis 2


def resolve_evidence(evidence: str, has_lesion_model: bool) -> str:
    """The evidence a run writes: ``auto`` is ``lesion`` with a lesion model, else ``residual``."""
    if evidence == "auto":
        return "lesion" if has_lesion_model else "residual"
    return evidence


def _near_slices(z_grid: np.ndarray, z_orig: np.ndarray, dz: float) -> list[np.ndarray]:
    """For each original slice, the grid slices whose centres lie inside it (within half its spacing ``dz``), or
    the nearest one when none does."""
    out = []
    for z in z_orig:
        near = np.flatnonzero(np.abs(z_grid - z) <= dz / 2 + 1e-6)
        out.append(near if near.size else np.array([int(np.argmin(np.abs(z_grid - z)))]))
    return out


def _csv_number(value: float) -> str:
    """A slice-table cell: six significant digits, empty for NaN (no lung in the slice)."""
    return "" if not np.isfinite(value) else f"{value:.6g}"


def write_slices_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write ``<id>_slices.csv`` atomically (contract columns, ``lesion_score`` when computed, then the candidate
    residual statistics)."""

    lesion = ["lesion_score"] if rows and "lesion_score" in rows[0] else []
    columns = list(SLICE_COLUMNS) + lesion + [f"residual_{s}" for s in STATISTICS]
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row[c] if c in ("study_id", "slice", "evidence") else
                         (f"{row[c]:.3f}" if c == "z_mm" else _csv_number(row[c])) for c in columns])
    atomic_write_text(Path(path), buf.getvalue())


# --------------------------------------------------------------------------------------------------------------------
# batch


def _load(path: str, device: str, backend: str = "auto", precision: str = "fp32") -> tuple[Any, Any]:
    """The denoiser (one load per process, reloaded when the directory is rewritten) and the preprocessing it expects.

    Raises:
        ModelDirError: an unusable directory or preprocessing that does not fit the denoiser's input.
    """
    den = cached_denoiser(path, device, backend, precision)
    pre = preprocess_record(den.preprocess or {"size_xy": den.size_xy}, den.path)
    if pre.size_xy != den.size_xy:
        raise ModelDirError(f"{den.path}: preprocess size_xy {pre.size_xy} differs from the denoiser's input "
                            f"{den.size_xy}")
    return den, pre


def _lesion_model_dir(denoiser: str, lesion_model: str | os.PathLike | None, cfg: SliceScoresConfig) -> str | None:
    """The lesion model to use: the one given, else the denoiser's model directory when it has a ``lesion``
    component, else None.

    Raises:
        ModelDirError: ``evidence: lesion`` without a lesion model.
    """
    if lesion_model is not None:
        return str(resolve_denoiser_dir(lesion_model).resolve())
    if LESION_COMPONENT in (load_model_dir(denoiser).config.get("components") or {}):
        return denoiser
    if cfg.evidence == "lesion":
        raise ModelDirError(f"{denoiser}: no lesion component, which --evidence lesion needs: give --lesion-model DIR "
                            "(a train-lesion-model run) or choose --evidence residual or hu")
    return None


def _score_study(study: Study, out_dir: Path, denoiser: str, cfg: SliceScoresConfig,
                 lesion_model: str | None = None) -> dict[str, Any]:
    den, pre = _load(denoiser, cfg.device, cfg.backend, cfg.precision)
    lesion = cached_lesion_model(lesion_model, cfg.device) if lesion_model else None
    volume = read_volume(study.path)
    check_volume(volume, pre.limits)
    rows = score_volume(volume, den, pre, cfg, study.study_id, lesion_model=lesion)
    name = f"{study.study_id}{SLICES_SUFFIX}"
    write_slices_csv(rows, out_dir / name)
    return {
        "output": name,
        "n_slices": len(rows),
        "lung_ml_total": f"{sum(r['lung_ml'] for r in rows):.0f}",
        "evidence": resolve_evidence(cfg.evidence, lesion is not None),
        "statistic": cfg.statistic,
        "denoiser": str(den.path),
        "denoiser_sha256": den.weights_sha256,
        "lesion_model_sha256": lesion.weights_sha256 if lesion is not None else "",
    }


def slice_scores(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    denoiser: str | os.PathLike,
    cfg: SliceScoresConfig = SliceScoresConfig(),
    *,
    lesion_model: str | os.PathLike | None = None,
    resume: bool = True,
    workers: int = 0,
    scheduler: str | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> BatchSummary:
    """``covidctnet slice-scores``: score every study found in ``inputs``.

    Args:
        inputs: DICOM folders, NIfTI/NRRD files or dataset roots.
        out_dir: ``<study_id>_slices.csv`` and ``manifest.csv``.
        denoiser: a model directory with a ``denoiser`` component (the bundled model, a ``train-denoiser`` model
            directory or its run folder); its ``preprocess`` settings are used.
        cfg: the settings.
        lesion_model: a model directory with a ``lesion`` component (``train-lesion-model``); default: the
            ``denoiser`` directory's own, when it has one. Adds ``lesion_score``.
        resume, workers, scheduler: as for :func:`covidctnet.io.batch.run_batch` (skip finished studies; worker
            processes; a Dask scheduler address).
        on_result: called with each study's manifest row as it finishes.

    Raises:
        ModelDirError: the denoiser or lesion model cannot be loaded, or ``evidence: lesion`` without a lesion
            model (before any study is touched).
    """
    path = str(resolve_denoiser_dir(denoiser).resolve())
    _load(path, cfg.device, cfg.backend, cfg.precision)  # a bad model directory fails once, here, not once per study
    lesion_path = _lesion_model_dir(path, lesion_model, cfg)
    if lesion_path is not None:
        cached_lesion_model(lesion_path, cfg.device)
    studies = discover_studies(inputs)
    fn = functools.partial(_score_study, denoiser=path, cfg=cfg, lesion_model=lesion_path)
    return run_batch(studies, out_dir, fn, MANIFEST_COLUMNS, resume=resume, workers=workers, scheduler=scheduler,
                     desc="slice-scores", on_result=on_result)
