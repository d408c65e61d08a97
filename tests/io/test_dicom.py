"""covidctnet.io.dicom: DICOM CT series into HU, on the real shared series and on copies edited with pydicom.

Exports with extra objects and pixel-storage quirks are in test_dicom_exports.py.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_utils import copy_series

from covidctnet.core.errors import NotCTError, SeriesSelectionError, UnreadableFileError
from covidctnet.io.volume import read_volume


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
