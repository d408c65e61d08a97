"""Reading CT volumes into Hounsfield units: the format dispatch (:func:`read_volume`), NIfTI and NRRD/MHA files, and
writing NIfTI atomically. DICOM series are read by :mod:`covidctnet.io.dicom`.

Every reader returns a :class:`~covidctnet.io.base.Volume` (importable from here too): a float32 array indexed
``(i, j, k)`` and a 4×4 affine that maps voxel indices to RAS+ world coordinates in mm, the nibabel convention.
NIfTI/NRRD header geometry is checked, never defaulted (see :func:`read_nifti`); values below
:data:`~covidctnet.io.base.FILL_BELOW_HU` (a converter's out-of-field fill) become air. Patient identifiers are never
read into the result or logged: a study is named after its file or folder.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

try:  # ISA-L's deflate: zlib's format at about 7× its speed (see write_nifti)
    from isal import isal_zlib as _deflate
except ImportError:  # pragma: no cover - isal has wheels for x86-64 and arm64 Linux, macOS and Windows
    _deflate = zlib

from covidctnet.core.errors import ShapeError, UnreadableFileError
from covidctnet.core.files import atomic_path
from covidctnet.io.base import AIR_HU, FILL_BELOW_HU, LPS_TO_RAS, Volume, short_error
from covidctnet.io.dicom import read_dicom_series

__all__ = [
    "Volume",
    "AIR_HU",
    "FILL_BELOW_HU",
    "read_volume",
    "read_nifti",
    "read_itk",
    "write_nifti",
    "study_id_from_path",
    "is_volume_file",
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


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
        The volume in HU with its RAS+ affine. Values below :data:`FILL_BELOW_HU` (out-of-field fill) and DICOM
        padding are air (:data:`AIR_HU`).

    Raises:
        UnreadableFileError: missing, empty, truncated or unknown file.
        ShapeError: a NIfTI/NRRD header geometry that cannot be trusted (see :func:`read_nifti`, :func:`read_itk`).
        NotCTError, SeriesSelectionError, ShapeError, SliceGapError: see
            :func:`covidctnet.io.dicom.read_dicom_series`.
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
        return _out_of_field_to_air(read_nifti(path))
    if name.endswith(ITK_SUFFIXES):
        return _out_of_field_to_air(read_itk(path))
    if name.endswith(".dcm"):
        raise UnreadableFileError(f"{path}: a single DICOM file is one slice; pass the folder holding the series")
    raise UnreadableFileError(
        f"{path}: unknown file type; expected .nii/.nii.gz, .nrrd/.mha/.mhd, or a DICOM series folder"
    )


def _out_of_field_to_air(volume: Volume) -> Volume:
    """Set values below :data:`FILL_BELOW_HU` (a converted scanner's out-of-field fill) to :data:`AIR_HU`, in place,
    as the DICOM reader does; infinite values are left for ``check_volume`` to refuse."""
    mask = np.isfinite(volume.array) & (volume.array < FILL_BELOW_HU)
    n = int(mask.sum())
    volume.info["air_filled_voxels"] = n
    if n:
        volume.array[mask] = AIR_HU
        logger.info("%s: %d out-of-field voxels (below %g HU) set to air (%g HU)", volume.source, n, FILL_BELOW_HU,
                    AIR_HU)
    return volume


def _check_3d(array_shape: tuple[int, ...], path: Path) -> None:
    if len(array_shape) == 4 and array_shape[3] == 1:
        return
    if len(array_shape) != 3:
        kind = {2: "a 2-D image", 4: "a 4-D series", 5: "a 5-D image"}.get(len(array_shape), f"{len(array_shape)}-D")
        raise ShapeError(f"{path}: {kind} of shape {array_shape}; expected one 3-D CT volume")


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file (scl_slope/scl_inter applied) as float32 with the RAS+ affine its header defines.

    The header's geometry is checked before nibabel reads it (nibabel would silently turn a 0 mm pixdim into 1 mm):
    see :func:`_nifti_affine` for what is refused and which of the qform and sform is used.

    Raises:
        UnreadableFileError: truncated file, wrong magic, not NIfTI.
        ShapeError: not one 3-D volume, or a header geometry that cannot be trusted.
    """
    import nibabel as nib

    path = Path(path)
    try:
        raw = _raw_nifti_header(path)
        if raw is not None:
            _check_3d(tuple(raw.get_data_shape()), path)
            affine = _nifti_affine(path, raw, tuple(raw.get_data_shape())[:3])
        img = nib.load(str(path))
        _check_3d(img.shape, path)
        if raw is None:  # nibabel read what our header probe could not: take its geometry through the same checks
            affine = _nifti_affine(path, img.header, img.shape[:3])
        array = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    except ShapeError:
        raise
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise UnreadableFileError(
            f"{path}: cannot read NIfTI ({short_error(err)}); the file may be truncated or not be NIfTI at all"
        ) from err
    if array.ndim == 4:
        array = array[..., 0]
    return Volume(array=array, affine=affine, source=path, info={"format": "nifti"})


def _raw_nifti_header(path: Path) -> Any:
    """The NIfTI-1 or NIfTI-2 header as written (``check=False``: nibabel's load-time fixes not applied), or None
    when the file does not start with one (nibabel's own load then says why)."""
    import io

    import nibabel as nib
    from nibabel.spatialimages import HeaderDataError
    from nibabel.wrapstruct import WrapStructError

    try:
        with nib.openers.ImageOpener(str(path)) as fobj:
            block = fobj.read(540)  # the NIfTI-2 header size; NIfTI-1 uses the first 348 bytes
    except (EOFError, OSError, zlib.error):
        return None
    for header_class, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        if len(block) < size:
            continue
        try:
            # Only the header bytes: extensions are nibabel's business when it loads the file.
            header = header_class.from_fileobj(io.BytesIO(block[:size]), check=False)
        except (HeaderDataError, WrapStructError, ValueError, EOFError):
            continue
        if bytes(header["magic"]).rstrip(b"\0") in (b"n+1", b"ni1", b"n+2", b"ni2"):
            return header
    return None


def _nifti_sform(header: Any) -> tuple[np.ndarray | None, str]:
    if int(header["sform_code"]) == 0:
        return None, "sform_code 0, not set"
    affine = np.asarray(header.get_sform(), dtype=np.float64)
    if not np.isfinite(affine).all():
        return None, "not finite"
    if np.any(np.linalg.norm(affine[:3, :3], axis=0) == 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        return None, "singular (a zero voxel size or two parallel axes)"
    return affine, ""


def _nifti_qform(header: Any) -> tuple[np.ndarray | None, str]:
    from nibabel.spatialimages import HeaderDataError

    if int(header["qform_code"]) == 0:
        return None, "qform_code 0, not set"
    header = header.copy()
    qfac = float(header["pixdim"][0])
    if qfac == 0:  # the NIfTI standard: qfac 0 means 1
        header["pixdim"][0] = 1
    elif qfac not in (-1.0, 1.0):
        return None, f"qfac (pixdim[0]) is {qfac:g}, not 1 or -1"
    quaternion = np.asarray([header["quatern_b"], header["quatern_c"], header["quatern_d"]], dtype=np.float64)
    if not np.isfinite(quaternion).all() or float(np.sum(quaternion**2)) > 1 + 1e-6:
        return None, "its quaternion is not a rotation"
    try:
        affine = np.asarray(header.get_qform(), dtype=np.float64)
    except (HeaderDataError, ValueError) as err:
        return None, short_error(err)
    if not np.isfinite(affine).all():
        return None, "not finite"
    return affine, ""


def _corner_distance(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (mm) between where two affines put the corner voxels of a grid of ``shape``."""
    corners = np.array(np.meshgrid(*[[0, max(n - 1, 0)] for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.max(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0)))


def _nifti_affine(path: Path, header: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The voxel → RAS+ affine of a NIfTI header, refusing what no reader can be sure of.

    Refused (:class:`ShapeError`, one line naming the file): a voxel size (pixdim[1..3]) that is zero, negative or not
    finite; a header in which neither the qform nor the sform is valid (not set, singular, not finite; nibabel would
    fall back to a made-up geometry); an sform whose voxel sizes differ from pixdim by more than a voxel over the
    volume (nibabel reads the sform, ITK reads pixdim: two tools would see two scans). When both are valid and
    disagree by more than a voxel, the sform is used, as nibabel does, and a warning says so; when only one is valid,
    that one, with a warning if the other was set. Shear is refused later, by ``check_volume``.

    Args:
        path: the file (for messages).
        header: its header as written (not fixed by nibabel).
        shape: the (I, J, K) grid.

    Returns:
        (4, 4) float64 affine in mm.
    """
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    for n, (axis, size) in enumerate(zip("ijk", pixdim), start=1):
        if not (np.isfinite(size) and size > 0):
            raise ShapeError(
                f"{path}: voxel size {size:g} mm along {axis} in the header (pixdim[{n}]); expected a positive, "
                "finite size in mm"
            )
    sform, s_why = _nifti_sform(header)
    qform, q_why = _nifti_qform(header)
    if sform is None and qform is None:
        raise ShapeError(
            f"{path}: neither the sform ({s_why}) nor the qform ({q_why}) gives a valid geometry; "
            "refusing to guess where the voxels are"
        )
    voxel = float(pixdim.min())
    if sform is not None and qform is not None:
        gap = _corner_distance(sform, qform, shape)
        if gap > voxel:
            logger.warning(
                "%s: qform and sform disagree by %.3g mm (more than a voxel, %.3g mm); using the sform, as nibabel "
                "does",
                path,
                gap,
                voxel,
            )
    elif sform is not None and int(header["qform_code"]) > 0:
        logger.warning("%s: the qform is invalid (%s); using the sform", path, q_why)
    elif qform is not None and int(header["sform_code"]) > 0:
        logger.warning("%s: the sform is invalid (%s); using the qform", path, s_why)
    if sform is None:
        return qform  # type: ignore[return-value]
    sizes = np.linalg.norm(sform[:3, :3], axis=0)
    drift = np.abs(sizes - pixdim) * np.maximum(np.asarray(shape, dtype=np.float64) - 1, 1)
    excess = drift - np.minimum(sizes, pixdim)
    worst = int(np.argmax(excess))
    if excess[worst] > 0:
        raise ShapeError(
            f"{path}: voxel size {pixdim[worst]:g} mm along {'ijk'[worst]} in the header (pixdim[{worst + 1}]) but "
            f"{sizes[worst]:.4g} mm in the sform; readers disagree on this file's geometry (nibabel uses the sform, "
            "ITK pixdim)"
        )
    return sform


def read_itk(path: str | os.PathLike) -> Volume:
    """Read a NRRD/MetaImage file with SimpleITK, converting its LPS geometry to a RAS+ affine.

    Raises:
        UnreadableFileError: a file SimpleITK cannot read.
        ShapeError: not one grey-scale 3-D volume, or a voxel size that is zero, negative or not finite.
    """
    import SimpleITK as sitk

    path = Path(path)
    _check_itk_header_spacing(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        if "spacing" in str(err).lower():  # ITK refuses a zero spacing itself, in a multi-line message
            raise ShapeError(
                f"{path}: voxel size 0 mm in the header ({short_error(err)}); expected positive sizes in mm"
            ) from err
        raise UnreadableFileError(f"{path}: cannot read image ({short_error(err)})") from err
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ShapeError(f"{path}: {img.GetNumberOfComponentsPerPixel()} components per voxel; expected grey-scale CT")
    _check_3d(tuple(img.GetSize()), path)
    for axis, size in zip("ijk", img.GetSpacing()):
        if not (np.isfinite(size) and size > 0):
            raise ShapeError(f"{path}: voxel size {size:g} mm along {axis} in the header; expected a positive size")
    affine = _itk_affine(img)
    if not np.isfinite(affine).all():
        raise ShapeError(f"{path}: the header's direction or origin is not finite")
    array = np.ascontiguousarray(sitk.GetArrayFromImage(img).astype(np.float32, copy=False).transpose(2, 1, 0))
    return Volume(array=array, affine=affine, source=path, info={"format": "itk"})


def _check_itk_header_spacing(path: Path) -> None:
    """Refuse a NRRD/MetaImage header whose voxel sizes are zero, negative or not finite, as written.

    ITK takes the absolute value of a negative MetaImage ElementSpacing and reads "nan" as 0, so the header text is
    checked before it: MetaImage ``ElementSpacing`` / ``ElementSize``, NRRD ``spacings`` and ``space directions``
    (the length of each direction vector). A header with none of them is refused too (ITK would assume 1 mm).
    """
    import re

    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
    except OSError:
        return  # ITK's read will name the problem
    # A NRRD header ends at a blank line, a MetaImage header at its ElementDataFile line.
    text = head.split(b"\n\n", 1)[0].split(b"ElementDataFile", 1)[0].decode("latin-1", errors="replace")
    found = False
    for line in text.splitlines():
        key, sep, value = line.partition("=") if "=" in line.split(":", 1)[0] else line.partition(":")
        name, key = key.strip(), key.strip().lower()
        if not sep or key not in ("elementspacing", "elementsize", "spacings", "space directions"):
            continue
        found = True
        if key == "space directions":
            vectors = re.findall(r"\(([^)]*)\)", value)
            sizes = [float(np.linalg.norm([_float(v) for v in vec.split(",")])) for vec in vectors]
        else:
            sizes = [_float(v) for v in value.split()]
        for axis, size in zip("ijk", sizes):
            if not (np.isfinite(size) and size > 0):
                raise ShapeError(
                    f"{path}: voxel size {size:g} mm along {axis} in the header ({name}); "
                    "expected a positive, finite size in mm"
                )
    if not found and (text.startswith("NRRD") or "NDims" in text):
        # ITK would assume 1 mm voxels: a silent default we do not take.
        raise ShapeError(
            f"{path}: no voxel size in the header (NRRD 'space directions'/'spacings', MetaImage 'ElementSpacing'); "
            "refusing to assume 1 mm"
        )


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _itk_affine(img: Any) -> np.ndarray:
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = img.GetOrigin()
    return LPS_TO_RAS @ lps




def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Write a float32 NIfTI atomically (temp file + rename), with qform and sform set to ``affine``.

    A ``.nii.gz`` is compressed in parallel: the file is cut into one piece per core, each piece becomes its own gzip
    member (level 1, as nibabel; the compressor releases the GIL, so threads run at once), and the members are written
    one after the other. A gzip file of several members is standard (RFC 1952) and reads as one stream in nibabel,
    ITK / SimpleITK, FSL and every zlib ``gzread`` reader. The compressor is Intel ISA-L's (``isal``) when installed,
    else zlib's (timings: ``docs/implementation-notes.md``). The members carry no time stamp, so equal arrays give
    byte-identical files (for one compressor).
    """
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        if not str(path).endswith(".gz"):
            nib.save(img, str(tmp))
            return
        raw = memoryview(img.to_bytes())
        n = max(1, min(8, os.cpu_count() or 1))
        step = -(-len(raw) // n)

        def member(k: int) -> bytes:
            packer = _deflate.compressobj(1, _deflate.DEFLATED, 31)  # wbits 31: a gzip member, mtime 0
            return packer.compress(raw[k * step : (k + 1) * step]) + packer.flush()

        with ThreadPoolExecutor(max_workers=n) as pool:
            members = list(pool.map(member, range(n)))
        with open(tmp, "wb") as fh:
            for part in members:
                fh.write(part)
