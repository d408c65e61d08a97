"""The one thing every reader returns: a CT :class:`Volume` in Hounsfield units, with the air conventions shared by
the NIfTI/NRRD reader (:mod:`covidctnet.io.volume`) and the DICOM reader (:mod:`covidctnet.io.dicom`).

A module of its own so that ``volume`` (the format dispatch) may import ``dicom`` while ``dicom`` builds ``Volume``s:
the import contract allows no cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Volume", "AIR_HU", "FILL_BELOW_HU", "LPS_TO_RAS", "short_error"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM and ITK patient coordinates (LPS) to the RAS+ world of every :class:`Volume` affine."""

AIR_HU = -1000.0
"""What padding and out-of-field voxels become: air, at or below the floor of every HU window used here."""
FILL_BELOW_HU = -1500.0
"""Below this no CT measures anything (air is -1000 HU, its noise stays within about -1100): such values are the
scanner's fill outside the reconstructed field of view (-2000, -3024 HU …), not tissue."""


@dataclass
class Volume:
    """A CT volume in HU.

    Attributes:
        array: (I, J, K) float32 intensities in HU.
        affine: (4, 4) voxel-index → RAS+ mm.
        source: the file or folder it was read from.
        modality: DICOM Modality when known (``None`` for NIfTI/NRRD, which do not record it).
        slice_positions: for DICOM, the position (mm) of each slice along the slice normal, in array order.
        info: non-identifying facts for logs and manifests (number of series found, transfer syntax …).
        dicom_slices: for DICOM, ``(header, frame)`` of each slice in array (k) order: the file's pydicom header
            (pixels not read) and the frame index in a multi-frame file (``None`` for single-frame files). Only the
            opt-in DICOM output (:mod:`covidctnet.inference.dicom_export`) reads it: the headers hold patient
            identifiers, so they are left out of ``repr`` and must never reach a log, CSV or JSON.
    """

    array: np.ndarray
    affine: np.ndarray
    source: Path
    modality: str | None = None
    slice_positions: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    dicom_slices: list[tuple[Any, int | None]] | None = field(default=None, repr=False, compare=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along i, j, k."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)



def short_error(err: BaseException) -> str:
    """The last line of an exception's text, at most 200 characters: enough to say why in a one-line message."""
    text = str(err).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:200]
