"""The residual colour table shipped for 3D Slicer and napari (covidctnet/assets/colormaps/residual.ctbl)."""

from __future__ import annotations

import numpy as np

from covidctnet.models.registry import ASSETS

CTBL = ASSETS / "colormaps" / "residual.ctbl"


def test_residual_ctbl_is_a_slicer_discrete_color_table():
    lines = CTBL.read_text().splitlines()
    # Slicer's text format: '# Color table file' header, then 'index name R G B A' lines, 0-255, names without spaces
    assert lines[0].startswith("# Color table file") and "# 256 values" in lines
    rows = [line.split() for line in lines if not line.startswith("#")]
    assert len(rows) == 256 and all(len(r) == 6 for r in rows)
    assert [int(r[0]) for r in rows] == list(range(256))
    rgba = np.array([[int(v) for v in r[2:]] for r in rows])
    assert rgba.min() >= 0 and rgba.max() <= 255
    assert rgba[0, 3] == 0 and (rgba[1:, 3] == 255).all()  # below the window: transparent
    luma = rgba[1:, :3] @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(luma) >= 0).all() and luma[-1] - luma[0] > 150  # a dark-to-bright ramp
    # what the README's napari recipe reads
    table = np.loadtxt(CTBL, usecols=(2, 3, 4, 5)) / 255
    assert table.shape == (256, 4) and np.allclose(table, rgba / 255)
