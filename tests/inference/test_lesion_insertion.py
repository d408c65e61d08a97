"""Lesions shaped by real MosMed masks, inserted into the lungs of the real normal001 scan at ground-glass and
consolidation densities: the residual score of the inserted slices must rise (bundled denoiser).

Measured (docs/validation.md): with the bundled denoiser, consolidation raises the slices' score by about 2.4 times
the clean scan's inter-slice IQR, but ground glass by less than a tenth of it: the bundled denoiser reproduces
ground-glass lesions. That case is an expected failure (strict: it reports when a new denoiser fixes it); a denoiser
retrained on every control CT here (den_v1 in docs/validation.md) passes both.
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest

from covidctnet.inference.slice_scores import SliceScoresConfig, score_volume
from covidctnet.preprocessing.lungmask3d import ras_lung_mask
from covidctnet.io.volume import read_volume
from covidctnet.models.registry import DEMO_MODEL
from tests.data_paths import require_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GGO_HU, CONSOLIDATION_HU = -600.0, 0.0
INSERTED = list(range(6, 14)) + list(range(18, 26))  # 16 of the 32 slices (2 mm) of the normal001 excerpt


def lesion_shapes(pixel_mm: float, shape: tuple[int, int], n: int) -> list[np.ndarray]:
    """The largest axial cross-section of each of the first ``n`` MosMed masks (with a lesion), in RAS, resampled
    to ``pixel_mm`` and centred on a ``shape`` grid (both are chest CTs with similar fields of view)."""
    from scipy import ndimage

    folder = require_data("mosmed-masks", "masks")
    out = []
    for path in sorted(folder.glob("study_*_mask.nii.gz")):
        img = nib.load(path)
        mask = np.asarray(img.dataobj) > 0
        if not mask.any():
            continue
        k = int(np.argmax(mask.sum(axis=(0, 1))))
        cut = mask[::-1, :, k]  # LAS -> RAS: flip x
        zoom = float(img.header.get_zooms()[0]) / pixel_mm
        cut = ndimage.zoom(cut.astype(np.uint8), zoom, order=0) > 0
        grid = np.zeros(shape, bool)
        ox, oy = (shape[0] - cut.shape[0]) // 2, (shape[1] - cut.shape[1]) // 2
        src = cut[max(0, -ox): max(0, -ox) + min(shape[0], cut.shape[0]), max(0, -oy): max(0, -oy) + min(shape[1],
                                                                                                        cut.shape[1])]
        grid[max(0, ox): max(0, ox) + src.shape[0], max(0, oy): max(0, oy) + src.shape[1]] = src
        out.append(grid)
        if len(out) == n:
            break
    return out


def insert_lesions(hu: np.ndarray, lung: np.ndarray, shapes: list[np.ndarray], slices: list[int],
                   density: float) -> tuple[np.ndarray, list[int]]:
    """Insert one lesion shape per slice, inside the lungs, at ``density`` HU keeping the tissue's texture.

    Ground glass: parenchyma (HU < -300) gets ``density`` plus its deviation from the slice's median lung HU (the
    vessels and the noise stay); consolidation: every lesion voxel gets ``density`` plus a fifth of that deviation.
    Returns the new (X, Y, Z) HU and the slices that received a lesion of at least 2 cm².
    """
    out = hu.copy()
    done = []
    for k, shape in zip(slices, shapes * (len(slices) // len(shapes) + 1)):
        region = shape & lung[:, :, k]
        if region.sum() * 0.634766**2 < 200:  # < 2 cm² inside the lung: not a lesion worth scoring
            continue
        base = hu[:, :, k]
        dev = base - float(np.median(base[lung[:, :, k]]))
        if density < -300:
            put = region & (base < -300)
            out[:, :, k][put] = density + dev[put]
        else:
            out[:, :, k][region] = density + 0.2 * dev[region]
        done.append(k)
    return out, done


@pytest.fixture(scope="module")
def scans():
    from covidctnet.models.registry import load_denoiser
    from covidctnet.preprocessing.preprocess import to_ras

    volume = read_volume(require_data("ct-dicom", "control-normal001"))
    hu, affine, lungs = ras_lung_mask(volume)
    assert to_ras(volume)[0].shape == hu.shape
    den = load_denoiser(DEMO_MODEL, "cpu")
    from covidctnet.core.config import validate_config
    from covidctnet.preprocessing.preprocess import PreprocessConfig

    pre = validate_config(PreprocessConfig, den.preprocess)
    return volume, hu, affine, lungs, den, pre


@pytest.mark.parametrize("density", [
    pytest.param(GGO_HU, marks=pytest.mark.xfail(strict=True, reason="the bundled denoiser reproduces ground glass: "
                                                  "score rise < 0.1 x the clean inter-slice IQR (docs/validation.md)")),
    CONSOLIDATION_HU], ids=["ground-glass", "consolidation"])
def test_inserted_lesions_raise_the_residual_score(scans, density):
    volume, hu, affine, lungs, den, pre = scans
    shapes = lesion_shapes(0.634766, hu.shape[:2], 16)
    lesioned, done = insert_lesions(hu, lungs.mask > 0, shapes, INSERTED, density)
    assert len(done) >= 10
    # the RAS array goes back into a Volume with the RAS affine: the same scan, lesions added
    sick = dataclasses.replace(volume, array=lesioned.astype(np.float32), affine=affine, slice_positions=None)
    clean = dataclasses.replace(volume, array=hu.astype(np.float32), affine=affine, slice_positions=None)
    cfg = SliceScoresConfig(device="cpu")
    before = np.array([r["residual_score"] for r in score_volume(clean, den, pre, cfg, lungs=lungs)])
    after = np.array([r["residual_score"] for r in score_volume(sick, den, pre, cfg, lungs=lungs)])
    rise = after[done] - before[done]
    assert np.mean(rise > 0) >= 0.8, rise
    # a lesion of a few cm² in ~100 cm² of lung: the rise must be at least half the spread (IQR) of the clean
    # scan's slice scores, i.e. enough to move a slice within its scan's distribution
    q1, q3 = np.percentile(before, [25, 75])
    assert np.median(rise) > 0.5 * (q3 - q1), (rise, q3 - q1)
    # slices far from any lesion barely move (the denoiser works slice by slice; 1 mm grid neighbours may share)
    far = [k for k in range(32) if min(abs(k - d) for d in done) >= 2]
    assert np.max(np.abs(after[far] - before[far])) < np.median(rise)
