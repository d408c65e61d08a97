"""Class labels: canonical names, accepted aliases, and reading labels CSVs.

The 3D classifier's classes are ``control`` (0), ``covid`` (1) and ``cap`` (2), in the order of the official CovidCTNet
model. On input we accept common aliases (``normal``, ``COVID-19``, MosMed's ``CT-0`` … ``CT-4``, the class indices) and
normalise them on read, so every later stage sees only the canonical names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from covidctnet.core.errors import LabelError
from covidctnet.core.files import read_csv_dicts

__all__ = [
    "CLASS_NAMES",
    "BINARY_CLASS_NAMES",
    "normalize_label",
    "normalize_binary_label",
    "normalize_any_label",
    "label_index",
    "read_labels_csv",
]

CLASS_NAMES: tuple[str, ...] = ("control", "covid", "cap")
"""Class order of the 3D classifier (index 0, 1, 2), as in the official CovidCTNet model."""

BINARY_CLASS_NAMES: tuple[str, str] = ("noncovid", "covid")
"""Names of the 2-class (slice branch) labels, negative first; COVID-19 is the positive class everywhere."""

_ALIASES: dict[str, str] = {
    "control": "control",
    "normal": "control",
    "healthy": "control",
    "negative": "control",
    "ct-0": "control",
    "0": "control",
    "covid": "covid",
    "covid-19": "covid",
    "covid19": "covid",
    "ncp": "covid",
    "ct-1": "covid",
    "ct-2": "covid",
    "ct-3": "covid",
    "ct-4": "covid",
    "1": "covid",
    "cap": "cap",
    "pneumonia": "cap",
    "community-acquired pneumonia": "cap",
    "cp": "cap",
    "2": "cap",
}


def normalize_label(value: object, source: str = "label") -> str:
    """Map a label alias to its canonical name (``control``, ``covid`` or ``cap``).

    Args:
        value: a name, alias or class index (``"COVID-19"``, ``"CT-2"``, ``1`` …); case and surrounding space are
            ignored.
        source: where the value came from, for the error message (file and row).

    Raises:
        LabelError: the value is not a known class.
    """
    key = str(value).strip().lower().replace("_", "-")
    if key not in _ALIASES:
        raise LabelError(
            f"{source}: unknown class {value!r}; expected one of {list(CLASS_NAMES)} "
            "(aliases: normal, COVID-19, CT-0…CT-4, pneumonia, 0/1/2)"
        )
    return _ALIASES[key]


# Names that only exist in the 2-class world (UCSD folders are CT_COVID / CT_NonCOVID); "_" is read as "-".
_BINARY_ONLY_ALIASES: dict[str, str] = {
    "noncovid": "noncovid",
    "non-covid": "noncovid",
    "not-covid": "noncovid",
    "covid-negative": "noncovid",
    "ct-noncovid": "noncovid",
    "ct-covid": "covid",
}


def normalize_any_label(value: object, source: str = "label") -> str:
    """Canonical 3-class name when ``value`` names one, else the 2-class name (``noncovid`` / ``covid``).

    Used where a file may hold either 3-class or 2-class labels (evaluation truth, reader CSVs).

    Raises:
        LabelError: the value is neither a 3-class nor a 2-class label.
    """
    key = str(value).strip().lower().replace("_", "-")
    if key in _ALIASES:
        return _ALIASES[key]
    if key in _BINARY_ONLY_ALIASES:
        return _BINARY_ONLY_ALIASES[key]
    raise LabelError(
        f"{source}: unknown class {value!r}; expected one of {list(CLASS_NAMES)} or {list(BINARY_CLASS_NAMES)} "
        "(aliases: normal, COVID-19, CT-0…CT-4, pneumonia, non-covid, 0/1/2)"
    )


def normalize_binary_label(value: object, source: str = "label") -> str:
    """Map any label to the 2-class name: ``covid`` stays, ``control`` / ``cap`` / ``noncovid`` become ``noncovid``.

    Raises:
        LabelError: the value is not a known label.
    """
    return "covid" if normalize_any_label(value, source) == "covid" else "noncovid"


def label_index(value: object, source: str = "label") -> int:
    """Class index (0 control, 1 covid, 2 cap) of a label alias."""
    return CLASS_NAMES.index(normalize_label(value, source))


def read_labels_csv(
    path: str | os.PathLike,
    id_column: str = "study_id",
    label_column: str = "label",
    normalize: Callable[[object, str], str] = normalize_label,
) -> dict[str, str]:
    """Read a labels CSV (``study_id,label``) into ``{study_id: canonical label}``.

    ``case_id`` is accepted in place of ``study_id`` (the reader-study schema). ``normalize`` maps each raw label
    (e.g. :func:`normalize_any_label` to also accept the 2-class ``noncovid``).

    Raises:
        LabelError: missing file or columns, empty file, duplicated id, or unknown class (row number given).
    """
    path = Path(path)
    rows = read_csv_dicts(path, LabelError, "labels CSV", f"{id_column},{label_column}")
    columns = set(rows[0])
    if id_column not in columns and "case_id" in columns:
        id_column = "case_id"
    missing = [c for c in (id_column, label_column) if c not in columns]
    if missing:
        raise LabelError(f"{path}: missing column(s) {missing}; found {sorted(c for c in columns if c)}")
    labels: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        sid = (row[id_column] or "").strip()
        if not sid:
            raise LabelError(f"{path}: row {i}: empty {id_column}")
        if sid in labels:
            raise LabelError(f"{path}: row {i}: duplicated {id_column} {sid!r}")
        labels[sid] = normalize(row[label_column], f"{path}: row {i}")
    return labels
