"""Reading CT volumes (NIfTI, DICOM series, NRRD/MHA) into Hounsfield units, and writing NIfTI atomically.

Every reader returns a :class:`Volume`: a float32 array indexed ``(i, j, k)`` (k is the slice axis for DICOM) and a
4×4 affine that maps voxel indices to RAS+ world coordinates in mm, the nibabel convention. DICOM slices are ordered by
their position along the slice normal (ImagePositionPatient · normal), never by file name or InstanceNumber, and
RescaleSlope/RescaleIntercept are applied. Patient identifiers are never read into the result or logged: a study is
named after its file or folder.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covidctnet.core.errors import (
    NotCTError,
    SeriesSelectionError,
    ShapeError,
    UnreadableFileError,
)
from covidctnet.core.files import atomic_path

__all__ = [
    "Volume",
    "DicomSeries",
    "read_volume",
    "read_nifti",
    "read_itk",
    "read_dicom_series",
    "find_dicom_series",
    "write_nifti",
    "study_id_from_path",
    "is_volume_file",
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
    """
    array: np.ndarray
    affine: np.ndarray
    source: Path
    modality: str | None = None
    slice_positions: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along i, j, k."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def study_id_from_path(path: str | os.PathLike) -> str:
    """Study id from a file or folder name (``study_0001.nii.gz`` → ``study_0001``), never from DICOM tags."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES[::-1] + ITK_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_volume_file(path: Path) -> bool:
    """True for a NIfTI, NRRD or MetaImage file name."""
    name = path.name.lower()
    return path.is_file() and name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES) and not name.endswith(".raw")


def read_volume(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read a NIfTI file, a NRRD/MHA file, or a folder holding a DICOM series.

    Args:
        path: file or DICOM folder.
        series_uid: for a DICOM folder holding several series, the SeriesInstanceUID to read (default: the CT
            series with the most slices).

    Returns:
        The volume in HU with its RAS+ affine.

    Raises:
        UnreadableFileError: missing, empty, truncated or unknown file.
        NotCTError, SeriesSelectionError, ShapeError: see :func:`read_dicom_series`.
    """
    path = Path(path)
    if not path.exists():
        raise UnreadableFileError(f"{path}: no such file or folder")
    if path.is_dir():
        return read_dicom_series(path, series_uid)
    name = path.name.lower()
    if path.stat().st_size == 0:
        raise UnreadableFileError(f"{path}: file is empty (0 bytes)")
    if name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path)
    if name.endswith(ITK_SUFFIXES):
        return read_itk(path)
    if name.endswith(".dcm"):
        raise UnreadableFileError(f"{path}: a single DICOM file is one slice; pass the folder holding the series")
    raise UnreadableFileError(
        f"{path}: unknown file type; expected .nii/.nii.gz, .nrrd/.mha/.mhd, or a DICOM series folder"
    )


def _check_3d(array_shape: tuple[int, ...], path: Path) -> None:
    if len(array_shape) == 4 and array_shape[3] == 1:
        return
    if len(array_shape) != 3:
        kind = {2: "a 2-D image", 4: "a 4-D series", 5: "a 5-D image"}.get(len(array_shape), f"{len(array_shape)}-D")
        raise ShapeError(f"{path}: {kind} of shape {array_shape}; expected one 3-D CT volume")


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file (scl_slope/scl_inter applied) as float32 with its RAS+ affine."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        _check_3d(img.shape, path)
        array = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    except ShapeError:
        raise
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise UnreadableFileError(
            f"{path}: cannot read NIfTI ({_short(err)}); the file may be truncated or not be NIfTI at all"
        ) from err
    if array.ndim == 4:
        array = array[..., 0]
    affine = np.asarray(img.affine, dtype=np.float64)
    return Volume(array=array, affine=affine, source=path, info={"format": "nifti"})


def read_itk(path: str | os.PathLike) -> Volume:
    """Read a NRRD/MetaImage file with SimpleITK, converting its LPS geometry to a RAS+ affine."""
    import SimpleITK as sitk

    path = Path(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise UnreadableFileError(f"{path}: cannot read image ({_short(err)})") from err
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ShapeError(f"{path}: {img.GetNumberOfComponentsPerPixel()} components per voxel; expected grey-scale CT")
    _check_3d(tuple(img.GetSize()), path)
    array = np.ascontiguousarray(sitk.GetArrayFromImage(img).astype(np.float32, copy=False).transpose(2, 1, 0))
    return Volume(array=array, affine=_itk_affine(img), source=path, info={"format": "itk"})


def _itk_affine(img: Any) -> np.ndarray:
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = img.GetOrigin()
    return _LPS_TO_RAS @ lps


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:200]


@dataclass
class DicomSeries:
    """The DICOM files of one series in a folder, sorted along the slice normal (headers only; no pixels)."""

    uid: str
    files: list[Path]
    modality: str
    headers: list[Any]


def find_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Group the DICOM files of a folder (not recursive) by SeriesInstanceUID, reading headers only.

    Files that are not DICOM (a DICOMDIR, a README) are skipped.

    Raises:
        UnreadableFileError: the folder is empty or holds no DICOM image file.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UnreadableFileError(f"{folder}: folder is empty; expected DICOM files or a NIfTI file")
    groups: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    bad: list[str] = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, KeyError, TypeError) as err:
            if f.suffix.lower() == ".dcm":
                bad.append(f"{f.name} ({_short(err)})")
            continue
        if "ImagePositionPatient" not in ds:  # DICOMDIR, structured reports, scout images without geometry
            continue
        groups[str(ds.get("SeriesInstanceUID", "unknown"))].append((f, ds))
    if bad:
        raise UnreadableFileError(f"{folder}: unreadable DICOM file(s): {', '.join(bad[:3])}")
    if not groups:
        raise UnreadableFileError(f"{folder}: no DICOM image files found ({len(files)} other files)")
    series = []
    for uid, items in groups.items():
        modality = str(items[0][1].get("Modality", "")).upper()
        series.append(
            DicomSeries(uid=uid, files=[f for f, _ in items], modality=modality, headers=[d for _, d in items])
        )
    return series


def _slice_normal(ds: Any) -> np.ndarray:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    return np.cross(iop[:3], iop[3:])


def _select_series(folder: Path, series: list[DicomSeries], series_uid: str | None) -> DicomSeries:
    if series_uid is not None:
        for s in series:
            if s.uid == series_uid:
                return s
        raise SeriesSelectionError(
            f"{folder}: series {series_uid} not found; series here: "
            + "; ".join(f"{s.uid} ({s.modality}, {len(s.files)} files)" for s in series)
        )
    ct = [s for s in series if s.modality == "CT"]
    if not ct:
        mods = sorted({s.modality or "unknown" for s in series})
        raise NotCTError(f"{folder}: Modality is {'/'.join(mods)}, not CT; covidctnet reads chest CT only")
    chosen = max(ct, key=lambda s: len(s.files))
    if len(series) > 1:
        logger.warning(
            "%s: %d series found; using the CT series with the most slices (%d files); pass --series-uid to choose",
            folder,
            len(series),
            len(chosen.files),
        )
    return chosen


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None, threads: int | None = None) -> Volume:
    """Read one DICOM series from a folder into HU.

    Slices are sorted by their position along the slice normal; pixels are decoded in parallel threads by
    SimpleITK/GDCM (which handles JPEG Lossless and JPEG 2000), falling back to pydicom + pylibjpeg, and
    RescaleSlope/RescaleIntercept are applied per slice.

    Args:
        folder: the folder holding the series' files.
        series_uid: which series to read when the folder holds several; default the CT series with most slices.
        threads: decoding threads (default: the number of CPUs, at most 8).

    Raises:
        UnreadableFileError: empty folder, no DICOM files, or a file that cannot be decoded.
        NotCTError: the chosen series is not CT.
        SeriesSelectionError: ``series_uid`` is not in the folder.
        ShapeError: slices of different sizes or orientations.
    """
    folder = Path(folder)
    series = _select_series(folder, find_dicom_series(folder), series_uid)
    if series.modality != "CT":
        raise NotCTError(
            f"{folder}: Modality is {series.modality or 'missing'}, not CT; covidctnet reads chest CT only"
        )
    headers = series.headers
    try:
        normal = _slice_normal(headers[0])
        positions = np.array([np.dot(normal, [float(v) for v in h.ImagePositionPatient]) for h in headers])
        iops = {tuple(round(float(v), 4) for v in h.ImageOrientationPatient) for h in headers}
        sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
        pixel_spacing = [float(v) for v in headers[0].PixelSpacing]
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise UnreadableFileError(f"{folder}: DICOM geometry tags missing or invalid ({_short(err)})") from err
    if len(iops) > 1:
        raise ShapeError(f"{folder}: slices have {len(iops)} different orientations; expected one axial series")
    if len(sizes) > 1:
        raise ShapeError(f"{folder}: slices have different sizes {sorted(sizes)}; expected one series")
    order = np.argsort(positions, kind="stable")
    files = [series.files[i] for i in order]
    headers = [headers[i] for i in order]
    positions = positions[order]

    array = _decode_slices(files, threads)  # (K, rows, cols) float32 HU
    # Array (i, j, k) = (column, row, slice): i runs along the row cosine, j along the column cosine.
    array = np.ascontiguousarray(array.transpose(2, 1, 0))
    iop = np.asarray([float(v) for v in headers[0].ImageOrientationPatient], dtype=np.float64)
    ipp0 = np.asarray([float(v) for v in headers[0].ImagePositionPatient], dtype=np.float64)
    if len(headers) > 1:
        ipp_last = np.asarray([float(v) for v in headers[-1].ImagePositionPatient], dtype=np.float64)
        step = (ipp_last - ipp0) / (len(headers) - 1)
    else:
        step = normal * float(headers[0].get("SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * pixel_spacing[1]  # PixelSpacing is (row spacing, column spacing)
    lps[:3, 1] = iop[3:] * pixel_spacing[0]
    lps[:3, 2] = step if np.linalg.norm(step) > 0 else normal
    lps[:3, 3] = ipp0
    info = {
        "format": "dicom",
        "n_series_in_folder": 1,
        "transfer_syntax": str(getattr(headers[0].file_meta, "TransferSyntaxUID", ""))
        if hasattr(headers[0], "file_meta")
        else "",
        "slice_direction_mm": [float(x) for x in step],
        "slice_normal": [float(x) for x in normal],
    }
    return Volume(
        array=array,
        affine=_LPS_TO_RAS @ lps,
        source=folder,
        modality=series.modality,
        slice_positions=positions,
        info=info,
    )


def _decode_one(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
        if arr.ndim == 3:
            arr = arr[0]
        return arr.astype(np.float32, copy=False)
    except RuntimeError:
        pass
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float32)
    except Exception as err:  # pydicom raises many types for corrupt pixel data
        raise UnreadableFileError(
            f"{path}: cannot decode pixel data ({_short(err)}); the file may be truncated"
        ) from err
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return arr * slope + intercept


def _decode_slices(files: list[Path], threads: int | None) -> np.ndarray:
    threads = threads or min(8, os.cpu_count() or 1)
    first = _decode_one(files[0])
    out = np.empty((len(files), *first.shape), dtype=np.float32)
    out[0] = first

    def fill(i: int) -> None:
        arr = _decode_one(files[i])
        if arr.shape != first.shape:
            raise ShapeError(f"{files[i]}: slice of shape {arr.shape}, expected {first.shape} like the others")
        out[i] = arr

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(fill, range(1, len(files))))
    return out


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Write a float32 NIfTI atomically (temp file + rename), with qform and sform set to ``affine``.

    The gzip header carries no time stamp, so equal arrays give byte-identical files.
    """
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
