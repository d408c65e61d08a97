"""covidctnet.io.checks: each bad input gets its own typed one-line error naming the source."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_utils import copy_series

from covidctnet.core.errors import NonFiniteError, NotHUError, ShapeError, SliceGapError, TooFewSlicesError
from covidctnet.io.checks import CHECK_NAMES, check_volume
from covidctnet.io.volume import Volume, read_volume


def test_real_scans_pass(dicom_dirs, nifti_ct):
    for path in [*dicom_dirs.values(), nifti_ct]:
        assert check_volume(read_volume(path)) == list(CHECK_NAMES)


@pytest.mark.parametrize(
    "transform, hint",
    [
        (lambda a: (a - a.min()) / (a.max() - a.min()), "normalised"),
        (lambda a: np.round(255 * (a - a.min()) / (a.max() - a.min())), "8-bit"),
    ],
    ids=["unit-range", "8bit"],
)
def test_not_hu(nifti_ct, transform, hint):
    vol = read_volume(nifti_ct)
    vol.array = transform(vol.array).astype(np.float32)
    with pytest.raises(NotHUError, match=hint):
        check_volume(vol)


def test_nan_and_inf(nifti_ct):
    vol = read_volume(nifti_ct)
    vol.array[3, 4, 5] = np.nan
    vol.array[6, 7, 8] = np.inf
    with pytest.raises(NonFiniteError, match="1 NaN and 1 infinite"):
        check_volume(vol)


def test_too_few_slices(dicom_dirs, tmp_path):
    folder = copy_series(dicom_dirs["covid"], tmp_path / "few", keep=lambda i: i < 10)
    with pytest.raises(TooFewSlicesError, match="10 slices"):
        check_volume(read_volume(folder))


def test_missing_slice(dicom_dirs, tmp_path):
    folder = copy_series(dicom_dirs["covid"], tmp_path / "gap", keep=lambda i: i != 15)
    with pytest.raises(SliceGapError, match="gap of 4 mm"):
        check_volume(read_volume(folder))


def test_duplicated_position(dicom_dirs, tmp_path):
    def dup(i, ds):
        if i == 9:
            ds.ImagePositionPatient = list(ds.ImagePositionPatient[:2]) + [float(ds.ImagePositionPatient[2]) - 2.0]

    folder = copy_series(dicom_dirs["covid"], tmp_path / "dup", edit=dup)
    with pytest.raises(SliceGapError, match="duplicated"):
        check_volume(read_volume(folder))


def test_uneven_spacing(dicom_dirs, tmp_path):
    def uneven(i, ds):
        z = float(ds.ImagePositionPatient[2])
        ds.ImagePositionPatient = list(ds.ImagePositionPatient[:2]) + [z + (0.9 if i % 2 else 0.0)]

    folder = copy_series(dicom_dirs["covid"], tmp_path / "uneven", edit=uneven)
    with pytest.raises(SliceGapError, match="uneven|gap"):
        check_volume(read_volume(folder))


def test_gantry_tilt(dicom_dirs, tmp_path):
    def tilt(i, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * i, z]  # 0.5 mm per 2 mm slice: about 14 degrees

    folder = copy_series(dicom_dirs["covid"], tmp_path / "tilt", edit=tilt)
    with pytest.raises(SliceGapError, match="gantry tilt of 14"):
        check_volume(read_volume(folder))


@pytest.mark.parametrize("spacing", [0.0, 100.0])
def test_absurd_spacing(nifti_ct, spacing):
    vol = read_volume(nifti_ct)
    vol = Volume(vol.array, np.diag([3.0, 3.0, spacing, 1.0]), vol.source)
    with pytest.raises(ShapeError, match="voxel size"):
        check_volume(vol)
