"""Input sanity checks run on every volume before preprocessing.

Each check raises one :class:`~covidctnet.core.errors.InputError` subclass with a one-line message that names the file,
what was found and what was expected, so a bad scan never silently produces a plausible-looking diagnosis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covidctnet.core.errors import NonFiniteError, NotHUError, ShapeError, SliceGapError, TooFewSlicesError
from covidctnet.io.volume import Volume

__all__ = ["CheckLimits", "check_volume", "CHECK_NAMES"]

CHECK_NAMES = ("finite", "hounsfield", "min_slices", "spacing", "slice_gaps", "gantry_tilt")


@dataclass(frozen=True)
class CheckLimits:
    """Thresholds of the input checks.

    Attributes:
        min_slices: fewest slices accepted (the classifier resamples to 50 slices; fewer than this is not a chest CT).
        max_gap_ratio: a gap between neighbouring slices larger than this times the median gap means missing slices.
        min_spacing_mm, max_spacing_mm: accepted voxel size range on every axis.
        max_tilt_deg: largest angle between the slice normal and the slice-to-slice direction (gantry tilt, a sheared
            affine), and largest departure from 90 degrees between the in-plane axes.
    """

    min_slices: int = 16
    max_gap_ratio: float = 1.5
    min_spacing_mm: float = 0.1
    max_spacing_mm: float = 12.0
    max_tilt_deg: float = 2.0


def check_volume(volume: Volume, limits: CheckLimits = CheckLimits()) -> list[str]:
    """Run every check on ``volume``.

    Returns:
        The names of the checks passed (all of :data:`CHECK_NAMES`), for the report.

    Raises:
        NonFiniteError, NotHUError, TooFewSlicesError, SliceGapError, ShapeError: the first check that fails
        (``gantry_tilt`` is a SliceGapError for a DICOM series, a ShapeError for a sheared NIfTI/NRRD affine).
    """
    src = volume.source
    arr = volume.array
    if not np.isfinite(arr).all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(np.isinf(arr).sum())
        raise NonFiniteError(f"{src}: {n_nan} NaN and {n_inf} infinite voxels; expected finite HU values")
    lo, hi = float(arr.min()), float(arr.max())
    # Any chest CT contains air or lung (about -1000 to -700 HU); a minimum at or above 0 means the values were
    # rescaled (8-bit PNGs, [0, 1] normalisation) and the HU window would turn the whole scan into one value.
    if lo >= -200 or hi - lo < 200:
        hint = (
            " (looks normalised to [0, 1])"
            if 0 <= lo and hi <= 1
            else (" (looks like 8-bit grey levels)" if 0 <= lo and hi <= 255 else "")
        )
        raise NotHUError(
            f"{src}: intensities span {lo:.4g}..{hi:.4g}{hint}; expected Hounsfield units with air near -1000"
        )
    n_slices = arr.shape[2]
    if n_slices < limits.min_slices:
        raise TooFewSlicesError(f"{src}: {n_slices} slices; at least {limits.min_slices} are needed")
    spacing = volume.spacing
    for axis, s in zip("ijk", spacing):
        if not limits.min_spacing_mm <= s <= limits.max_spacing_mm:
            raise ShapeError(
                f"{src}: voxel size {s:.4g} mm along {axis} is outside "
                f"[{limits.min_spacing_mm}, {limits.max_spacing_mm}] mm; the header geometry is wrong"
            )
    if volume.slice_positions is not None and len(volume.slice_positions) > 1:
        _check_gaps(volume, limits)
    _check_shear(volume, limits)
    return list(CHECK_NAMES)


def _check_gaps(volume: Volume, limits: CheckLimits) -> None:
    src = volume.source
    gaps = np.diff(volume.slice_positions)
    median = float(np.median(gaps))
    if np.any(gaps < 1e-3 * max(median, 1e-6)) or median <= 0:
        n = int(np.sum(gaps < 1e-3 * max(median, 1e-6)))
        raise SliceGapError(f"{src}: {n} duplicated slice position(s); expected one slice per position")
    worst = int(np.argmax(gaps))
    if gaps[worst] > limits.max_gap_ratio * median:
        raise SliceGapError(
            f"{src}: gap of {gaps[worst]:.3g} mm after slice {worst + 1} (median {median:.3g} mm); "
            "slices are missing or unevenly spaced"
        )
    if gaps.min() < median / limits.max_gap_ratio:
        raise SliceGapError(
            f"{src}: uneven slice spacing {gaps.min():.3g}..{gaps.max():.3g} mm (median {median:.3g} mm)"
        )


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees, 0..90) between two lines."""
    cos = abs(float(np.dot(a, b))) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12)
    return float(np.degrees(np.arccos(min(1.0, cos))))


def _check_shear(volume: Volume, limits: CheckLimits) -> None:
    """The voxel grid must be orthogonal: resampling treats it so, and a sheared grid would be silently straightened.

    For a DICOM series the slice axis of the affine is the step between slice origins, so a tilt between it and the
    slice normal is a gantry tilt; for NIfTI/NRRD it is a sheared sform or non-orthogonal space directions.
    """
    src = volume.source
    m = np.asarray(volume.affine, dtype=np.float64)[:3, :3]
    in_plane = 90.0 - _angle_deg(m[:, 0], m[:, 1])
    if in_plane > limits.max_tilt_deg:
        raise ShapeError(
            f"{src}: voxel axes i and j meet at {90.0 - in_plane:.1f} degrees, not 90 (a non-orthogonal grid); "
            "resample it to an orthogonal grid first"
        )
    tilt = _angle_deg(m[:, 2], np.cross(m[:, 0], m[:, 1]))
    if tilt <= limits.max_tilt_deg:
        return
    if volume.info.get("format") == "dicom":
        raise SliceGapError(
            f"{src}: gantry tilt of {tilt:.1f} degrees (slices are sheared); resample the series without tilt first"
        )
    raise ShapeError(
        f"{src}: sheared affine: the slice axis k is {tilt:.1f} degrees off the normal of the i-j plane (a gantry "
        "tilt or a non-orthogonal grid); resample it to an orthogonal grid first"
    )
