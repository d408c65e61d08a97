"""covidctnet.io.dicom: DICOM CT series into HU, on the real shared series and on copies edited with pydicom.

Exports with extra objects and pixel-storage quirks are in test_dicom_exports.py.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from data_paths import require_data
from dicom_utils import copy_series, set_stored
from pydicom.uid import generate_uid

from covidctnet.cli import cli
from covidctnet.core.errors import NotCTError, SeriesSelectionError, ShapeError, SliceGapError, UnreadableFileError
from covidctnet.io.checks import check_volume
from covidctnet.io.volume import read_volume
from covidctnet.preprocessing.preprocess import PreprocessConfig, preprocess_volume


def test_dicom_series_in_hu_sorted_by_position(dicom_dirs):
    vol = read_volume(dicom_dirs["control"])
    assert vol.shape == (512, 512, 32)
    np.testing.assert_allclose(vol.spacing, (0.634766, 0.634766, 2.0), atol=1e-5)
    # SOURCES.md: HU min/max -1024 / 1540 for this series.
    assert vol.array.min() == -1024 and vol.array.max() == 1540
    assert nib.aff2axcodes(vol.affine) == ("L", "P", "S")
    assert np.all(np.diff(vol.slice_positions) > 0)
    # Slice k is the file with the k-th smallest z (0001.dcm = most inferior), whatever InstanceNumber says.
    ds = pydicom.dcmread(dicom_dirs["control"] / "0005.dcm")
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(vol.array[:, :, 4], hu.T)
    # The affine puts voxel (0, 0, 0) at the first slice's ImagePositionPatient (LPS -> RAS flips x and y).
    ipp = np.array([float(v) for v in pydicom.dcmread(dicom_dirs["control"] / "0001.dcm").ImagePositionPatient])
    np.testing.assert_allclose(vol.affine[:3, 3], ipp * [-1, -1, 1], atol=1e-4)


def test_file_names_do_not_decide_order(dicom_dirs, tmp_path):
    # Rename files in reverse so name order is the opposite of position order.
    src = dicom_dirs["covid"]
    files = sorted(src.glob("*.dcm"))
    for i, f in enumerate(files):
        shutil.copyfile(f, tmp_path / f"{len(files) - i:04d}.dcm")
    np.testing.assert_array_equal(read_volume(tmp_path).array, read_volume(src).array)


def test_truncated_dicom_slice(dicom_dirs, tmp_path):
    folder = copy_series(dicom_dirs["cap"], tmp_path / "s")
    f = folder / "0010.dcm"
    f.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(UnreadableFileError, match="0010.dcm"):
        read_volume(folder)


def test_mr_modality(dicom_dirs, tmp_path):
    def to_mr(i, ds):
        ds.Modality = "MR"

    folder = copy_series(dicom_dirs["cap"], tmp_path / "mr", edit=to_mr)
    with pytest.raises(NotCTError, match="MR"):
        read_volume(folder)


def test_two_series_takes_the_larger_ct(dicom_dirs, tmp_path, caplog):
    def second_series(i, ds):
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".2"

    folder = copy_series(dicom_dirs["control"], tmp_path / "two", keep=lambda i: i >= 12)
    for f in sorted(dicom_dirs["control"].glob("*.dcm"))[:12]:
        ds = pydicom.dcmread(f)
        second_series(0, ds)
        ds.save_as(folder / f"b{f.name}")
    vol = read_volume(folder)
    assert vol.shape[2] == 20
    assert "2 series found" in caplog.text
    small_uid = pydicom.dcmread(folder / "b0001.dcm").SeriesInstanceUID
    assert read_volume(folder, series_uid=small_uid).shape[2] == 12
    with pytest.raises(SeriesSelectionError, match="not found"):
        read_volume(folder, series_uid="1.2.3")


# --------------------------------------------------------------------------------------------------------------------
# anonymised exports (issue 24): COVID-CT-MD as published gives every slice one invalid, UUID-style SOPInstanceUID

UUID_UID = str(uuid.UUID(int=0x09BC8AEAFF9C4F7A9D1B2A3C4D5E6F70))  # the shape of the published files' value
LOGGER = "covidctnet.io.dicom"
SIZE = 64


@contextmanager
def _invalid_values_allowed():
    """pydicom refuses to set a UID that breaks the grammar; anonymisers write them anyway."""
    before = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        pydicom.config.settings.writing_validation_mode = before


def _anonymised(src: Path, dst: Path, edit) -> Path:
    with _invalid_values_allowed(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's VR warnings while the copy is made
        return copy_series(src, dst, edit=edit)


def _set_sop_uid(ds, uid: str) -> None:
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def _assert_same_volume(vol, clean) -> None:
    np.testing.assert_array_equal(vol.array, clean.array)
    np.testing.assert_array_equal(vol.affine, clean.affine)
    np.testing.assert_array_equal(vol.slice_positions, clean.slice_positions)


def _preprocess(folder: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    result = CliRunner().invoke(cli, ["preprocess", str(folder), "-o", str(out), "--size", str(SIZE)])
    assert result.exit_code == 0, result.output
    (written,) = out.glob("*.nii.gz")
    img = nib.load(written)
    return np.asarray(img.dataobj), img.affine


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def full_p001(tmp_path_factory):
    """The full COVID-CT-MD P001 series (148 slices) and a copy with one UUID-style SOPInstanceUID in every file."""
    src = require_data("ct-dicom-full", "covid-P001")
    shared = _anonymised(src, tmp_path_factory.mktemp("anon") / "covid-P001", lambda i, ds: _set_sop_uid(ds, UUID_UID))
    return src, shared


def test_one_shared_uuid_sop_instance_uid_reads_like_the_clean_series(full_p001, tmp_path, caplog):
    src, shared = full_p001
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the VR warning of the invalid UID read here
        uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in shared.glob("*.dcm")}
    assert uids == {UUID_UID}  # the copy really has one invalid UID (letters: not the DICOM grammar)
    caplog.set_level(logging.INFO, logger=LOGGER)
    clean = read_volume(src)
    vol = read_volume(shared)
    _assert_same_volume(vol, clean)
    assert vol.shape[2] == 148 and vol.info["shared_sop_instance_uids"] == 148
    assert clean.info["shared_sop_instance_uids"] == 0
    shared_lines = [m for m in _messages(caplog) if "share" in m]
    assert shared_lines == [f"{shared}: 148 files share one SOPInstanceUID (anonymised export?); slices ordered by "
                            "position"]
    # `covidctnet preprocess` of the copy writes what the clean series preprocesses to (float32, as written)
    out, affine = _preprocess(shared, tmp_path / "anon")
    clean_out, clean_affine = preprocess_volume(clean, PreprocessConfig(size_xy=SIZE))
    np.testing.assert_array_equal(out, np.asarray(clean_out, dtype=np.float32))
    np.testing.assert_allclose(affine, clean_affine, rtol=0, atol=1e-4)  # the NIfTI header stores float32


def test_identical_copy_in_a_shared_uid_series_is_dropped_and_a_different_image_is_kept(dicom_dirs, tmp_path):
    """With one SOPInstanceUID everywhere, content decides: the same file twice is one slice; another image at a
    slice's position is kept (and check_volume refuses the stack)."""
    clean = read_volume(dicom_dirs["covid"])
    folder = _anonymised(dicom_dirs["covid"], tmp_path / "dup", lambda i, ds: _set_sop_uid(ds, UUID_UID))
    shutil.copyfile(folder / "0007.dcm", folder / "0007_again.dcm")
    vol = read_volume(folder)
    _assert_same_volume(vol, clean)
    assert vol.info["skipped"] == {"duplicate (same position and pixel data as another file)": 1}
    ds = pydicom.dcmread(folder / "0007.dcm")
    set_stored(ds, pydicom.dcmread(folder / "0008.dcm").pixel_array, 12)
    with _invalid_values_allowed():
        ds.save_as(folder / "0007_again.dcm")
    vol = read_volume(folder)
    assert vol.shape[2] == 33
    with pytest.raises(SliceGapError, match="1 duplicated slice position"):
        check_volume(vol)


def _random_uid(i: int, salt: str) -> str:
    return generate_uid(entropy_srcs=[salt, str(i)])


def _edit(kind: str):
    """The edit of file ``i`` (name order: 0001.dcm = most inferior) that makes anonymiser artefact ``kind``."""

    def edit(i, ds):
        if kind == "invalid-uids":  # letters and more than 64 characters: not DICOM UIDs, still distinct per file
            _set_sop_uid(ds, f"ANON-{i:04d}-" + "x" * 70)
            ds.SeriesInstanceUID = "series-" + "y" * 60
            ds.StudyInstanceUID = "study.ABC"
            ds.FrameOfReferenceUID = UUID_UID
        elif kind == "series-uid-per-file":
            ds.SeriesInstanceUID = _random_uid(i, "series")
            ds.StudyInstanceUID = _random_uid(i, "study")
        elif kind == "study-uid-per-file":
            ds.StudyInstanceUID = _random_uid(i, "study")
        elif kind == "instance-number-missing":
            del ds.InstanceNumber
        elif kind == "instance-number-repeated":
            ds.InstanceNumber = 1
        elif kind == "slice-location-missing":
            del ds.SliceLocation
        elif kind == "slice-location-wrong":  # reversed and shifted: it disagrees with ImagePositionPatient
            ds.SliceLocation = str(100.0 + 2 * i)
            ds.InstanceNumber = (7 * i) % 32 + 1
        elif kind == "patient-blank":
            ds.PatientID = ""
            ds.PatientName = ""
        else:
            raise AssertionError(kind)

    return edit


READ_LIKE_CLEAN = ["invalid-uids", "series-uid-per-file", "study-uid-per-file", "instance-number-missing",
                   "instance-number-repeated", "slice-location-missing", "slice-location-wrong", "patient-blank"]


@pytest.mark.parametrize("kind", READ_LIKE_CLEAN)
def test_anonymiser_artefacts_read_like_the_clean_series(dicom_dirs, tmp_path, caplog, kind):
    clean = read_volume(dicom_dirs["cap"])
    folder = _anonymised(dicom_dirs["cap"], tmp_path / kind, _edit(kind))
    caplog.set_level(logging.INFO, logger=LOGGER)
    vol = read_volume(folder)
    _assert_same_volume(vol, clean)
    check_volume(vol)
    grouped = [m for m in _messages(caplog) if "grouped by geometry" in m]
    if kind == "series-uid-per-file":
        assert grouped == [f"{folder}: each of the 32 CT files has its own SeriesInstanceUID (anonymised export?); "
                           "grouped by geometry (orientation, pixel spacing, 512x512 pixels, a slice every 2 mm) "
                           "into one series of 32 files"]
        assert vol.info["grouped_by_geometry"] is True
    else:
        assert not grouped and vol.info["grouped_by_geometry"] is False
    if kind == "invalid-uids":
        (line,) = [m for m in _messages(caplog) if "notices" in m]
        assert "pydicom: The value length (N) exceeds the maximum length of N allowed for VR UI." in line, line


def test_randomised_series_uids_of_two_mixed_stacks_are_refused(dicom_dirs, tmp_path):
    """Files with one SeriesInstanceUID each that do not lie on one regular stack (a second reconstruction offset by
    0.7 mm mixed in) cannot be told apart: refused in one line, never merged."""

    def edit(i, ds):
        ds.SeriesInstanceUID = _random_uid(i, "series")
        if i % 2:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.7]

    folder = copy_series(dicom_dirs["cap"], tmp_path / "mixed", edit=edit)
    with pytest.raises(SeriesSelectionError, match="each of the 32 CT files has its own SeriesInstanceUID, and the 32 "
                                                   "of one geometry do not lie on one regular stack"):
        read_volume(folder)


def test_image_position_missing_everywhere_is_refused_naming_the_tag(dicom_dirs, tmp_path):
    def edit(i, ds):
        del ds.ImagePositionPatient

    folder = copy_series(dicom_dirs["cap"], tmp_path / "cap-noipp", edit=edit)
    with pytest.raises(ShapeError, match=r"ImagePositionPatient \(0020,0032\) missing in 32 of the 32 CT images"):
        read_volume(folder)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["preprocess", str(folder), "-o", str(out), "--size", str(SIZE)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "ImagePositionPatient (0020,0032)" in errors[0] and "guess" in errors[0]
    assert "Traceback" not in result.output
    assert not list(out.glob("*.nii.gz"))


def test_a_user_sees_at_most_three_lines_of_warnings_on_an_anonymised_series(dicom_dirs, tmp_path):
    """Every readable artefact at once (one UUID SOPInstanceUID, series and study UIDs randomised per file,
    InstanceNumber repeated, SliceLocation wrong, patient tags blank), through `covidctnet preprocess` in a process of
    its own as a user runs it: the clean series' output, and at most 3 warning lines at the default verbosity; -v
    lists every pydicom notice."""

    def edit(i, ds):
        for kind in ("series-uid-per-file", "instance-number-repeated", "slice-location-wrong", "patient-blank"):
            _edit(kind)(i, ds)
        _set_sop_uid(ds, UUID_UID)

    folder = _anonymised(dicom_dirs["covid"], tmp_path / "in" / "covid-P001", edit)
    clean_out, clean_affine = _preprocess(dicom_dirs["covid"], tmp_path / "clean")

    def run(*extra: str) -> str:
        out = tmp_path / f"out{len(extra)}"
        proc = subprocess.run([sys.executable, "-m", "covidctnet", *extra, "preprocess", str(folder), "-o", str(out),
                               "--size", str(SIZE)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        (written,) = out.glob("*.nii.gz")
        np.testing.assert_array_equal(np.asarray(nib.load(written).dataobj), clean_out)
        np.testing.assert_array_equal(nib.load(written).affine, clean_affine)
        return proc.stdout + proc.stderr

    lines = run().splitlines()
    warning_lines = [line for line in lines if line.startswith("WARNING") or "Warning" in line]
    assert 1 <= len(warning_lines) <= 3, "\n".join(lines)
    assert not [line for line in lines if "warn_and_log" in line or "Invalid value for VR UI" in line.split("by kind")[0]]
    assert any("32 notices from the DICOM/image libraries" in line and "32 × pydicom: Invalid value for VR UI: '…'"
               in line for line in warning_lines), warning_lines
    verbose = run("-v").splitlines()
    each = [line for line in verbose if line.startswith("DEBUG") and "pydicom: Invalid value for VR UI: '…'" in line]
    assert len(each) == 32
    assert UUID_UID not in "\n".join(verbose)  # quoted values masked
