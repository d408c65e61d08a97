"""Axial slices of CT volumes rendered as papers print them, as unlabelled images for slice pretraining.

The UCSD slice images are figure panels: an axial chest slice in a lung (or mediastinal) window, cropped to the body,
resized and JPEG-compressed. :func:`render_ct_slices` makes such images from CT volumes in HU (NIfTI, NRRD,
MetaImage or a DICOM series folder, read by :func:`covidctnet.io.volume.read_volume`), so that ``pretrain-slice
--extra-ct DIR`` can learn from more chest CT than the few hundred labelled images. No label is read or made.

Orientation: the slice axis is the array axis nearest to the patient's superior-inferior axis (from the affine); the
slice is shown with anterior at the top and the patient's right on the image's left, as radiology figures are.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from covidctnet.core.errors import CovidCTNetError, InputError
from covidctnet.data.ucsd import SliceRecord, resize_square
from covidctnet.io.volume import Volume, is_volume_file, read_volume

__all__ = ["WINDOWS", "axial_slices", "find_ct_volumes", "render_ct_folder", "render_ct_slices"]

logger = logging.getLogger(__name__)

WINDOWS = {"lung": (-600.0, 1500.0), "mediastinal": (40.0, 400.0), "wide lung": (-500.0, 2000.0)}
"""Display windows (level, width in HU) that chest CT figures use."""
_WINDOW_P = (0.6, 0.2, 0.2)


def find_ct_volumes(folder: str | os.PathLike) -> list[Path]:
    """Volume files (NIfTI, NRRD, MetaImage) and DICOM series folders (a folder holding ``*.dcm``) under ``folder``.

    Symbolic links to folders are followed (a folder of links to the volumes to use is a convenient selection).

    Raises:
        InputError: no volume found.
    """
    files = [Path(root) / name for root, _, names in os.walk(folder, followlinks=True) for name in names]
    found = sorted(p for p in files if is_volume_file(p))
    found += sorted({p.parent for p in files if p.suffix.lower() == ".dcm"})
    if not found:
        raise InputError(f"{folder}: no CT volume (NIfTI, NRRD, MetaImage file or DICOM series folder) found")
    return found


def axial_slices(volume: Volume) -> np.ndarray:
    """(Z, rows, cols) axial slices in HU: anterior at the top, the patient's right on the left (radiological)."""
    axes = np.abs(volume.affine[:3, :3])
    si = int(np.argmax(axes[2]))  # array axis nearest to superior-inferior
    ap = int(np.argmax(np.where(np.arange(3) == si, -1, axes[1])))
    lr = 3 - si - ap
    arr = np.transpose(volume.array, (si, ap, lr))
    if volume.affine[1, ap] > 0:  # +index goes anterior: put anterior at the top
        arr = arr[:, ::-1]
    if volume.affine[0, lr] < 0:  # +index goes to the patient's right: put the right on the left
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr, dtype=np.float32)


def _lung_fraction(hu: np.ndarray) -> float:
    body = hu > -500
    if not body.any():
        return 0.0
    rows, cols = np.flatnonzero(body.any(1)), np.flatnonzero(body.any(0))
    inside = hu[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return float(((inside > -950) & (inside < -500)).mean())


def _render(hu: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    level, width = list(WINDOWS.values())[int(rng.choice(len(WINDOWS), p=_WINDOW_P))]
    level += rng.uniform(-0.05, 0.05) * width
    width *= rng.uniform(0.85, 1.15)
    img = np.clip((hu - (level - width / 2)) / width, 0.0, 1.0)
    body = hu > -500
    rows, cols = np.flatnonzero(body.any(1)), np.flatnonzero(body.any(0))
    h, w = hu.shape
    pad_r, pad_c = (rng.uniform(0.0, 0.08) * h), (rng.uniform(0.0, 0.08) * w)
    r0, r1 = max(0, int(rows[0] - pad_r)), min(h, int(rows[-1] + 1 + pad_r))
    c0, c1 = max(0, int(cols[0] - pad_c)), min(w, int(cols[-1] + 1 + pad_c))
    img = resize_square(img[r0:r1, c0:c1], size)
    buf = io.BytesIO()
    Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(buf, format="JPEG",
                                                                          quality=int(rng.integers(40, 96)))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("L"), dtype=np.float32) / 255.0


def render_ct_slices(volume: Volume, size: int, max_slices: int, renders: int, rng: np.random.Generator,
                     min_lung_fraction: float = 0.2) -> list[np.ndarray]:
    """Render the lung-bearing axial slices of one volume as figure-like grey images.

    Slices whose body box holds at least ``min_lung_fraction`` of lung-density pixels (-950 to -500 HU) are kept, at
    most ``max_slices`` of them evenly spread, each rendered ``renders`` times: a window drawn among
    :data:`WINDOWS` (lung 60 %, mediastinal 20 %, wide lung 20 %; level and width jittered), a crop to the body with a
    random margin, resizing to ``size`` × ``size`` and JPEG compression at quality 40-95.

    Returns:
        (size, size) float32 images in [0, 1].
    """
    slices = axial_slices(volume)
    keep = [k for k in range(len(slices)) if _lung_fraction(slices[k]) >= min_lung_fraction]
    if len(keep) > max_slices:
        keep = [keep[i] for i in np.linspace(0, len(keep) - 1, max_slices).round().astype(int)]
    return [_render(slices[k], size, rng) for k in keep for _ in range(renders)]


def render_ct_folder(folder: str | os.PathLike, size: int, max_slices: int, renders: int,
                     seed: int) -> tuple[list[SliceRecord], list[np.ndarray]]:
    """Every CT volume under ``folder`` rendered by :func:`render_ct_slices` (unreadable ones are skipped, logged).

    Returns:
        ``(records, images)``: one unlabelled record (label -1, split ``"extra"``, path = the volume) per image.
    """
    records: list[SliceRecord] = []
    images: list[np.ndarray] = []
    for i, path in enumerate(find_ct_volumes(folder)):
        try:
            volume = read_volume(path)
        except CovidCTNetError as err:
            logger.warning("%s: skipped (%s)", path.name, err)
            continue
        rendered = render_ct_slices(volume, size, max_slices, renders, np.random.default_rng([seed, i]))
        logger.info("%s: %d rendered slices", path.name, len(rendered))
        records += [SliceRecord(path, -1, "extra")] * len(rendered)
        images += rendered
    return records, images
