"""covidctnet.preprocessing.preprocess on the real shared scans."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import scipy.ndimage
from skimage.transform import resize

from covidctnet.core.config import load_config
from covidctnet.core.errors import ConfigError
from covidctnet.io.volume import read_volume
from covidctnet.preprocessing.preprocess import (
    OFFICIAL_PROFILE,
    PreprocessConfig,
    linear_resize,
    official_layout_to_ras,
    preprocess_volume,
    ras_to_official_layout,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def covid_volume(dicom_dirs):
    return read_volume(dicom_dirs["covid"])


@pytest.fixture(scope="module")
def covid_default(covid_volume):
    return preprocess_volume(covid_volume, PreprocessConfig())


def _world_to_voxel(affine, points):
    return (np.linalg.inv(affine) @ np.c_[points, np.ones(len(points))].T).T[:, :3]


def test_shape_spacing_range_orientation(covid_default):
    arr, aff = covid_default
    # 32 slices of 2 mm cover 64 mm -> 64 slices of 1 mm; in-plane 240 x 240.
    assert arr.shape == (240, 240, 64)
    assert arr.dtype == np.float32
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    assert nib.aff2axcodes(aff) == ("R", "A", "S")
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    assert spacing[2] == pytest.approx(1.0)
    # The in-plane field of view is kept: 512 x 0.748 mm over 240 voxels.
    assert spacing[0] == pytest.approx(512 * 0.748047 / 240, rel=1e-3)


def test_output_overlays_the_original(covid_volume, covid_default):
    """Output voxels mapped through both affines land on original voxels with the same windowed intensity."""
    arr, aff = covid_default
    rng = np.random.default_rng(0)
    idx = np.c_[rng.integers(20, 220, 400), rng.integers(20, 220, 400), rng.integers(3, 61, 400)]
    world = (aff @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
    src = _world_to_voxel(covid_volume.affine, world)
    windowed = np.clip((covid_volume.array + 1000) / 1400, 0, 1)
    expected = scipy.ndimage.map_coordinates(windowed, src.T, order=1)
    got = arr[idx[:, 0], idx[:, 1], idx[:, 2]]
    # Linear interpolation from 0.75 mm to 1.6 mm voxels blurs edges a little; misregistration by even one
    # voxel would give errors of the order of the image contrast (~0.3).
    assert np.median(np.abs(got - expected)) < 0.02
    assert np.corrcoef(got, expected)[0, 1] > 0.97


def test_window_clips_air_and_bone(covid_volume, covid_default):
    arr, aff = covid_default
    hu = covid_volume.array
    # Bone: the voxel whose 7x7x3 neighbourhood has the highest minimum HU (inside the spine or a rib).
    local_min = scipy.ndimage.minimum_filter(hu, size=(7, 7, 3))
    bone = np.array(np.unravel_index(np.argmax(local_min), hu.shape))
    assert local_min[tuple(bone)] > 400
    air = np.array([5, 5, 16])  # image corner, outside the body: -1024 HU
    assert hu[tuple(air)] < -1000
    for point, value in ((bone, 1.0), (air, 0.0)):
        world = covid_volume.affine @ np.r_[point, 1]
        out = np.round(_world_to_voxel(aff, world[None, :3])[0]).astype(int)
        assert arr[tuple(out)] == pytest.approx(value, abs=1e-6)


# --- the official profile ----------------------------------------------------------------------------------------

def _official_port(folder: Path) -> np.ndarray:
    """A straight port of mohofar/CovidCtNet Codes/preprocessing (dcm_utilities.py, utilities.py) and the resize of
    Codes/training and testing: pydicom stack sorted by ImagePositionPatient[2], HU int16, scipy zoom to 1 mm,
    out-of-window HU set to -1000, (x + 1000) / 1400, skimage resize to 128 x 128 with anti-aliasing."""
    slices = [pydicom.dcmread(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".dcm")]
    slices.sort(key=lambda x: float(x.ImagePositionPatient[2]))
    thickness = np.abs(slices[0].ImagePositionPatient[2] - slices[1].ImagePositionPatient[2])
    spacing = np.array([thickness] + list(slices[0].PixelSpacing), dtype=np.float32)
    image = np.stack([s.pixel_array for s in slices]).astype(np.int16)
    image[image == -2000] = 0
    for n, s in enumerate(slices):
        image[n] += np.int16(s.RescaleIntercept)
    new_shape = np.round(image.shape * spacing)
    resampled = scipy.ndimage.zoom(image, new_shape / image.shape, mode="nearest")
    resampled[resampled > 400] = -1000
    resampled[resampled < -1000] = -1000
    norm = (resampled - (-1000.0)) / 1400.0
    norm[norm > 1] = 1.0
    norm[norm < 0] = 0.0
    return resize(norm, (norm.shape[0], 128, 128), anti_aliasing=True)


def test_official_profile_matches_the_official_code(dicom_dirs, covid_volume):
    cfg = load_config(PreprocessConfig, None, defaults=OFFICIAL_PROFILE)
    ours, aff = preprocess_volume(covid_volume, cfg)
    reference = _official_port(dicom_dirs["covid"])
    got = ras_to_official_layout(ours)
    assert got.shape == reference.shape
    assert np.mean(np.abs(got - reference)) <= 0.005
    assert nib.aff2axcodes(aff) == ("R", "A", "S")


def test_official_profile_turns_bone_into_air(covid_volume):
    cfg = load_config(PreprocessConfig, None, defaults=OFFICIAL_PROFILE)
    ours, aff = preprocess_volume(covid_volume, cfg)
    hu = covid_volume.array
    local_min = scipy.ndimage.minimum_filter(hu, size=(9, 9, 3))
    bone = np.array(np.unravel_index(np.argmax(local_min), hu.shape))
    world = covid_volume.affine @ np.r_[bone, 1]
    out = np.round(_world_to_voxel(aff, world[None, :3])[0]).astype(int)
    # Set to -1000 HU (0) before the anti-aliased 4x downsizing, which blurs in a little of the surroundings;
    # clipping would give 1.0 here.
    assert ours[tuple(out)] < 0.25


def test_official_layout_round_trip():
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(official_layout_to_ras(ras_to_official_layout(a)), a)


def test_spacing_resampler_agrees(covid_volume, covid_default):
    """The literal MONAI chain (Spacing + Resize, one fused grid_sample) gives nearly the same image."""
    arr, aff = covid_default
    literal, literal_aff = preprocess_volume(covid_volume, PreprocessConfig(resampler="spacing"))
    assert literal.shape == (240, 240, 63)  # Spacing keeps the first and last slice centres: 62 mm -> 63 slices
    # Compare on the interior through world coordinates (the two grids differ by half a slice at the ends).
    idx = np.argwhere(np.ones((12, 12, 10), bool)) * [20, 20, 6] + [5, 5, 2]
    world = (aff @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
    src = _world_to_voxel(literal_aff, world)
    other = scipy.ndimage.map_coordinates(literal, src.T, order=1, mode="nearest")
    assert np.median(np.abs(arr[tuple(idx.T)] - other)) < 0.03


def test_nifti_input(nifti_ct):
    arr, aff = preprocess_volume(read_volume(nifti_ct), PreprocessConfig(size_xy=96))
    assert arr.shape == (96, 96, 90)  # 30 slices of 3 mm cover 90 mm
    assert nib.aff2axcodes(aff) == ("R", "A", "S")


# --- configs -----------------------------------------------------------------------------------------------------

def test_yaml_defaults_match_the_dataclass():
    assert load_config(PreprocessConfig, REPO / "configs" / "preprocess.yaml") == PreprocessConfig()
    assert load_config(PreprocessConfig, REPO / "configs" / "preprocess_official.yaml") == load_config(
        PreprocessConfig, None, defaults=OFFICIAL_PROFILE
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("sizexy: 128\n", "unknown key"),
        ("size_xy: '128'\n", "'size_xy' must be an integer"),
        ("hu_min: 500\n", "'hu_max' must be greater"),
        ("profile: fancy\n", "'profile' must be one of"),
        ("spacing_mm: [1, 1]\n", "'spacing_mm' must have 3 items"),
        ("- 1\n- 2\n", "expected a mapping"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(PreprocessConfig, path)


@pytest.mark.parametrize("shape_in,shape_out", [((37, 29, 11), (16, 16, 23)), ((20, 24, 30), (40, 12, 30)),
                                                ((5, 7, 9), (5, 7, 9))])
@pytest.mark.parametrize("layout", ["C", "F", "DICOM stack view, flipped", "int16"])
def test_linear_resize_is_torch_trilinear(shape_in, shape_out, layout):
    """NumPy resampling = torch's trilinear interpolate (align_corners=False), which MONAI's Resize calls, whatever
    the input's memory layout (the passes follow it) and dtype."""
    import torch

    array = np.random.default_rng(0).random(shape_in, dtype=np.float32)
    if layout == "int16":
        array = (array * 3000 - 1000).astype(np.int16)
    expected = torch.nn.functional.interpolate(torch.from_numpy(array.astype(np.float32))[None, None], size=shape_out,
                                               mode="trilinear", align_corners=False)[0, 0].numpy()
    if layout == "F":
        array = np.asfortranarray(array)
    elif layout.startswith("DICOM"):  # (x, y, z) view of a (z, y, x) stack, flipped as to_ras does
        stack = np.ascontiguousarray(array[::-1].transpose(2, 1, 0))
        array = stack.transpose(2, 1, 0)[::-1]
    out = linear_resize(array, shape_out)
    assert out.dtype == np.float32 and out.shape == tuple(shape_out)
    np.testing.assert_allclose(out, expected, atol=2e-6 * np.abs(expected).max())


def test_default_profile_equals_the_monai_chain_and_imports_no_torch(dicom_dirs, covid_volume, covid_default,
                                                                    tmp_path):
    """The NumPy path gives MONAI's ``EnsureChannelFirst → Orientation → Resize → ScaleIntensityRange`` result, and
    a whole ``covidctnet preprocess`` run imports neither torch nor MONAI (their import was half of its time)."""
    import subprocess
    import sys

    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, EnsureChannelFirst, Orientation, Resize, ScaleIntensityRange

    array, affine = covid_default
    chain = Compose([EnsureChannelFirst(channel_dim="no_channel"), Orientation(axcodes="RAS"),
                     Resize(spatial_size=array.shape, mode="trilinear"),
                     ScaleIntensityRange(a_min=-1000, a_max=400, b_min=0.0, b_max=1.0, clip=True)])
    out = chain(MetaTensor(torch.from_numpy(covid_volume.array.astype(np.float32)),
                           affine=torch.as_tensor(covid_volume.affine, dtype=torch.float64)))
    np.testing.assert_allclose(array, out[0].numpy(), atol=5e-5)  # float32 positions in torch, float64 here
    np.testing.assert_allclose(affine, np.asarray(out.affine), atol=1e-9)
    code = ("import sys, runpy; sys.argv = ['covidctnet', 'preprocess', sys.argv[1], '-o', sys.argv[2], '-q'];\n"
            "try:\n    runpy.run_module('covidctnet', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(dicom_dirs["covid"]), str(tmp_path / "out")],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]" and (tmp_path / "out" / "manifest.csv").is_file()
