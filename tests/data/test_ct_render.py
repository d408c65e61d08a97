"""Tests of covidctnet.data.ct_render: CT volumes rendered as paper-figure slices for pretraining."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covidctnet.core.errors import InputError
from covidctnet.data.ct_render import axial_slices, find_ct_volumes, render_ct_folder, render_ct_slices
from covidctnet.io.volume import Volume


def _phantom() -> np.ndarray:
    """(X, Y, Z) HU in RAS voxel order: a body with two lungs for z in 5..14, a bright marker at the anterior wall."""
    x, y, z = np.mgrid[:48, :48, :20]
    hu = np.full((48, 48, 20), -1000.0, dtype=np.float32)
    body = ((x - 24) ** 2 / 20 ** 2 + (y - 24) ** 2 / 16 ** 2) < 1
    hu[body] = 40.0
    lungs = (((x - 15) ** 2 + (y - 24) ** 2) < 60) | (((x - 33) ** 2 + (y - 24) ** 2) < 60)
    hu[lungs & (z >= 5) & (z < 15)] = -850.0
    hu[(abs(x - 24) < 3) & (y >= 36) & (y < 39)] = 1000.0  # anterior (high y in RAS)
    return hu


def test_axial_slices_put_anterior_at_the_top():
    ras = Volume(_phantom(), np.diag([1.0, 1.0, 2.0, 1.0]), source=Path("p.nii.gz"))
    lps_affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # LPS voxel order: same anatomy stored flipped in x and y
    lps = Volume(_phantom()[::-1, ::-1].copy(), lps_affine, source=ras.source)
    for vol in (ras, lps):
        s = axial_slices(vol)
        assert s.shape == (20, 48, 48)
        rows = np.flatnonzero((s[10] > 500).any(axis=1))
        assert rows.max() < 24  # the anterior marker is in the upper half
    assert np.array_equal(axial_slices(ras), axial_slices(lps))


def test_render_keeps_lung_slices_only(tmp_path):
    vol = Volume(_phantom(), np.diag([1.0, 1.0, 2.0, 1.0]), source=tmp_path / "p.nii.gz")
    imgs = render_ct_slices(vol, 32, max_slices=100, renders=2, rng=np.random.default_rng(0))
    assert len(imgs) == 2 * 10  # z 5..14 hold lungs
    assert all(i.shape == (32, 32) and i.min() >= 0 and i.max() <= 1 for i in imgs)
    assert len(render_ct_slices(vol, 32, max_slices=4, renders=1, rng=np.random.default_rng(0))) == 4
    nib.save(nib.Nifti1Image(_phantom().astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "p.nii.gz")
    records, images = render_ct_folder(tmp_path, 32, 3, 1, seed=0)
    assert len(records) == len(images) == 3 and all(r.label == -1 for r in records)
    assert find_ct_volumes(tmp_path) == [tmp_path / "p.nii.gz"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no CT volume"):
        find_ct_volumes(tmp_path / "empty")
