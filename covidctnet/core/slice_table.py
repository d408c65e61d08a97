"""The ``<study_id>_slices.csv`` contract (docs/architecture.md): written by ``covidctnet slice-scores``
(:mod:`covidctnet.inference.slice_scores`), read by ``covidctnet validate-residuals``
(:mod:`covidctnet.evaluation.residual_validation`). It lives in ``core`` because those two stages may not import
each other, and so that ``predict``, which imports ``slice_scores``, does not import evaluation's statistics.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from covidctnet.core.errors import InputError

__all__ = ["SLICES_SUFFIX", "SLICE_COLUMNS", "REQUIRED_COLUMNS", "TEXT_COLUMNS", "read_slices_csv"]

SLICE_COLUMNS = ("study_id", "slice", "z_mm", "lung_ml", "evidence", "evidence_score", "residual_score", "hu_score")
"""The contract columns, in this order; ``lesion_score`` (where a lesion model ran) and the candidate residual
statistics (``residual_<name>``) follow as extra columns. ``evidence`` names the score copied into
``evidence_score``: ``residual``, ``lesion`` or ``hu``."""
REQUIRED_COLUMNS = ("study_id", "slice", "z_mm", "lung_ml", "residual_score", "hu_score")
"""Columns every slice table has, including those written before ``evidence`` existed."""
TEXT_COLUMNS = ("study_id", "evidence")
"""Columns read as text; the others are numbers."""
SLICES_SUFFIX = "_slices.csv"
"""File name ending: ``<study_id>_slices.csv``."""


def read_slices_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``<id>_slices.csv`` with numbers parsed (empty cells become NaN).

    Raises:
        InputError: missing file or a contract column missing.
    """
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: not a slice-scores CSV: column(s) {missing} missing")
            out = []
            for row in reader:
                parsed: dict[str, Any] = {"study_id": row["study_id"], "slice": int(row["slice"])}
                for key, value in row.items():
                    if key in TEXT_COLUMNS:
                        parsed[key] = value
                    elif key not in parsed:
                        parsed[key] = float(value) if value not in ("", None) else float("nan")
                out.append(parsed)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read slice scores: {err}") from err
    return out
