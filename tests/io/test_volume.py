"""covidctnet.io.volume on the real shared scans: NIfTI/NRRD reading, the format dispatch, write_nifti (DICOM
series: test_dicom.py)."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from covidctnet.core.errors import ShapeError, UnreadableFileError
from covidctnet.io.volume import read_nifti, read_volume, study_id_from_path, write_nifti


def test_nifti(nifti_ct):
    vol = read_volume(nifti_ct)
    assert vol.shape == (122, 101, 30)
    np.testing.assert_allclose(vol.spacing, (3.0, 3.0, 3.0))
    assert vol.array.dtype == np.float32
    assert vol.array.min() == -1100 and vol.array.max() == 1207


def test_nrrd_matches_nifti(nifti_ct, tmp_path):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(nifti_ct))
    sitk.WriteImage(img, str(tmp_path / "ct.nrrd"))
    a, b = read_volume(nifti_ct), read_volume(tmp_path / "ct.nrrd")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


def test_study_id_from_path(tmp_path):
    assert study_id_from_path("studies/CT-1/study_0001.nii.gz") == "study_0001"
    assert study_id_from_path("a/P001") == "P001"
    assert study_id_from_path("x.nrrd") == "x"


def test_write_nifti_is_deterministic(tmp_path):
    arr = np.random.default_rng(0).random((8, 9, 10), dtype=np.float32)
    write_nifti(arr, np.diag([1.0, 2.0, 3.0, 1.0]), tmp_path / "a.nii.gz")
    write_nifti(arr, np.diag([1.0, 2.0, 3.0, 1.0]), tmp_path / "b.nii.gz")
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# ---- unreadable inputs: one typed error whose message names the file ----

def test_truncated_nifti(nifti_ct, tmp_path):
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(nifti_ct.read_bytes()[:20000])
    with pytest.raises(UnreadableFileError, match="trunc.nii.gz"):
        read_volume(bad)


def test_wrong_magic_bytes(tmp_path):
    bad = tmp_path / "fake.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(UnreadableFileError, match="fake.nii.gz"):
        read_volume(bad)


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.nii").write_bytes(b"")
    with pytest.raises(UnreadableFileError, match="empty"):
        read_volume(tmp_path / "empty.nii")


def test_empty_folder(tmp_path):
    with pytest.raises(UnreadableFileError, match="folder is empty"):
        read_volume(tmp_path)


def test_2d_and_4d_nifti(tmp_path):
    for shape, name in (((64, 64), "a2d.nii.gz"), ((32, 32, 20, 3), "a4d.nii.gz")):
        nib.save(nib.Nifti1Image(np.full(shape, -500, np.int16), np.eye(4)), str(tmp_path / name))
        with pytest.raises(ShapeError, match=name):
            read_volume(tmp_path / name)


@pytest.mark.parametrize("compressor", ["isal", "zlib"])
def test_nifti_gz_is_written_in_parallel_gzip_members_that_every_reader_reads(tmp_path, monkeypatch, compressor):
    """write_nifti compresses one gzip member per core, with ISA-L (the default) or zlib (without isal); nibabel,
    SimpleITK (ITK's zlib reader) and Python's gzip read the file as one stream, equal to the uncompressed .nii, and
    equal arrays give byte-identical files."""
    import gzip
    import zlib

    import SimpleITK as sitk

    from covidctnet.io import volume

    if compressor == "zlib":
        monkeypatch.setattr(volume, "_deflate", zlib)
    else:
        assert volume._deflate.__name__ == "isal.isal_zlib"  # a core dependency: the fast path is the one installed

    array = np.random.default_rng(0).random((40, 30, 20), dtype=np.float32)
    affine = np.diag([0.8, 0.7, 1.5, 1.0])
    write_nifti(array, affine, tmp_path / "a.nii.gz")
    write_nifti(array, affine, tmp_path / "b.nii.gz")
    write_nifti(array, affine, tmp_path / "a.nii")
    data = (tmp_path / "a.nii.gz").read_bytes()
    assert data == (tmp_path / "b.nii.gz").read_bytes()
    assert gzip.decompress(data) == (tmp_path / "a.nii").read_bytes()
    np.testing.assert_array_equal(read_nifti(tmp_path / "a.nii.gz").array, array)
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.nii.gz"))).transpose(2, 1, 0)
    np.testing.assert_array_equal(itk, array)
    if (os.cpu_count() or 1) > 1:
        assert data.count(b"\x1f\x8b\x08") >= 2  # several members (a gzip header each)
