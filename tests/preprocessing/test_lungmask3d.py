"""The classical 3D lung mask and the chest-coverage check, on every real CT in the shared data."""

from __future__ import annotations

import numpy as np
import pytest

from covidctnet.core.errors import ConfigError, NoLungsError
from covidctnet.io.volume import read_volume
from covidctnet.preprocessing.lungmask3d import LungMaskConfig, check_chest_coverage, lung_mask_3d
from covidctnet.preprocessing.preprocess import to_ras
from tests.data_paths import require_data

# (path parts, lowest and highest plausible lung volume in ml). Whole chest CTs of adults hold about 2-8 l
# (4D-Lung 113 is one respiratory phase of a lung-cancer patient); the 32-slice excerpts (64 mm of chest) and the
# tight mediastinal crops of TotalSegmentator hold part of the lungs only.
CHEST_SCANS = [
    (("ct-dicom-full", "covid-P001"), 2000, 9000),
    (("ct-dicom-full", "cap-cap001"), 2000, 9000),
    (("ct-dicom-full", "control-normal001"), 2000, 9000),
    (("ct-dicom-full", "control-4dlung-113"), 1500, 9000),
    (("ct-dicom", "covid-P001"), 700, 3500),
    (("ct-dicom", "cap-cap001"), 700, 3500),
    (("ct-dicom", "control-normal001"), 700, 3500),
    (("ct-nifti", "totalseg_ct_cropped.nii.gz"), 700, 5000),
    (("ct-nifti", "totalseg_pulmonary_ct_cropped.nii.gz"), 700, 5000),
]
ABDOMEN_SCANS = [("ct-nifti", "totalseg_example_ct.nii.gz"), ("ct-nifti", "totalseg_example_ct_sm.nii.gz")]


def _mask(parts):
    volume = read_volume(require_data(*parts))
    array, affine = to_ras(volume)
    return array, lung_mask_3d(array, tuple(np.linalg.norm(affine[:3, :3], axis=0)))


@pytest.mark.parametrize("parts, low, high", CHEST_SCANS, ids=["/".join(p) for p, _, _ in CHEST_SCANS])
def test_real_chest_scans_two_lungs_plausible_volume(parts, low, high):
    hu, lungs = _mask(parts)
    assert lungs.mask.shape == hu.shape
    assert lungs.n_lungs == 2
    assert low <= lungs.volume_ml <= high
    right, left = lungs.lung_volumes_ml()
    assert min(right, left) >= 0.25 * max(right, left)  # two real lungs, not a lung and a scrap of gas
    # the two lungs sit on either side of the body: their x ranges overlap little
    xs = [np.flatnonzero((lungs.mask == k).any(axis=(1, 2))) for k in (1, 2)]
    assert np.median(xs[0]) > np.median(xs[1])
    # inside the lungs the density is lung, not air outside the body or soft tissue
    assert -950 < float(np.median(hu[lungs.mask > 0])) < -500
    check_chest_coverage(lungs, "scan")  # passes


@pytest.mark.parametrize("parts", ABDOMEN_SCANS, ids=["/".join(p) for p in ABDOMEN_SCANS])
def test_abdomen_is_refused(parts):
    _, lungs = _mask(parts)
    assert lungs.volume_ml < LungMaskConfig().min_lung_ml
    with pytest.raises(NoLungsError, match=r"no lungs found: not a chest CT\? \(lung volume \d+ ml"):
        check_chest_coverage(lungs, parts[-1])


def test_trachea_and_outside_air_are_not_lung():
    hu, lungs = _mask(("ct-dicom", "covid-P001"))
    # pure air (outside the body, trachea) is below -950 HU; at most a thin rim of it is in the mask
    inside = hu[lungs.mask > 0]
    assert np.mean(inside < -980) < 0.05
    # the scan's corners are outside air
    assert not lungs.mask[:20, :20].any() and not lungs.mask[-20:, -20:].any()


def test_enclosed_dense_lesion_is_inside_the_mask():
    hu, _ = _mask(("ct-dicom", "control-normal001"))
    lungs = lung_mask_3d(hu, (0.634766, 0.634766, 2.0))
    xs, ys, zs = np.nonzero(lungs.mask == 1)
    centre = (int(np.median(xs)), int(np.median(ys)), int(np.median(zs)))
    lesion = hu.copy()
    cx, cy, cz = centre
    lesion[cx - 8 : cx + 8, cy - 8 : cy + 8, cz - 2 : cz + 2] = 30.0  # a 1 cm consolidation in the lung
    after = lung_mask_3d(lesion, (0.634766, 0.634766, 2.0))
    assert after.mask[cx, cy, cz] > 0
    assert abs(after.volume_ml - lungs.volume_ml) < 0.02 * lungs.volume_ml


def test_config_is_validated():
    with pytest.raises(ConfigError, match="gas_median_hu"):
        LungMaskConfig(gas_median_hu=-300.0)
    with pytest.raises(ConfigError, match="work_pixel_mm"):
        LungMaskConfig(work_pixel_mm=0.0)
