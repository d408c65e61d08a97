"""Helpers that build bad DICOM series in a test from the real shared series (nothing large is committed)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom


def copy_series(src: Path, dst: Path, edit: Callable[[int, Any], None] | None = None,
                keep: Callable[[int], bool] | None = None) -> Path:
    """Copy a DICOM series folder, optionally dropping files (``keep(i)``) or editing headers (``edit(i, ds)``).

    Files are taken in name order (0001.dcm = most inferior in the shared series). Pixel data stays compressed.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(src.glob("*.dcm"))):
        if keep is not None and not keep(i):
            continue
        if edit is None:
            shutil.copyfile(f, dst / f.name)
            continue
        ds = pydicom.dcmread(f)
        edit(i, ds)
        ds.save_as(dst / f.name)
    return dst
