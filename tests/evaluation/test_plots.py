"""Tests of covidctnet.evaluation.plots: PNGs are written, atomically, without touching pyplot's global state."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from covidctnet.evaluation.plots import (
    OperatingPoint,
    RocCurve,
    new_figure,
    plot_confusion,
    plot_residual_overlay,
    plot_roc,
    save_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_shape(path) -> tuple[int, ...]:
    from matplotlib.image import imread

    return imread(path).shape


def _open_pyplot_figures() -> list[int]:
    if "matplotlib.pyplot" not in sys.modules:
        return []
    return list(sys.modules["matplotlib.pyplot"].get_fignums())


def test_plot_roc_with_band_and_points(tmp_path):
    before = _open_pyplot_figures()
    grid = np.linspace(0, 1, 11)
    curve = RocCurve(
        [0, 0.1, 0.5, 1], [0, 0.6, 0.9, 1], "model", auc=0.85, auc_ci=(0.7, 0.95),
        band_fpr=grid, band_low=np.clip(grid - 0.2, 0, 1), band_high=np.clip(grid + 0.2, 0, 1),
    )  # fmt: skip
    dashed = RocCurve([0, 0.3, 1], [0, 0.8, 1], "reader 1 (score)", style="--", color="C3")
    out = plot_roc(
        tmp_path / "sub" / "roc.png",
        [curve, dashed],
        [OperatingPoint(0.2, 0.7, "reader 2", "s"), OperatingPoint(0.1, 0.6, "model", color="C0")],
        band_label="95% CI",
    )
    assert out == tmp_path / "sub" / "roc.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    height, width = _png_shape(out)[:2]
    assert height > 300 and width > 300
    assert sorted(p.name for p in out.parent.iterdir()) == ["roc.png"]  # no temp file left behind
    assert _open_pyplot_figures() == before  # no pyplot figure created or left open


def test_plot_confusion(tmp_path):
    out = plot_confusion(tmp_path / "cm.png", [[5, 1, 0], [2, 7, 1], [0, 0, 0]], ["control", "covid", "cap"])
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="class names"):
        plot_confusion(tmp_path / "bad.png", [[1, 2], [3, 4]], ["a", "b", "c"])
    assert not (tmp_path / "bad.png").exists()


def test_save_figure_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    fig = new_figure()
    fig.add_subplot().plot([0, 1], [0, 1])

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(RuntimeError):
        save_figure(fig, target)
    assert target.read_bytes() == b"old"  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_residual_overlay_with_lung_mask(tmp_path):
    from covidctnet.evaluation.plots import plot_residual_overlay

    rng = np.random.default_rng(0)
    ct = rng.uniform(0, 1, (32, 32, 20)).astype(np.float32)
    residual = rng.normal(0, 0.1, ct.shape).astype(np.float32)
    lung = np.zeros(ct.shape, bool)
    lung[4:14, 6:26, 2:18] = True
    lung[18:28, 6:26, 2:18] = True
    path = plot_residual_overlay(tmp_path / "o.png", ct, residual, lung_mask=lung, axial_index=7, title="t")
    assert path.stat().st_size > 5_000
    with pytest.raises(ValueError, match="lung_mask must have the CT's shape"):
        plot_residual_overlay(tmp_path / "x.png", ct, residual, lung_mask=lung[:, :, :5])


def test_lesion_probability_overlay_uses_a_fixed_scale(tmp_path):
    """A lesion map is drawn on 0–1 where it reaches 0.5, whatever its median: the same map gives the same pixels
    when the rest of the lung changes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ct = rng.random((32, 32, 8), dtype=np.float32)
    lung = np.zeros(ct.shape, bool)
    lung[4:28, 4:28, :] = True
    prob = np.zeros(ct.shape, np.float32)
    prob[10:16, 10:16, 4] = 0.9
    low = prob.copy()
    low[lung & (prob == 0)] = 0.3  # below 0.5: never drawn
    a = plot_residual_overlay(tmp_path / "a.png", ct, prob, lung_mask=lung, axial_index=4, probability=True)
    b = plot_residual_overlay(tmp_path / "b.png", ct, low, lung_mask=lung, axial_index=4, probability=True)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
