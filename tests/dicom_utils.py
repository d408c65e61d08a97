"""Helpers that build DICOM series variants in a test from the real shared series (nothing large is committed).

Every variant is made with pydicom from the real files: headers edited, pixel data re-written uncompressed
(``Dataset.set_pixel_data``) where the stored values change, geometry (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing) kept consistent with the pixels.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR


def copy_series(src: Path, dst: Path, edit: Callable[[int, Any], None] | None = None,
                keep: Callable[[int], bool] | None = None) -> Path:
    """Copy a DICOM series folder, optionally dropping files (``keep(i)``) or editing headers (``edit(i, ds)``).

    Files are taken in name order (0001.dcm = most inferior in the shared series). Pixel data stays compressed unless
    ``edit`` replaces it (see :func:`set_stored`).
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


def set_stored(ds: Dataset, stored: np.ndarray, bits_stored: int, photometric: str = "MONOCHROME2") -> None:
    """Replace the stored pixel values (uncompressed; uint16 or int16 sets PixelRepresentation), keeping the
    SOPInstanceUID."""
    ds.set_pixel_data(np.ascontiguousarray(stored), photometric, bits_stored, generate_instance_uid=False)


def hu_of(ds: Dataset) -> np.ndarray:
    """The slice in HU (float64), computed from the stored values as the standard says (the reference in tests)."""
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _ds_str(value: float) -> str:
    return format_number_as_ds(float(value))  # as many digits as a DS (16 characters) holds


def reslice_series(src: Path, dst: Path, plane: str) -> Path:
    """The real axial series re-sliced, without interpolation, into ``plane`` (``sagittal`` or ``coronal``) slices.

    Each new slice is one column (sagittal) or one row (coronal) of the axial stack; its rows run from superior to
    inferior (column cosine (0, 0, -1), as scanners write sagittal and coronal images), its columns along +y
    (sagittal) or +x (coronal). ImageOrientationPatient, ImagePositionPatient and PixelSpacing describe exactly where
    each pixel was in the axial series, so a correct reader gives the same voxels at the same RAS positions.
    """
    files = sorted(src.glob("*.dcm"))
    stack = [pydicom.dcmread(f) for f in files]
    stack.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack([d.pixel_array for d in stack])  # (K, rows=y, cols=x) stored values, slices inferior→superior
    first = stack[0]
    row_cos = np.array([float(v) for v in first.ImageOrientationPatient[:3]])
    col_cos = np.array([float(v) for v in first.ImageOrientationPatient[3:]])
    assert np.allclose(row_cos, [1, 0, 0]) and np.allclose(col_cos, [0, 1, 0]), "expects an axial series"
    dr, dc = (float(v) for v in first.PixelSpacing)  # between rows (y), between columns (x)
    ipp0 = np.array([float(v) for v in first.ImagePositionPatient])
    dz = float(stack[1].ImagePositionPatient[2]) - float(stack[0].ImagePositionPatient[2])
    top = ipp0 + np.array([0.0, 0.0, dz * (len(stack) - 1)])  # most superior slice's corner
    series_uid = generate_uid()
    dst.mkdir(parents=True, exist_ok=True)
    n = vol.shape[2] if plane == "sagittal" else vol.shape[1]
    for idx in range(n):
        ds = copy.deepcopy(first)
        if plane == "sagittal":  # slice = one x column; image columns along +y
            image = vol[::-1, :, idx]  # (K rows from superior, y)
            ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
            ds.PixelSpacing = [_ds_str(dz), _ds_str(dr)]
            position = top + np.array([idx * dc, 0.0, 0.0])
        else:  # coronal: slice = one y row; image columns along +x
            image = vol[::-1, idx, :]
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
            ds.PixelSpacing = [_ds_str(dz), _ds_str(dc)]
            position = top + np.array([0.0, idx * dr, 0.0])
        ds.ImagePositionPatient = [_ds_str(v) for v in position]
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = idx + 1
        for tag in ("SliceLocation",):
            if tag in ds:
                del ds[tag]
        ds.set_pixel_data(np.ascontiguousarray(image), "MONOCHROME2", int(first.BitsStored))
        ds.save_as(dst / f"{plane}_{idx + 1:04d}.dcm", enforce_file_format=True)
    return dst


def enhanced_ct(src: Path, dst: Path, name: str = "enhanced.dcm", sop_class: str = ENHANCED_CT_IMAGE,
                compressed: bool = False) -> Path:
    """The real series as ONE Enhanced CT Image Storage file (or ``sop_class``, e.g. Legacy Converted Enhanced CT):
    all slices as frames (stored in reverse z order, so a reader must sort by position), geometry and rescale in the
    functional groups, none at the top level. ``compressed`` keeps each slice's JPEG Lossless bytes as one frame."""
    stack = sorted((pydicom.dcmread(f) for f in sorted(src.glob("*.dcm"))),
                   key=lambda d: -float(d.ImagePositionPatient[2]))
    first = stack[0]
    ds = copy.deepcopy(first)
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceLocation", "RescaleSlope",
                "RescaleIntercept", "RescaleType", "SliceThickness", "InstanceNumber", "WindowCenter", "WindowWidth"):
        if tag in ds:
            del ds[tag]
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]

    measures = Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    transform = Dataset()
    transform.RescaleSlope = first.RescaleSlope
    transform.RescaleIntercept = first.RescaleIntercept
    transform.RescaleType = "HU"
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for i, d in enumerate(stack):
        position = Dataset()
        position.ImagePositionPatient = d.ImagePositionPatient
        content = Dataset()
        content.InStackPositionNumber = i + 1
        item = Dataset()
        item.PlanePositionSequence = Sequence([position])
        item.FrameContentSequence = Sequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    if compressed:
        from pydicom.encaps import encapsulate, generate_frames

        ds.PixelData = encapsulate([next(generate_frames(d.PixelData, number_of_frames=1)) for d in stack])
        ds.NumberOfFrames = len(stack)
    else:
        frames = np.stack([d.pixel_array for d in stack])
        ds.set_pixel_data(frames, "MONOCHROME2", int(first.BitsStored), generate_instance_uid=False)
    dst.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst / name, enforce_file_format=True)
    return dst / name


def localizer(template: Path, out: Path, *, flagged: bool, plane: str = "coronal") -> Path:
    """A scout in the series of ``template``: same SeriesInstanceUID, a coronal (or sagittal) 888x512 projection
    image made from the template's pixels, ImageType LOCALIZER when ``flagged``."""
    ds = pydicom.dcmread(template)
    slab = ds.pixel_array.astype(np.float64)
    projection = np.repeat(slab.mean(axis=0, keepdims=True), 888, axis=0).astype(np.uint16)  # (888, 512)
    ds.set_pixel_data(projection, "MONOCHROME2", int(ds.BitsStored))  # a new SOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if flagged else "AXIAL"]
    coronal, sagittal = ["1", "0", "0", "0", "0", "-1"], ["0", "1", "0", "0", "0", "-1"]
    ds.ImageOrientationPatient = coronal if plane == "coronal" else sagittal
    ds.PixelSpacing = ["0.6", "0.6"]
    ds.ImagePositionPatient = ["-250", "0", "100"]
    ds.save_as(out, enforce_file_format=True)
    return out


def secondary_capture(template: Path, out: Path) -> Path:
    """A dose screen as scanners export it next to the slices: a Secondary Capture (Modality CT, same series, with
    an ImagePositionPatient copied from the template) that must not be read as a slice."""
    ds = pydicom.dcmread(template)
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.set_pixel_data(np.zeros((512, 512), np.uint16) + 100, "MONOCHROME2", 12)  # new SOPInstanceUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


def dose_report(template: Path, out: Path) -> Path:
    """An X-Ray Radiation Dose SR of the study (no pixels, no geometry), in the series folder."""
    src = pydicom.dcmread(template, stop_before_pixels=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DOSE_SR
    ds.SOPClassUID = DOSE_SR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = src.StudyInstanceUID
    ds.SeriesInstanceUID = src.SeriesInstanceUID
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.save_as(out, enforce_file_format=True)
    return out
