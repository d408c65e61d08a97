"""Real scanner exports (issue 18): what sits next to the CT slices in a series folder, and how pixels are stored.

Every case is built in the test from the real shared control series (32 slices, JPEG Lossless, 12-bit unsigned,
RescaleIntercept -1024) with pydicom (``tests/dicom_utils.py``). The reader must give the clean series' HU, or, where
the quirk changes values by design (padding / out-of-field voxels become air), exactly the expected HU; and
``covidctnet preprocess`` must give the clean series' output (or the output of the expected HU).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from dicom_utils import (
    ENHANCED_CT_IMAGE,
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE,
    dose_report,
    enhanced_ct,
    hu_of,
    localizer,
    reslice_series,
    secondary_capture,
    set_stored,
)
from pydicom.uid import generate_uid

from covidctnet.cli import cli
from covidctnet.core.errors import ShapeError, SliceGapError
from covidctnet.io.checks import check_volume
from covidctnet.io.volume import AIR_HU, Volume, read_volume
from covidctnet.preprocessing.preprocess import PreprocessConfig, preprocess_volume

SIZE = 64  # in-plane size of the preprocessed outputs compared here (small: the comparison is what matters)
LOGGER = "covidctnet.io.dicom"


@pytest.fixture(scope="module")
def clean(dicom_dirs):
    return read_volume(dicom_dirs["control"])


@pytest.fixture(scope="module")
def clean_output(dicom_dirs, tmp_path_factory):
    """``covidctnet preprocess`` of the clean series: (array, affine)."""
    return _preprocess(dicom_dirs["control"], tmp_path_factory.mktemp("clean_out"))


_RESLICED: dict[str, Path] = {}


@pytest.fixture(scope="module")
def resliced(dicom_dirs, tmp_path_factory):
    """``resliced(plane)``: the real series re-sliced into ``plane`` (built once per module: 512 files)."""

    def get(plane: str) -> Path:
        if plane not in _RESLICED:
            _RESLICED[plane] = reslice_series(dicom_dirs["control"], tmp_path_factory.mktemp(plane) / plane, plane)
        return _RESLICED[plane]

    yield get
    _RESLICED.clear()


def _files(src: Path) -> list[Path]:
    return sorted(src.glob("*.dcm"))


def _outside_fov(shape: tuple[int, int], radius: float = 240.0) -> np.ndarray:
    """Pixels outside a reconstruction circle: where scanners write their padding / out-of-field value."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    return (yy - cy) ** 2 + (xx - cx) ** 2 > radius**2


def _preprocess(path: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    result = CliRunner().invoke(cli, ["preprocess", str(path), "-o", str(out), "--size", str(SIZE)])
    assert result.exit_code == 0, result.output
    (written,) = [p for p in out.glob("*.nii.gz")]
    img = nib.load(written)
    return np.asarray(img.dataobj), img.affine


def _skip_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "skipped" in r.getMessage()]


# --------------------------------------------------------------------------------------------------------------------
# pixel-storage quirks, one slice each; the expected HU of each slice


def _quirk(i: int, ds) -> np.ndarray | None:
    """Store slice ``i`` (a real slice) the way one scanner or another does; returns the HU the reader must give
    for it (None: the clean slice's HU)."""
    stored = ds.pixel_array  # uint16, 12 bits stored
    hu = hu_of(ds)
    outside = _outside_fov(stored.shape)
    kind = i % 8
    if kind == 1:  # MONOCHROME1: dark is high; GDCM/ITK and our pydicom path invert within BitsStored
        set_stored(ds, (4095 - stored).astype(np.uint16), 12, "MONOCHROME1")
    elif kind == 2:  # signed, stored = HU, no intercept
        set_stored(ds, hu.astype(np.int16), 16)
        ds.RescaleIntercept = "0"
    elif kind == 3:  # unsigned with a large negative intercept: HU + 40000 stored; uint16 arithmetic would wrap
        set_stored(ds, (hu + 40000).astype(np.uint16), 16)
        ds.RescaleIntercept = "-40000"
    elif kind == 4:  # signed with a large positive intercept: int16 arithmetic would overflow
        set_stored(ds, (hu - 30000).astype(np.int16), 16)
        ds.RescaleIntercept = "30000"
    elif kind == 5:  # GE style: signed, PixelPaddingValue -2000 outside the field of view (-3024 HU)
        signed = stored.astype(np.int16)
        signed[outside] = -2000
        set_stored(ds, signed, 16)
        ds.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue, signed like the pixels
        return np.where(outside, AIR_HU, hu)
    elif kind == 6:  # out-of-field -2000 HU without any PixelPaddingValue
        signed = stored.astype(np.int16)
        signed[outside] = -2000 + 1024
        set_stored(ds, signed, 16)
        return np.where(outside, AIR_HU, hu)
    elif kind == 7:  # MONOCHROME1, signed 12 bit: GDCM refuses it, so the pydicom fallback decodes it
        set_stored(ds, (-1 - hu).astype(np.int16), 12, "MONOCHROME1")
        ds.RescaleIntercept = "0"
    elif i in (16, 24):  # Philips style: PixelPaddingValue 0 (-1024 HU) on unsigned data
        padded = stored.copy()
        padded[outside] = 0
        set_stored(ds, padded, 12)
        ds.add_new(0x00280120, "US", 0)  # PixelPaddingValue
        return np.where(padded == 0, AIR_HU, hu)
    return None


def _quirky_series(src: Path, dst: Path) -> np.ndarray:
    """Every slice of ``src`` stored by :func:`_quirk`; returns the expected (I, J, K) HU array."""
    dst.mkdir(parents=True)
    expected = []
    for i, f in enumerate(_files(src)):
        ds = pydicom.dcmread(f)
        clean_hu = hu_of(ds)
        want = _quirk(i, ds)
        ds.save_as(dst / f.name, enforce_file_format=True)
        expected.append((clean_hu if want is None else want).T)
    return np.stack(expected, axis=-1).astype(np.float32)


def _add_export_extras(src: Path, folder: Path) -> None:
    """What a PACS export puts next to the slices: two scouts (one flagged LOCALIZER, one only in another
    orientation), a dose report, a dose screen (secondary capture), the same slice twice, and a README."""
    files = _files(src)
    localizer(files[16], folder / "scout_coronal.dcm", flagged=True)
    localizer(files[16], folder / "scout_sagittal.dcm", flagged=False, plane="sagittal")
    dose_report(files[0], folder / "dose_report.dcm")
    secondary_capture(files[0], folder / "dose_screen.dcm")
    shutil.copyfile(folder / files[9].name, folder / "0010_again.dcm")  # same SOPInstanceUID
    (folder / "README.txt").write_text("exported by the PACS\n")


# --------------------------------------------------------------------------------------------------------------------
# the reader


def test_non_slices_are_skipped_with_one_line(dicom_dirs, clean, tmp_path, caplog):
    folder = tmp_path / "export"
    shutil.copytree(dicom_dirs["control"], folder)
    _add_export_extras(dicom_dirs["control"], folder)
    caplog.set_level(logging.INFO, logger=LOGGER)
    vol = read_volume(folder)
    np.testing.assert_array_equal(vol.array, clean.array)
    np.testing.assert_allclose(vol.affine, clean.affine)
    (line,) = _skip_lines(caplog)
    assert "read 32 slices; skipped 6 of 38 files" in line
    for reason in ("1 localizer (ImageType LOCALIZER)", "1 localizer (orientation differs from the other 32 slices)",
                   "1 not a CT image (SOP class X-Ray Radiation Dose SR Storage)",
                   "1 not a CT image (SOP class Secondary Capture Image Storage)",
                   "1 duplicate (same position and pixel data as another file)", "1 not DICOM"):
        assert reason in line, line
    assert vol.info["skipped"]["not DICOM"] == 1
    # no identifier of the patient or of a file in the line: counts and reasons only
    ds = pydicom.dcmread(_files(dicom_dirs["control"])[0], stop_before_pixels=True)
    for tag in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "SeriesInstanceUID"):
        value = str(ds.get(tag, "") or "")
        assert not value or value not in line, tag
    assert "0010_again" not in line and "scout" not in line


def test_scout_in_its_own_series_is_skipped(dicom_dirs, clean, tmp_path, caplog):
    folder = tmp_path / "export"
    shutil.copytree(dicom_dirs["control"], folder)
    scout = localizer(_files(folder)[16], folder / "scout.dcm", flagged=True)
    ds = pydicom.dcmread(scout)
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(scout)
    caplog.set_level(logging.INFO, logger=LOGGER)
    np.testing.assert_array_equal(read_volume(folder).array, clean.array)
    assert "series found" not in caplog.text  # the scout's series is not a second CT series
    assert "1 localizer (ImageType LOCALIZER)" in _skip_lines(caplog)[0]


def test_dose_screen_stored_as_a_ct_image_is_skipped(dicom_dirs, clean, tmp_path, caplog):
    """Some scanners store the dose screen as a CT Image (ImageType SCREEN SAVE), with geometry, in the series."""
    folder = tmp_path / "export"
    shutil.copytree(dicom_dirs["control"], folder)
    ds = pydicom.dcmread(_files(folder)[5])
    ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(folder / "dose_screen.dcm")
    caplog.set_level(logging.INFO, logger=LOGGER)
    np.testing.assert_array_equal(read_volume(folder).array, clean.array)
    assert "1 screen capture (ImageType SCREEN SAVE)" in _skip_lines(caplog)[0]


def test_dicomdir_is_skipped(dicom_dirs, clean, tmp_path, caplog):
    from pydicom.fileset import FileSet

    folder = tmp_path / "export"
    shutil.copytree(dicom_dirs["control"], folder)
    fs = FileSet()
    fs.add(_files(folder)[0])
    fs.write(tmp_path / "fileset")  # writes DICOMDIR beside a copy of the slice
    shutil.copyfile(tmp_path / "fileset" / "DICOMDIR", folder / "DICOMDIR")
    caplog.set_level(logging.INFO, logger=LOGGER)
    np.testing.assert_array_equal(read_volume(folder).array, clean.array)
    assert "1 not a CT image (SOP class Media Storage Directory Storage)" in _skip_lines(caplog)[0]


def test_only_a_dose_report_is_not_a_series(dicom_dirs, tmp_path):
    from covidctnet.core.errors import SeriesSelectionError

    folder = tmp_path / "dose_only"
    folder.mkdir()
    dose_report(_files(dicom_dirs["control"])[0], folder / "dose.dcm")
    with pytest.raises(SeriesSelectionError, match=r"dose_only: no CT image to read; skipped 1 of 1 files"):
        read_volume(folder)


def test_duplicate_file_is_read_once_but_two_slices_at_one_position_are_refused(dicom_dirs, clean, tmp_path):
    src = _files(dicom_dirs["control"])[9]
    same = tmp_path / "same"
    shutil.copytree(dicom_dirs["control"], same)
    shutil.copyfile(src, same / "copy_of_0010.dcm")
    vol = read_volume(same)
    np.testing.assert_array_equal(vol.array, clean.array)
    check_volume(vol)

    other = tmp_path / "other"
    shutil.copytree(dicom_dirs["control"], other)
    # The same image under another SOPInstanceUID (a re-export) is still the same image: content decides.
    renamed = tmp_path / "renamed"
    shutil.copytree(dicom_dirs["control"], renamed)
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(renamed / "reexported_0010.dcm")
    vol = read_volume(renamed)
    np.testing.assert_array_equal(vol.array, clean.array)
    assert vol.info["skipped"] == {"duplicate (same position and pixel data as another file)": 1}

    # Another image at the position of 0010.dcm (its neighbour's pixels), under the same or another UID: both kept,
    # and check_volume refuses the stack.
    neighbour = pydicom.dcmread(_files(dicom_dirs["control"])[10]).pixel_array
    for uid in (ds.SOPInstanceUID, pydicom.dcmread(src).SOPInstanceUID):
        other = tmp_path / f"other_{len(uid)}_{uid[-4:]}"
        shutil.copytree(dicom_dirs["control"], other)
        ds = pydicom.dcmread(src)
        set_stored(ds, neighbour, 12)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(other / "another_0010.dcm")
        vol = read_volume(other)
        assert vol.shape[2] == 33
        with pytest.raises(SliceGapError, match="1 duplicated slice position"):
            check_volume(vol)


def test_same_uid_at_another_position_is_a_slice_of_its_own(dicom_dirs, tmp_path, caplog):
    """A file with the SOPInstanceUID of another but at another position is another slice (anonymised exports give
    every slice one UID); here it lies far outside the stack, so check_volume refuses the stack."""
    folder = tmp_path / "moved"
    shutil.copytree(dicom_dirs["control"], folder)
    ds = pydicom.dcmread(_files(folder)[9])
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], 500.0]
    ds.save_as(folder / "moved.dcm")
    caplog.set_level(logging.INFO, logger=LOGGER)
    vol = read_volume(folder)
    assert vol.shape[2] == 33 and vol.info["shared_sop_instance_uids"] == 2
    assert "2 files share one SOPInstanceUID (anonymised export?); slices ordered by position" in caplog.text
    with pytest.raises((SliceGapError, ShapeError), match="voxel size|gap of"):
        check_volume(vol)


@pytest.mark.parametrize("decoder", ["simpleitk", "pydicom"])
def test_pixel_storage_quirks_give_the_expected_hu(dicom_dirs, clean, tmp_path, monkeypatch, decoder):
    """MONOCHROME1, signed/unsigned with intercepts that overflow 16 bits, PixelPaddingValue (GE -2000 signed,
    Philips 0 unsigned) and out-of-field -2000 HU: each slice gives its expected HU, by either decoder."""
    if decoder == "pydicom":
        import SimpleITK as sitk

        def refuse(*args, **kwargs):
            raise RuntimeError("decoder disabled by the test")

        monkeypatch.setattr(sitk, "ReadImage", refuse)
    expected = _quirky_series(dicom_dirs["control"], tmp_path / "quirky")
    vol = read_volume(tmp_path / "quirky")
    np.testing.assert_array_equal(vol.array, expected)
    np.testing.assert_allclose(vol.affine, clean.affine)
    # the slices without padding are the clean slices exactly
    for k in (0, 1, 2, 3, 4, 7, 8, 9):
        np.testing.assert_array_equal(vol.array[..., k], clean.array[..., k])
    outside = _outside_fov((512, 512)).T  # (I, J) = (column, row)
    padded = 8 * int(outside.sum()) + sum(int((outside | (clean.array[..., k] == -1024)).sum()) for k in (16, 24))
    assert vol.info["air_filled_voxels"] == padded


@pytest.mark.parametrize("sop_class, compressed", [(ENHANCED_CT_IMAGE, False), (ENHANCED_CT_IMAGE, True),
                                                   (LEGACY_CONVERTED_ENHANCED_CT_IMAGE, False)],
                         ids=["enhanced", "enhanced-jpeg-lossless", "legacy-converted"])
def test_enhanced_ct_multiframe_file(dicom_dirs, clean, tmp_path, sop_class, compressed):
    folder = tmp_path / "enhanced"
    enhanced_ct(dicom_dirs["control"], folder, sop_class=sop_class, compressed=compressed)
    assert len(list(folder.iterdir())) == 1
    vol = read_volume(folder)
    assert vol.info["multiframe"] is True
    np.testing.assert_array_equal(vol.array, clean.array)
    np.testing.assert_allclose(vol.affine, clean.affine, atol=1e-6)
    np.testing.assert_allclose(vol.slice_positions, clean.slice_positions)
    assert check_volume(vol)


def test_copied_enhanced_ct_file_is_read_once(dicom_dirs, clean, tmp_path):
    """A second copy of a multi-frame file: each of its frames is a duplicate of the same frame of the first."""
    folder = tmp_path / "enhanced_twice"
    shutil.copyfile(enhanced_ct(dicom_dirs["control"], folder), folder / "copy.dcm")
    vol = read_volume(folder)
    np.testing.assert_array_equal(vol.array, clean.array)
    assert vol.info["skipped"] == {"duplicate (same position and pixel data as another file)": clean.shape[2]}
    assert check_volume(vol)


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_sagittal_and_coronal_series_read_into_ras(clean, resliced, plane):
    """The real series re-sliced (no interpolation) into sagittal or coronal images with consistent headers: after
    reorientation to RAS it is the axial series voxel for voxel, at the same positions."""
    folder = resliced(plane)
    vol = read_volume(folder)
    assert vol.shape[2] == 512  # one slice per column (sagittal) or row (coronal) of the axial images
    check_volume(vol)
    a = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
    b = nib.as_closest_canonical(nib.Nifti1Image(clean.array, clean.affine))
    assert nib.aff2axcodes(a.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# end to end: `covidctnet preprocess`


def test_quirk_laden_export_preprocesses_like_the_clean_series(dicom_dirs, clean_output, tmp_path, caplog):
    """All export quirks in one folder: the output is the clean series' output where no value changes by design,
    and equals the output of the expected HU (padding as air) everywhere."""
    src = dicom_dirs["control"]
    folder = tmp_path / "in" / "control-normal001"
    expected = _quirky_series(src, folder)
    _add_export_extras(folder, folder)
    clean_out, clean_affine = clean_output
    out, affine = _preprocess(folder, tmp_path / "quirky")
    clean = read_volume(src)
    want, want_affine = preprocess_volume(Volume(expected, clean.affine, src), PreprocessConfig(size_xy=SIZE))
    np.testing.assert_allclose(out, want, atol=1e-6)
    np.testing.assert_allclose(affine, want_affine, atol=1e-4)
    np.testing.assert_allclose(affine, clean_affine, atol=1e-4)
    # Inside the field of view the output is the clean one, up to air (-1024 HU, Philips padding 0) now read as
    # -1000 HU next to tissue: at most 24 HU / 1400 HU of the window.
    fov = ~_outside_fov((SIZE, SIZE), radius=(240 - 16) / (512 / SIZE))
    assert np.abs(out - clean_out)[fov].max() <= 24 / 1400 + 1e-6
    assert np.mean(np.abs(out - clean_out)[fov] < 1e-6) > 0.99
    assert len([r for r in caplog.records if r.name == LOGGER and "skipped" in r.getMessage()]) == 1


@pytest.mark.parametrize("kind", ["enhanced", "sagittal", "coronal"])
def test_other_layouts_preprocess_like_the_clean_series(dicom_dirs, clean_output, resliced, tmp_path, kind):
    """One Enhanced CT file, a sagittal and a coronal series: `covidctnet preprocess` gives the clean output."""
    folder = enhanced_ct(dicom_dirs["control"], tmp_path / "enhanced").parent if kind == "enhanced" else resliced(kind)
    clean_out, clean_affine = clean_output
    out, affine = _preprocess(folder, tmp_path / "out")
    np.testing.assert_allclose(out, clean_out, atol=1e-6)
    np.testing.assert_allclose(affine, clean_affine, atol=1e-4)
