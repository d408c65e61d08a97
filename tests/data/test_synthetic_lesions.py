"""Tests of covidctnet.data.synthetic_lesions on a real control slice and the real MosMed lesion masks."""

from __future__ import annotations

import numpy as np
import pytest

from covidctnet.core.errors import ConfigError, InputError
from covidctnet.data.synthetic_lesions import (
    HU_HIGH,
    HU_LOW,
    LesionSynthesis,
    SyntheticLesionSlices,
    insert_lesions,
    mosmed_shapes,
    random_blob,
)
from covidctnet.io.volume import read_volume
from covidctnet.preprocessing.lungmask3d import ras_lung_mask
from tests.data_paths import require_data


@pytest.fixture(scope="module")
def control_slice():
    """The middle slice of the real normal001 excerpt in [0, 1], its lung mask and pixel size."""
    volume = read_volume(require_data("ct-dicom", "control-normal001"))
    hu, affine, lungs = ras_lung_mask(volume)
    k = hu.shape[2] // 2
    image = np.clip((hu[:, :, k] - HU_LOW) / (HU_HIGH - HU_LOW), 0, 1).astype(np.float32)
    return image, lungs.mask[:, :, k] > 0, float(np.linalg.norm(affine[:3, 0]))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Shapes from six of the real MosMed masks (all 50 take a minute to decompress on a loaded machine)."""
    folder = tmp_path_factory.mktemp("masks")
    for path in sorted(require_data("mosmed-masks", "masks").glob("*_mask.nii.gz"))[:6]:
        (folder / path.name).symlink_to(path)
    return mosmed_shapes(folder, max_shapes=300)


def test_mosmed_shapes_are_real_lesion_components(shapes):
    assert 20 <= len(shapes) <= 300
    assert all(s.mask.any() and s.mask.ndim == 2 and 0.5 < s.pixel_mm < 1.5 for s in shapes)
    assert len({s.mask.shape for s in shapes}) > 10  # many different shapes, not one repeated


def test_mosmed_shapes_refuses_a_folder_without_masks(tmp_path):
    with pytest.raises(InputError, match="no \\*_mask.nii.gz"):
        mosmed_shapes(tmp_path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blob_is_one_nonempty_component(seed):
    from scipy import ndimage

    blob = random_blob(np.random.default_rng(seed))
    assert blob.any() and ndimage.label(blob)[1] == 1


def test_lesions_lie_inside_the_lung_and_change_only_around_them(control_slice, shapes):
    from scipy import ndimage

    image, lung, pixel = control_slice
    out, lesion = insert_lesions(image, lung, pixel, np.random.default_rng(3), shapes, n_lesions=3)
    assert lesion.any() and not (lesion & ~lung).any()
    changed = np.abs(out - image) > 1e-6
    assert not (changed & ~lung).any()  # the body wall, mediastinum and air outside stay as they were
    near = ndimage.binary_dilation(lesion, np.ones((3, 3), bool), iterations=2)
    assert not (changed & ~near).any()  # edges blend over two pixels
    assert out.mean() > image.mean()  # lesions are denser than the lung they replace


@pytest.mark.parametrize("kind,field", [("ground glass", "ggo_hu"), ("consolidation", "consolidation_hu")])
def test_lesion_density_is_in_its_range(control_slice, kind, field):
    image, lung, pixel = control_slice
    cfg = LesionSynthesis(consolidation_fraction=1.0 if kind == "consolidation" else 0.0, size_mm=(30.0, 40.0))
    out, lesion = insert_lesions(image, lung, pixel, np.random.default_rng(7), (), cfg, n_lesions=1)
    hu = out * (HU_HIGH - HU_LOW) + HU_LOW
    lo, hi = getattr(cfg, field)
    median = float(np.median(hu[lesion]))
    assert lo - 60 <= median <= hi + 60, (kind, median)  # texture and blending move single voxels, not the median


def test_same_seed_same_lesions(control_slice, shapes):
    image, lung, pixel = control_slice
    a = insert_lesions(image, lung, pixel, np.random.default_rng(5), shapes)
    b = insert_lesions(image, lung, pixel, np.random.default_rng(5), shapes)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_no_lung_no_lesion(control_slice):
    image, _, pixel = control_slice
    out, lesion = insert_lesions(image, np.zeros_like(image, bool), pixel, np.random.default_rng(0))
    assert not lesion.any()
    np.testing.assert_array_equal(out, image)


def test_dataset_items_and_fixed_draws(control_slice, shapes):
    image, lung, pixel = control_slice
    images, lungs = np.stack([image] * 4), np.stack([lung] * 4)
    ds = SyntheticLesionSlices(images, lungs, [pixel] * 4, shapes, seed=1, fixed=True, augment=False)
    item = ds[2]
    assert item["image"].shape == (2, *image.shape) and item["target"].shape == (1, *image.shape)
    assert float((item["target"] * (1 - item["lung"])).sum()) == 0.0
    np.testing.assert_array_equal(ds[2]["image"].numpy(), item["image"].numpy())  # a validation set is fixed


def test_config_errors():
    with pytest.raises(ConfigError, match="ggo_hu"):
        LesionSynthesis(ggo_hu=(-300.0, -750.0))
    with pytest.raises(ConfigError, match="empty_fraction"):
        LesionSynthesis(empty_fraction=1.5)
