"""Reading one DICOM CT series from a folder into a :class:`~covidctnet.io.base.Volume` in Hounsfield units.

Series finding (:func:`find_dicom_series`: CT images grouped by SeriesInstanceUID, everything else counted and left
out), slice selection (localizers, other orientations, second copies of one image), decoding (SimpleITK/GDCM in
threads, pydicom + pylibjpeg as the fallback; HU in wide types, MONOCHROME1 inverted, padding and out-of-field fill as
air) and the series affine. Slices are ordered by their position along the slice normal (ImagePositionPatient ·
normal), never by file name, InstanceNumber or SliceLocation. Patient identifiers are never read into the result or
logged: a study is named after its folder.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
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
from covidctnet.io.base import AIR_HU, FILL_BELOW_HU, LPS_TO_RAS, Volume, short_error
from covidctnet.io.notices import collect_notices

__all__ = [
    "DicomSeries",
    "read_dicom_series",
    "find_dicom_series",
    "CT_SOP_CLASSES",
]

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
_MULTIFRAME_CT_SOP_CLASSES = frozenset({ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE})
CT_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE, *_MULTIFRAME_CT_SOP_CLASSES})
"""SOP classes read as CT slices; any other object in a series folder (dose report, secondary capture) is skipped."""


_GEOMETRY_TAGS = {"ImagePositionPatient": "(0020,0032)", "ImageOrientationPatient": "(0020,0037)"}
_NO_GEOMETRY = "CT image without "
"""Start of the skip reason of a CT image lacking a tag of :data:`_GEOMETRY_TAGS`; the tags follow."""


def _not_ct(folder: Path, modalities: Any) -> NotCTError:
    """The one "not CT" error, whichever step finds it: the Modality values seen (``missing`` for an empty one)."""
    seen = "/".join(sorted({str(m).upper() or "missing" for m in modalities})) or "missing"
    return NotCTError(f"{folder}: Modality is {seen}, not CT; covidctnet reads chest CT only")


@dataclass
class DicomSeries:
    """The DICOM files of one series in a folder (headers only; no pixels).

    Attributes:
        uid: SeriesInstanceUID.
        files: the series' CT image files, in name order.
        modality: DICOM Modality of the first file.
        headers: the files' headers (``stop_before_pixels``), in the order of ``files``.
        skipped: files of the folder left out before grouping, by reason (localizers, dose reports, secondary
            captures, non-DICOM files); shared by every series of the folder.
        grouped_by_geometry: True for files of one SeriesInstanceUID each put together by geometry (``uid`` is then
            empty; see :func:`_group_by_geometry`).
    """

    uid: str
    files: list[Path]
    modality: str
    headers: list[Any]
    skipped: Counter[str] = field(default_factory=Counter)
    grouped_by_geometry: bool = False

    @property
    def n_images(self) -> int:
        """Number of 2-D images (a multi-frame file counts its frames)."""
        return sum(_n_frames(h) for h in self.headers)

    def describe(self) -> str:
        frames = self.n_images
        extra = f", {frames} frames" if frames != len(self.files) else ""
        return f"{self.uid} ({self.modality}, {len(self.files)} files{extra})"


def _n_frames(ds: Any) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _is_multiframe(ds: Any) -> bool:
    return str(ds.get("SOPClassUID", "")) in _MULTIFRAME_CT_SOP_CLASSES


def _skip_reason(ds: Any) -> str | None:
    """Why a DICOM file of a series folder is not a slice of the CT volume, or ``None`` if it is one."""
    from pydicom.uid import UID

    file_meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or (file_meta.get("MediaStorageSOPClassUID", "") if file_meta else "") or "")
    if sop and sop not in CT_SOP_CLASSES:
        # Dose reports (SR), secondary captures (dose screens, key images), presentation states, raw data, DICOMDIR.
        return f"not a CT image (SOP class {UID(sop).name})"
    if "Rows" not in ds:
        return "not an image (no pixel data)"
    raw = ds.get("ImageType") or []
    image_type = [v.strip().upper() for item in ([raw] if isinstance(raw, str) else raw) for v in str(item).split("\\")]
    if "LOCALIZER" in image_type:
        return "localizer (ImageType LOCALIZER)"
    if "SCREEN SAVE" in image_type:  # dose screens some scanners store as CT Image Storage
        return "screen capture (ImageType SCREEN SAVE)"
    if not _is_multiframe(ds):
        missing = [f"{tag} {number}" for tag, number in _GEOMETRY_TAGS.items() if tag not in ds]
        if missing:
            return _NO_GEOMETRY + " and ".join(missing)
    return None


def find_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Group the CT image files of a folder (not recursive) by SeriesInstanceUID, reading headers only.

    Left out, and counted by reason in :attr:`DicomSeries.skipped`: files that are not DICOM (a README), objects that
    are not CT images (SOP class other than CT Image, Enhanced CT Image or Legacy Converted Enhanced CT Image: dose
    reports, secondary captures, DICOMDIR), localizers (ImageType LOCALIZER), screen captures stored as CT images
    (ImageType SCREEN SAVE) and CT images without slice geometry (ImagePositionPatient or ImageOrientationPatient).

    Raises:
        UnreadableFileError: the folder is empty, a ``.dcm`` file cannot be parsed, or no file is a DICOM image.
        NotCTError: the folder's images are of another modality (MR Image Storage …).
        SeriesSelectionError: the folder holds DICOM objects but no CT image (only a dose report, say).
        ShapeError: every CT image lacks ImagePositionPatient or ImageOrientationPatient (the message names the tag).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UnreadableFileError(f"{folder}: folder is empty; expected DICOM files or a NIfTI file")
    groups: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    bad: list[str] = []
    skipped: Counter[str] = Counter()
    other_modalities: set[str] = set()
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, KeyError, TypeError) as err:
            if f.suffix.lower() == ".dcm":
                bad.append(f"{f.name} ({short_error(err)})")
            else:
                skipped["not DICOM"] += 1
            continue
        reason = _skip_reason(ds)
        if reason is not None:
            skipped[reason] += 1
            if "Rows" in ds and str(ds.get("Modality", "")).upper() not in ("CT", ""):
                other_modalities.add(str(ds.Modality).upper())
            continue
        groups[str(ds.get("SeriesInstanceUID", "unknown"))].append((f, ds))
    if bad:
        raise UnreadableFileError(f"{folder}: unreadable DICOM file(s): {', '.join(bad[:3])}")
    if not groups:
        if other_modalities:
            raise _not_ct(folder, other_modalities)
        no_geometry = {r: n for r, n in skipped.items() if r.startswith(_NO_GEOMETRY)}
        if no_geometry and set(skipped) - {"not DICOM"} == set(no_geometry):
            # Every CT image lacks its position or orientation: refuse rather than stack them in an invented geometry.
            what = "; ".join(f"{r[len(_NO_GEOMETRY):]} missing in {n}" for r, n in sorted(no_geometry.items()))
            raise ShapeError(
                f"{folder}: {what} of the {sum(no_geometry.values())} CT images; without it the slices cannot be "
                "placed, and covidctnet does not guess the geometry"
            )
        if set(skipped) - {"not DICOM"}:
            raise SeriesSelectionError(f"{folder}: no CT image to read; {_describe_skipped(skipped, len(files))}")
        raise UnreadableFileError(f"{folder}: no DICOM image files found ({len(files)} other files)")
    series = []
    for uid, items in groups.items():
        modality = str(items[0][1].get("Modality", "")).upper()
        series.append(
            DicomSeries(
                uid=uid,
                files=[f for f, _ in items],
                modality=modality,
                headers=[d for _, d in items],
                skipped=skipped,
            )
        )
    return series


def _describe_skipped(skipped: Counter[str], n_files: int) -> str:
    total = sum(skipped.values())
    parts = "; ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"skipped {total} of {n_files} files: {parts}"


def _select_series(folder: Path, series: list[DicomSeries], series_uid: str | None) -> DicomSeries:
    if series_uid is not None:
        for s in series:
            if s.uid == series_uid:
                return s
        raise SeriesSelectionError(
            f"{folder}: series {series_uid} not found; series here: " + "; ".join(s.describe() for s in series)
        )
    ct = [s for s in series if s.modality == "CT"]
    if not ct:
        raise _not_ct(folder, [s.modality for s in series])
    chosen = max(ct, key=lambda s: s.n_images)
    if len(series) > 1:
        logger.warning(
            "%s: %d series found; using the CT series with the most slices (%d files); pass --series-uid to choose",
            folder,
            len(series),
            len(chosen.files),
        )
    return chosen


@dataclass
class _Slice:
    """One 2-D CT image of a series: a single-frame file or one frame of an Enhanced CT file, with its geometry."""

    path: Path
    frame: int | None  # frame index in a multi-frame file; None for a single-frame file
    key: tuple[str, int]  # (SOPInstanceUID, frame): not unique in anonymised exports; content decides duplicates
    ipp: np.ndarray  # (3,) ImagePositionPatient, LPS mm
    iop: np.ndarray  # (6,) ImageOrientationPatient: row cosine, column cosine
    pixel_spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns) mm
    size: tuple[int, int]  # (Rows, Columns)
    slope: float
    intercept: float
    header: Any


def _floats(values: Any, n: int) -> np.ndarray:
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise ValueError(f"expected {n} finite numbers, got {list(values)!r}")
    return arr


def _rescale(item: Any) -> tuple[float, float]:
    slope = item.get("RescaleSlope", 1)
    intercept = item.get("RescaleIntercept", 0)
    return float(1 if slope in (None, "") else slope), float(0 if intercept in (None, "") else intercept)


def _frame_item(ds: Any, index: int, sequence: str) -> Any:
    """The item of a functional-group ``sequence`` for frame ``index``: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    for group in ([per_frame[index]] if index < len(per_frame) else []) + list(shared[:1]):
        if sequence in group and group[sequence].value:
            return group[sequence].value[0]
    return None


def _series_slices(folder: Path, series: DicomSeries) -> list[_Slice]:
    """Every 2-D image of the series with its geometry (multi-frame files give one :class:`_Slice` per frame)."""
    slices: list[_Slice] = []
    for path, ds in zip(series.files, series.headers):
        uid = str(ds.get("SOPInstanceUID", path.name))
        try:
            size = (int(ds.Rows), int(ds.Columns))
            if not _is_multiframe(ds):
                sp = _floats(ds.PixelSpacing, 2)
                slope, intercept = _rescale(ds)
                slices.append(_Slice(path, None, (uid, 0), _floats(ds.ImagePositionPatient, 3),
                                     _floats(ds.ImageOrientationPatient, 6), (sp[0], sp[1]), size, slope, intercept,
                                     ds))
                continue
            for i in range(_n_frames(ds)):
                position = _frame_item(ds, i, "PlanePositionSequence")
                # Some converters keep orientation and pixel spacing only at the top level, as in single-frame files.
                orientation = _frame_item(ds, i, "PlaneOrientationSequence") or (
                    ds if "ImageOrientationPatient" in ds else None
                )
                measures = _frame_item(ds, i, "PixelMeasuresSequence") or (ds if "PixelSpacing" in ds else None)
                transform = _frame_item(ds, i, "PixelValueTransformationSequence")
                if position is None or orientation is None or measures is None:
                    raise KeyError(f"frame {i + 1} has no PlanePosition/PlaneOrientation/PixelMeasures")
                sp = _floats(measures.PixelSpacing, 2)
                slope, intercept = _rescale(transform if transform is not None else ds)
                slices.append(_Slice(path, i, (uid, i), _floats(position.ImagePositionPatient, 3),
                                     _floats(orientation.ImageOrientationPatient, 6), (sp[0], sp[1]), size, slope,
                                     intercept, ds))
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as err:
            raise UnreadableFileError(
                f"{folder}: DICOM geometry tags missing or invalid in {path.name} ({short_error(err)})"
            ) from err
    return slices


def _drop_duplicates(folder: Path, slices: list[_Slice], skipped: Counter[str]) -> tuple[list[_Slice], int]:
    """Keep one copy of each image, deciding by content: two slices are the same image when they lie at the same
    position (within 1 µm) and their pixel data agree (the same PixelData bytes, or, for single-frame files stored
    differently, the same decoded values). Their SOPInstanceUIDs do not decide: anonymisers give every slice of a
    series one UID (COVID-CT-MD as published) or a copy a new one.

    Two *different* images at one position are both kept (:func:`covidctnet.io.checks.check_volume` refuses them).
    Files sharing one SOPInstanceUID at different positions are distinct slices, read with one warning line.

    Returns:
        The slices kept (in their given order) and how many of them share a SOPInstanceUID with another.
    """
    by_position: dict[tuple[int, int, int], list[_Slice]] = defaultdict(list)
    for s in slices:
        by_position[tuple(int(v) for v in np.round(s.ipp * 1000.0))].append(s)
    digests: dict[Path, str] = {}
    drop: set[int] = set()
    for group in by_position.values():
        if len(group) < 2:  # the common case: no pixel data read here
            continue
        firsts: list[_Slice] = []
        for s in group:
            if any(_same_image(u, s, digests) for u in firsts):
                drop.add(id(s))
                skipped["duplicate (same position and pixel data as another file)"] += 1
            else:
                firsts.append(s)
    kept = [s for s in slices if id(s) not in drop]
    per_uid = Counter(s.key for s in kept)
    shared = {key: n for key, n in per_uid.items() if n > 1}
    n_shared = sum(shared.values())
    if shared:
        logger.warning("%s: %d files share %s (anonymised export?); slices ordered by position", folder, n_shared,
                       "one SOPInstanceUID" if len(shared) == 1 else f"{len(shared)} SOPInstanceUIDs")
    return kept, n_shared


def _pixel_digest(s: _Slice, digests: dict[Path, str]) -> tuple[str, int | None]:
    """SHA-256 of the stored PixelData bytes of a slice's file (encoded as stored), with the slice's frame index (a
    frame of a multi-frame file). The file's digest is cached in ``digests``: a copied Enhanced CT file has every
    frame at a duplicate position, and is read and hashed once, not once per frame."""
    import hashlib

    import pydicom

    if s.path not in digests:
        try:
            data = pydicom.dcmread(s.path).PixelData
        except Exception as err:  # pydicom raises many types for truncated files
            raise UnreadableFileError(f"{s.path}: cannot read pixel data ({short_error(err)})") from err
        digests[s.path] = hashlib.sha256(bytes(data)).hexdigest()
    return digests[s.path], s.frame


def _same_image(a: _Slice, b: _Slice, digests: dict[Path, str]) -> bool:
    """True when two slices at one position hold the same pixels (see :func:`_drop_duplicates`)."""
    if _pixel_digest(a, digests) == _pixel_digest(b, digests):
        return True
    if a.frame is None and b.frame is None:  # the same image may have been stored in another transfer syntax
        return bool(np.array_equal(_decode_one(a)[0], _decode_one(b)[0]))
    return False


def _group_by_geometry(folder: Path, series: list[DicomSeries]) -> list[DicomSeries]:
    """Put back together a series whose SeriesInstanceUID an anonymiser randomised per file.

    Applies only when every CT series of the folder is one single-frame file and there are at least three of them
    (a real series of one slice is too few to read anyway). The files are grouped by geometry: orientation
    (ImageOrientationPatient to 1e-3), PixelSpacing (to 1e-4 mm) and Rows × Columns; the largest group is one series
    when its positions along the slice normal lie on a regular lattice (every gap a whole multiple of the median gap,
    to 1% or 0.01 mm: a missing slice is left for ``check_volume`` to name). Files of other geometries are left out
    and counted. One warning line says so.

    Raises:
        SeriesSelectionError: the largest group's positions are not one regular stack (two series mixed).
        UnreadableFileError: a file's geometry tags cannot be parsed.
    """
    ct = [s for s in series if s.modality == "CT"]
    if len(ct) < 3 or len(ct) != len(series) or any(s.n_images != 1 or _is_multiframe(s.headers[0]) for s in ct):
        return series
    groups: dict[tuple[Any, ...], list[DicomSeries]] = defaultdict(list)
    for s in ct:
        ds = s.headers[0]
        try:
            key = (tuple(np.round(_floats(ds.ImageOrientationPatient, 6), 3)),
                   tuple(np.round(_floats(ds.PixelSpacing, 2), 4)), (int(ds.Rows), int(ds.Columns)))
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise UnreadableFileError(
                f"{folder}: DICOM geometry tags missing or invalid in {s.files[0].name} ({short_error(err)})"
            ) from err
        groups[key].append(s)
    key, members = max(groups.items(), key=lambda kv: len(kv[1]))
    normal = np.cross(np.asarray(key[0][:3]), np.asarray(key[0][3:]))
    positions = np.unique(np.round([float(np.dot(normal, _floats(m.headers[0].ImagePositionPatient, 3)))
                                    for m in members], 3))
    gaps = np.diff(positions)
    median = float(np.median(gaps)) if gaps.size else 0.0
    steps = np.round(gaps / median) if median > 0 else gaps
    if median <= 0 or np.any(steps < 1) or np.max(np.abs(gaps - steps * median)) > max(0.01, 0.01 * median):
        raise SeriesSelectionError(
            f"{folder}: each of the {len(ct)} CT files has its own SeriesInstanceUID, and the {len(members)} of one "
            f"geometry do not lie on one regular stack (gaps {gaps.min() if gaps.size else 0:.3g}.."
            f"{gaps.max() if gaps.size else 0:.3g} mm); cannot tell the series apart"
        )
    members.sort(key=lambda m: m.files[0].name)
    skipped = Counter(ct[0].skipped)
    left_out = len(ct) - len(members)
    if left_out:
        skipped["other geometry (own SeriesInstanceUID, not one stack with the others)"] += left_out
    logger.warning(
        "%s: each of the %d CT files has its own SeriesInstanceUID (anonymised export?); grouped by geometry "
        "(orientation, pixel spacing, %dx%d pixels, a slice every %.3g mm) into one series of %d files",
        folder, len(ct), key[2][1], key[2][0], median, len(members),
    )
    return [DicomSeries(uid="", files=[m.files[0] for m in members], modality="CT",
                        headers=[m.headers[0] for m in members], skipped=skipped, grouped_by_geometry=True)]


def _series_affine(slices: list[_Slice], normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The RAS+ affine of slices sorted along ``normal``, for the (i, j, k) = (column, row, slice) array.

    The slice axis is the mean step between the first and last slice origins (so a gantry tilt shows as shear, which
    ``check_volume`` refuses); one slice steps by SliceThickness along the normal.

    Returns:
        (4, 4) affine and the (3,) LPS step between slices (mm).
    """
    iop, ipp0 = slices[0].iop, slices[0].ipp
    if len(slices) > 1:
        step = (slices[-1].ipp - ipp0) / (len(slices) - 1)
    else:
        step = normal * float(slices[0].header.get("SliceThickness", 1.0) or 1.0)
    row_spacing, column_spacing = slices[0].pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * column_spacing  # along a row, pixels are one column spacing apart
    lps[:3, 1] = iop[3:] * row_spacing
    lps[:3, 2] = step if np.linalg.norm(step) > 0 else normal
    lps[:3, 3] = ipp0
    return LPS_TO_RAS @ lps, step


def _majority_orientation(folder: Path, slices: list[_Slice], skipped: Counter[str]) -> list[_Slice]:
    """Keep the slices of the orientation most slices share; a few of another orientation are scouts.

    Localizers without ImageType LOCALIZER (a coronal topogram in the axial series) differ from the stack in
    orientation; they are dropped when the main stack has more slices than all other orientations together.
    """
    groups: list[list[_Slice]] = []
    for s in slices:
        # Same orientation up to the rounding of the DS strings (cosines to ~1e-6), not exact equality.
        home = next((g for g in groups if np.max(np.abs(g[0].iop - s.iop)) < 1e-3), None)
        if home is None:
            groups.append([s])
        else:
            home.append(s)
    if len(groups) == 1:
        return slices
    ranked = sorted(groups, key=len, reverse=True)
    main, others = ranked[0], [s for g in ranked[1:] for s in g]
    if len(main) <= len(others):
        raise ShapeError(
            f"{folder}: slices have {len(groups)} different orientations "
            f"({', '.join(str(len(g)) for g in ranked)} slices); expected one stack"
        )
    skipped[f"localizer (orientation differs from the other {len(main)} slices)"] += len(
        {(s.path, s.frame) for s in others}
    )
    return main


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None, threads: int | None = None) -> Volume:
    """Read one DICOM series from a folder into HU, as real scanner exports come.

    What is read: CT Image files (one slice each) and Enhanced / Legacy Converted Enhanced CT files (one file, many
    frames; geometry and rescale from the functional groups). Slices are sorted by their position along the slice
    normal, whatever their orientation (axial, sagittal, coronal): the affine maps the (i, j, k) = (column, row,
    slice) array to RAS+. Pixels are decoded in parallel threads by SimpleITK/GDCM (JPEG Lossless, JPEG 2000 …),
    falling back to pydicom + pylibjpeg; both compute HU in wide types (no uint16/int16 wrap-around when
    RescaleIntercept is added) and invert MONOCHROME1 stored values within BitsStored (as GDCM does). Voxels equal to
    PixelPaddingValue (up to PixelPaddingRangeLimit) and values below :data:`FILL_BELOW_HU` (out-of-field fill such as
    -2000 or -3024 HU) are set to air, :data:`AIR_HU`: they are not measurements.

    Left out, with one log line saying how many and why: localizers (ImageType LOCALIZER, or an orientation only a
    minority of the series' slices share), objects that are not CT images (dose reports, secondary captures …), and
    second copies of the same image (same position and pixel data, whatever their SOPInstanceUIDs). Two *different*
    images at one position are kept, and :func:`covidctnet.io.checks.check_volume` refuses them.

    Notices of pydicom and ITK/GDCM (an invalid UID warns once per file) become one log line with counts per kind
    (:func:`covidctnet.io.notices.collect_notices`; each at DEBUG).

    Anonymised exports are read as the clean series (one warning line each, no patient tag read): one
    SOPInstanceUID shared by every slice (COVID-CT-MD as published), UIDs that break the DICOM grammar (letters,
    more than 64 characters), a SeriesInstanceUID randomised per file (the files are grouped by geometry, see
    :func:`_group_by_geometry`), InstanceNumber or SliceLocation missing, repeated or wrong (neither is read: the
    position decides), PatientID/PatientName blank. A series without ImagePositionPatient is refused.

    Args:
        folder: the folder holding the series' files.
        series_uid: which series to read when the folder holds several; default the CT series with most slices.
        threads: decoding threads (default: the number of CPUs, at most 8).

    Returns:
        A :class:`Volume` (I = columns, J = rows, K = slices) in float32 HU with ``slice_positions`` (mm along the
        normal) and ``info['skipped']`` (reason → number of files).

    Raises:
        UnreadableFileError: empty folder, no DICOM files, or a file that cannot be decoded.
        NotCTError: the chosen series is not CT.
        SeriesSelectionError: ``series_uid`` is not in the folder, the folder has no CT image, or files with one
            SeriesInstanceUID each do not form one stack.
        ShapeError: slices of different sizes, no orientation shared by most slices, or no slice geometry at all.
    """
    folder = Path(folder)
    with collect_notices(logger, folder):
        return _read_dicom_series(folder, series_uid, threads)


def _read_dicom_series(folder: Path, series_uid: str | None, threads: int | None) -> Volume:
    found = find_dicom_series(folder)
    series = _select_series(folder, found if series_uid is not None else _group_by_geometry(folder, found), series_uid)
    if series.modality != "CT":
        raise _not_ct(folder, [series.modality])
    skipped = Counter(series.skipped)
    slices, n_shared_uid = _drop_duplicates(folder, _series_slices(folder, series), skipped)
    slices = _majority_orientation(folder, slices, skipped)
    sizes = {s.size for s in slices}
    if len(sizes) > 1:
        raise ShapeError(f"{folder}: slices have different sizes {sorted(sizes)}; expected one series")
    normal = np.cross(slices[0].iop[:3], slices[0].iop[3:])
    positions = np.array([float(np.dot(normal, s.ipp)) for s in slices])
    order = np.argsort(positions, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    if skipped:
        n_files = len(list(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")))
        logger.warning("%s: read %d slices; %s", folder, len(slices), _describe_skipped(skipped, n_files))

    array, n_air = _decode_slices(slices, threads)  # (K, rows, cols) float32 HU
    if n_air:
        logger.info("%s: %d padding / out-of-field voxels set to air (%g HU)", folder, n_air, AIR_HU)
    # Array (i, j, k) = (column, row, slice): i runs along the row cosine, j along the column cosine. A transposed
    # view (Fortran order), not a copy: transposing 512×512×300 float32 costs a second or more, and the next step
    # (reorientation and resampling) reads it along any axis anyway.
    array = array.transpose(2, 1, 0)
    affine, step = _series_affine(slices, normal)
    first = slices[0].header
    info = {
        "format": "dicom",
        "n_series_in_folder": 1,
        "transfer_syntax": str(getattr(first.file_meta, "TransferSyntaxUID", "")) if hasattr(first, "file_meta")
        else "",
        "multiframe": slices[0].frame is not None,
        "skipped": dict(skipped),
        "air_filled_voxels": n_air,
        "slice_direction_mm": [float(x) for x in step],
        "slice_normal": [float(x) for x in normal],
        # Slices sharing a SOPInstanceUID cannot be told apart by a DICOM reference (an SR or SEG citing them).
        "shared_sop_instance_uids": n_shared_uid,
        "grouped_by_geometry": series.grouped_by_geometry,
    }
    return Volume(
        array=array,
        affine=affine,
        source=folder,
        modality=series.modality,
        slice_positions=positions,
        info=info,
        dicom_slices=[(s.header, s.frame) for s in slices],
    )


def _invert_monochrome1(stored: np.ndarray, ds: Any) -> np.ndarray:
    """MONOCHROME1 stores dark as high values: flip within the stored bit range, as GDCM (and so SimpleITK) does:
    ``2**BitsStored - 1 - v`` for unsigned data, ``-1 - v`` (bitwise not) for signed data."""
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -1.0 - stored
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    return float(2**bits - 1) - stored


def _is_monochrome1(ds: Any) -> bool:
    return str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"


def _stored_to_hu(stored: np.ndarray, ds: Any, slope: float, intercept: float) -> np.ndarray:
    """Stored values → HU in float64: a uint16 or int16 plus RescaleIntercept would wrap around in its own type."""
    arr = stored.astype(np.float64)
    if _is_monochrome1(ds):
        arr = _invert_monochrome1(arr, ds)
    return arr * slope + intercept


def _padding_hu(ds: Any, slope: float, intercept: float) -> tuple[float, float] | None:
    """HU range of PixelPaddingValue … PixelPaddingRangeLimit (stored values, so inverted and rescaled like pixels)."""
    if ds.get("PixelPaddingValue") is None:
        return None
    try:
        values = [int(ds.PixelPaddingValue)]
        if ds.get("PixelPaddingRangeLimit") is not None:
            values.append(int(ds.PixelPaddingRangeLimit))
    except (TypeError, ValueError):
        return None
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        # An implicit-VR file may give the value as US; read it as the signed number it stands for.
        values = [v - 2**bits if v >= 2 ** (bits - 1) else v for v in values]
    hu = _stored_to_hu(np.asarray(values, dtype=np.float64), ds, slope, intercept)
    return float(hu.min()), float(hu.max())


def _air_fill(hu: np.ndarray, s: _Slice) -> int:
    """Set padding and out-of-field voxels of one slice to air, in place; returns how many."""
    mask = np.isfinite(hu) & (hu < FILL_BELOW_HU)
    padding = _padding_hu(s.header, s.slope, s.intercept)
    if padding is not None:
        tol = 0.5 * max(abs(s.slope), 1e-6)
        mask |= (hu >= padding[0] - tol) & (hu <= padding[1] + tol)
    n = int(mask.sum())
    if n:
        hu[mask] = AIR_HU
    return n


def _decode_one(s: _Slice) -> tuple[np.ndarray, int]:
    """One single-frame CT file → float32 HU (rows, cols) with padding and out-of-field set to air, and how many."""
    import SimpleITK as sitk

    try:
        # GDCM applies RescaleSlope/Intercept in a wide enough type and inverts MONOCHROME1.
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(s.path)))
        if arr.ndim == 3:
            arr = arr[0]
        hu = arr.astype(np.float64, copy=False)
    except RuntimeError:
        import pydicom

        try:
            ds = pydicom.dcmread(s.path)
            hu = _stored_to_hu(ds.pixel_array, ds, s.slope, s.intercept)
        except Exception as err:  # pydicom raises many types for corrupt pixel data
            raise UnreadableFileError(
                f"{s.path}: cannot decode pixel data ({short_error(err)}); the file may be truncated"
            ) from err
    n_air = _air_fill(hu, s)
    return hu.astype(np.float32), n_air


def _decode_multiframe(path: Path, slices: list[_Slice]) -> tuple[dict[int, np.ndarray], int]:
    """The frames of one Enhanced CT file → {frame index: float32 HU}, each with its own rescale, and the number of
    voxels set to air."""
    import pydicom

    ds = None
    try:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
    except Exception as err:  # pydicom raises many types for corrupt or undecodable pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise UnreadableFileError(
            f"{path}: cannot decode the multi-frame pixel data ({short_error(err)})"
            + (f"; transfer syntax {syntax.name}" if syntax is not None else "")
        ) from err
    stored = stored.reshape((-1, *stored.shape[-2:]))
    out = {}
    n_air = 0
    for s in slices:
        hu = _stored_to_hu(stored[s.frame], ds, s.slope, s.intercept)
        n_air += _air_fill(hu, s)
        out[s.frame] = hu.astype(np.float32)
    return out, n_air


def _decode_slices(slices: list[_Slice], threads: int | None) -> tuple[np.ndarray, int]:
    """Decode every slice into a (K, rows, cols) float32 HU stack; returns it and the number of voxels set to air."""
    threads = threads or min(8, os.cpu_count() or 1)
    rows, cols = slices[0].size
    out = np.empty((len(slices), rows, cols), dtype=np.float32)
    multiframe: dict[Path, list[int]] = defaultdict(list)
    single = []
    for k, s in enumerate(slices):
        (multiframe[s.path] if s.frame is not None else single).append(k)

    def fill(k: int) -> int:
        arr, n = _decode_one(slices[k])
        if arr.shape != out.shape[1:]:
            raise ShapeError(f"{slices[k].path}: slice of shape {arr.shape}, expected {out.shape[1:]} like the others")
        out[k] = arr
        return n

    with ThreadPoolExecutor(max_workers=threads) as pool:
        n_air = sum(pool.map(fill, single))
    for path, ks in multiframe.items():
        frames, n = _decode_multiframe(path, [slices[k] for k in ks])
        n_air += n
        for k in ks:
            out[k] = frames[slices[k].frame]
    return out, n_air


