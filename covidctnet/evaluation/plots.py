"""Every PNG the toolkit writes: ROC curves, confusion matrices, residual and Grad-CAM overlays, slice-score profiles.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, never through ``pyplot``: no global
figure registry, no backend switch, nothing left open, and it works the same in a notebook, a worker process or a
headless server. Each public function takes the output path first and writes the PNG atomically (temp file + rename),
so an interrupted run never leaves a half-written image. New plots should follow the same shape:
``plot_x(path, data..., *, title=..., dpi=...) -> Path`` built on :func:`new_figure` and :func:`save_figure`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from scipy import ndimage

from covidctnet.core.files import atomic_path

__all__ = [
    "RocCurve",
    "OperatingPoint",
    "new_figure",
    "save_figure",
    "plot_roc",
    "plot_reader_study_roc",
    "plot_confusion",
    "plot_residual_overlay",
    "plot_slice_scores",
    "CAM_CMAP",
    "cam_overlay",
    "plot_grad_cam",
]

_DEFAULT_DPI = 150


@dataclass(frozen=True)
class RocCurve:
    """One ROC curve to draw.

    Attributes:
        fpr, tpr: (P,) points of the curve (false-positive rate = 1 - specificity, true-positive rate = sensitivity).
        label: legend text (the AUC is appended when ``auc`` is given).
        auc: optional AUC shown in the legend.
        auc_ci: optional ``(low, high)`` shown in the legend after the AUC.
        band_fpr, band_low, band_high: optional (G,) pointwise confidence band of the sensitivity at ``band_fpr``.
        style: matplotlib line style (``"-"``, ``"--"`` …).
        color: matplotlib colour; ``None`` takes ``"C<i>"`` for the i-th curve.
    """

    fpr: Sequence[float] | np.ndarray
    tpr: Sequence[float] | np.ndarray
    label: str
    auc: float | None = None
    auc_ci: tuple[float, float] | None = None
    band_fpr: Sequence[float] | np.ndarray | None = None
    band_low: Sequence[float] | np.ndarray | None = None
    band_high: Sequence[float] | np.ndarray | None = None
    style: str = "-"
    color: str | None = None


@dataclass(frozen=True)
class OperatingPoint:
    """A single (FPR, TPR) decision point, e.g. a reader's call or the model at its threshold.

    Attributes:
        fpr, tpr: position in ROC space, in [0, 1].
        label: legend text.
        marker: matplotlib marker (``"o"``, ``"s"``, ``"^"`` …).
        color: matplotlib colour; ``None`` takes the next colour after the curves' (``"C0"`` matches the first curve).
    """

    fpr: float
    tpr: float
    label: str
    marker: str = "o"
    color: str | None = None


def new_figure(figsize: tuple[float, float] = (5.5, 5.0)) -> Any:
    """A fresh Agg-backed figure that no global state refers to (garbage-collected when dropped)."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = _DEFAULT_DPI) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically and return the path."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _legend_text(curve: RocCurve) -> str:
    if curve.auc is None:
        return curve.label
    text = f"{curve.label} (AUC {curve.auc:.3f}"
    if curve.auc_ci is not None and None not in curve.auc_ci:
        text += f", {curve.auc_ci[0]:.3f}–{curve.auc_ci[1]:.3f}"
    return text + ")"


def plot_roc(
    path: str | os.PathLike,
    curves: Sequence[RocCurve],
    points: Sequence[OperatingPoint] = (),
    *,
    title: str = "ROC curve",
    band_label: str | None = None,
    dpi: int = _DEFAULT_DPI,
) -> Path:
    """Draw ROC curves, optional confidence bands and operating points, and write the PNG.

    Args:
        path: output PNG path.
        curves: curves to draw, in legend order (each may carry a band).
        points: operating points drawn as markers (e.g. each reader's sensitivity and 1 - specificity).
        title: axes title.
        band_label: legend text for the bands (e.g. ``"95% CI (bootstrap)"``); no legend entry when ``None``.
        dpi: resolution.

    Returns:
        ``path``.
    """
    fig = new_figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1, label="chance")
    colors = [f"C{i}" for i in range(10)]
    for i, curve in enumerate(curves):
        color = curve.color or colors[i % len(colors)]
        if curve.band_fpr is not None and curve.band_low is not None and curve.band_high is not None:
            ax.fill_between(
                np.asarray(curve.band_fpr),
                np.asarray(curve.band_low),
                np.asarray(curve.band_high),
                step="post",
                color=color,
                alpha=0.18,
                lw=0,
                label=band_label if (band_label and i == 0) else None,
            )
        ax.plot(np.asarray(curve.fpr), np.asarray(curve.tpr), curve.style, color=color, lw=2, label=_legend_text(curve))
    next_color = len(curves)
    for point in points:
        color = point.color
        if color is None:
            color = colors[next_color % len(colors)]
            next_color += 1
        ax.plot(
            [point.fpr],
            [point.tpr],
            point.marker,
            color=color,
            ms=8,
            mec="black",
            mew=0.6,
            label=point.label,
            linestyle="none",
        )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    return save_figure(fig, path, dpi=dpi)


_RATER_MARKERS = ["s", "^", "v", "D", "P", "X", "<", ">", "p", "h"]  # readers' operating points, in reader order


def plot_reader_study_roc(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    rocs: Mapping[str, tuple[np.ndarray, np.ndarray, str]],
    *,
    title: str = "COVID-19 vs non-COVID: model and readers",
    dpi: int = _DEFAULT_DPI,
) -> Path:
    """The reader study's ROC figure: the curves of the model and of each reader who gave scores, and every rater's
    operating point, one colour per rater (curve and point alike: the model C0, the readers C1…, then the reader
    average and the majority vote).

    Args:
        path: output PNG.
        rows: the reader study's table rows: ``rater``, ``type`` (``reader``, ``reader average``, ``majority vote``,
            ``model``) and the ``sensitivity``, ``specificity`` and ``auc`` estimates (``value``, ``ci_low``,
            ``ci_high``), readers in their order.
        rocs: rater name → (false-positive rates, true-positive rates, what the score is): the ROC curves of the
            model and the readers who gave scores (:func:`covidctnet.evaluation.stats.roc_points`); empty when the
            truth has one class (only the rates that exist are drawn).
        title: axes title.
        dpi: resolution.

    Returns:
        ``path``.
    """
    by_name = {row["rater"]: row for row in rows}
    readers = [row["rater"] for row in rows if row["type"] == "reader"]
    model = next(row["rater"] for row in rows if row["type"] == "model")
    average = next(row["rater"] for row in rows if row["type"] == "reader average")
    vote = next(row["rater"] for row in rows if row["type"] == "majority vote")
    colors = {model: "C0", **{name: f"C{(i + 1) % 10}" for i, name in enumerate(readers)}}
    colors[average] = f"C{(len(readers) + 1) % 10}"
    colors[vote] = f"C{(len(readers) + 2) % 10}"
    curves: list[RocCurve] = []
    for name in (model, *readers):
        if name in rocs:
            fpr, tpr, what = rocs[name]
            auc = by_name[name]["auc"]
            if name == model:
                curves.append(RocCurve(fpr, tpr, "model", auc=auc.value, auc_ci=(auc.ci_low, auc.ci_high),
                                       color=colors[name]))
            else:
                curves.append(RocCurve(fpr, tpr, f"{name} ({what})", auc=auc.value, style="--",
                                       color=colors[name]))

    def point(name: str, label: str, marker: str) -> OperatingPoint | None:
        sens, spec = by_name[name]["sensitivity"], by_name[name]["specificity"]
        if sens is None or spec is None or sens.value is None or spec.value is None:
            return None
        return OperatingPoint(1 - spec.value, sens.value, label, marker, colors[name])

    candidates = [point(model, "model (decision rule)", "o")]
    candidates += [point(name, name, _RATER_MARKERS[i % len(_RATER_MARKERS)]) for i, name in enumerate(readers)]
    candidates += [point(average, "reader average", "*"), point(vote, "majority vote", "H")]
    return plot_roc(path, curves, [p for p in candidates if p is not None], title=title, dpi=dpi)


def plot_confusion(
    path: str | os.PathLike,
    matrix: Sequence[Sequence[int]] | np.ndarray,
    class_names: Sequence[str],
    *,
    title: str = "Confusion matrix",
    dpi: int = _DEFAULT_DPI,
) -> Path:
    """Draw a confusion matrix (rows = truth, columns = prediction) with counts and row percentages.

    Args:
        path: output PNG path.
        matrix: (C, C) counts, ``matrix[i, j]`` = cases of true class ``i`` predicted as ``j``.
        class_names: (C,) names in matrix order.
        title: axes title.
        dpi: resolution.

    Returns:
        ``path``.
    """
    m = np.asarray(matrix, dtype=np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(class_names):
        raise ValueError(f"matrix must be (C, C) with C = {len(class_names)} class names, not shape {m.shape}")
    row_sums = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, row_sums, out=np.zeros(m.shape, dtype=np.float64), where=row_sums > 0)
    size = 1.2 + 1.1 * m.shape[0]
    fig = new_figure((size + 1.0, size))
    ax = fig.add_subplot()
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(
                j,
                i,
                f"{m[i, j]}\n{100 * frac[i, j]:.0f}%",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if frac[i, j] > 0.6 else "black",
            )
    ticks = np.arange(m.shape[0])
    ax.set_xticks(ticks, labels=list(class_names))
    ax.set_yticks(ticks, labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    return save_figure(fig, path, dpi=dpi)


def plot_residual_overlay(
    path: str | os.PathLike,
    ct: np.ndarray,
    residual: np.ndarray,
    *,
    title: str = "",
    dpi: int = _DEFAULT_DPI,
    lung_mask: np.ndarray | None = None,
    axial_index: int | None = None,
    probability: bool = False,
) -> Path:
    """Residual (or lesion probability) over the CT on an axial slice and the coronal and sagittal slices through it.

    Args:
        path: output PNG.
        ct: (X, Y, Z) preprocessed CT in [0, 1], RAS (axis 2 = slices, inferior to superior).
        residual: (X, Y, Z) signed residual on the same grid (input − denoised); drawn in a diverging colour map
            where its magnitude exceeds the 95th percentile, so structure the denoiser could not reproduce stands out.
        title: figure title (e.g. the study id and predicted class).
        lung_mask: optional (X, Y, Z) bool lung mask on the same grid: the lungs are outlined, the residual is
            shown inside them only, minus its median over the lungs (percentiles taken over the lungs).
        axial_index: the axial slice to show (default: the middle one); the coronal and sagittal slices pass through
            the largest residual inside the lungs of that slice (the volume's centre without a mask).
        probability: ``residual`` holds lesion probabilities in [0, 1] (a lesion model's map): drawn on a fixed 0–1
            scale where they are at least 0.5, with no median subtracted.

    Returns:
        The written path.
    """
    ct = np.asarray(ct, dtype=np.float32)
    residual = np.asarray(residual, dtype=np.float32)
    if ct.shape != residual.shape:
        raise ValueError(f"ct and residual must have the same shape, not {ct.shape} and {residual.shape}")
    if lung_mask is not None and lung_mask.shape != ct.shape:
        raise ValueError(f"lung_mask must have the CT's shape {ct.shape}, not {lung_mask.shape}")
    inside = np.ones(ct.shape, dtype=bool) if lung_mask is None or not lung_mask.any() else lung_mask.astype(bool)
    # a denoiser can be biased over the whole lung (e.g. denoised lung uniformly brighter): its median over the
    # lungs is subtracted so the colours show where the residual departs from the lung's typical value
    offset = 0.0 if probability or lung_mask is None or not lung_mask.any() else float(np.median(residual[inside]))
    residual = residual - offset
    shown, vmin, vmax, cmap = _overlay_colour_scale(residual, inside, probability)
    x, y, z = _overlay_cut(residual, inside, lung_mask is not None, axial_index)
    # Radiological display: rot90 puts anterior (or superior) up with the patient's right on the image's left.
    views = [
        ("axial", (slice(None), slice(None), z)),
        ("coronal", (slice(None), y, slice(None))),
        ("sagittal", (x, slice(None), slice(None))),
    ]
    fig = new_figure((12.0, 4.4))
    axes = fig.subplots(1, 3)
    for ax, (name, index) in zip(axes, views):
        ax.imshow(np.rot90(ct[index]), cmap="gray", vmin=0, vmax=1, aspect="auto")
        im = ax.imshow(np.rot90(shown[index]), cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.8, aspect="auto")
        if lung_mask is not None:
            ax.contour(np.rot90(lung_mask[index].astype(np.float32)), levels=[0.5], colors="yellow", linewidths=0.6)
        where = {"axial": f"slice {z}", "coronal": f"y={y}", "sagittal": f"x={x}"}[name]
        ax.set_title(f"{name} ({where})")
        ax.set_axis_off()
    label = ("lesion probability (shown where ≥ 0.5)" if probability else
             "residual (input − denoised)" if lung_mask is None else
             f"residual − lung median ({offset:+.3f})")
    if lung_mask is not None:
        label += ", lungs in yellow"
    fig.colorbar(im, ax=list(axes), shrink=0.8, label=label)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=dpi)


def _overlay_colour_scale(
    residual: np.ndarray, inside: np.ndarray, probability: bool
) -> tuple[np.ma.MaskedArray, float, float, str]:
    """What an overlay draws over the CT and on which colour scale.

    Args:
        residual: (X, Y, Z) residual (lung median already subtracted), or lesion probabilities in [0, 1].
        inside: (X, Y, Z) bool voxels that may be drawn (the lungs, or everything without a mask).
        probability: ``residual`` holds probabilities: shown where at least 0.5 on a fixed 0-1 scale.

    Returns:
        the (X, Y, Z) values masked where nothing is drawn, the scale's minimum and maximum, the colour map name.
        A residual is shown where its magnitude reaches its 95th percentile inside, on a symmetric scale to the 99.5th.
    """
    if probability:
        return np.ma.masked_where(~inside | (residual < 0.5), residual), 0.0, 1.0, "plasma"
    magnitude = np.abs(residual[inside])
    limit = float(np.percentile(magnitude, 99.5)) or 1.0
    shown = np.ma.masked_where(~inside | (np.abs(residual) < np.percentile(magnitude, 95)), residual)
    return shown, -limit, limit, "coolwarm"


def _overlay_cut(
    residual: np.ndarray, inside: np.ndarray, has_mask: bool, axial_index: int | None
) -> tuple[int, int, int]:
    """Voxel indices ``(x, y, z)`` of the sagittal, coronal and axial slices an overlay shows.

    Args:
        residual: (X, Y, Z) residual (lung median already subtracted) or lesion probabilities.
        inside: (X, Y, Z) bool lung voxels (everything without a mask).
        has_mask: a lung mask was given.
        axial_index: the axial slice asked for (clipped to the volume), or ``None`` for the middle one.

    Returns:
        the volume's centre, with ``z`` = the asked slice; with a mask that has lung in it, ``x`` and ``y`` go
        through the strongest residual of that slice, smoothed over 5 x 5 voxels, inside the lungs.
    """
    x, y, z = (s // 2 for s in residual.shape)
    if axial_index is not None:
        z = int(np.clip(axial_index, 0, residual.shape[2] - 1))
        if has_mask and inside[:, :, z].any():
            smooth = ndimage.uniform_filter(np.maximum(residual[:, :, z], 0), size=5)
            x, y = np.unravel_index(np.argmax(np.where(inside[:, :, z], smooth, -np.inf)), smooth.shape)
    return x, y, z


def plot_slice_scores(
    path: str | os.PathLike,
    study_id: str,
    rows: Sequence[Mapping[str, Any]],
    infected: np.ndarray,
    lung: np.ndarray,
    scores: Sequence[str],
) -> Path:
    """Slice scores along z of one study (``validate-residuals``' ``<study_id>_scores.png``): each score scaled to
    [0, 1] over the scan, the slices labelled infected shaded red, the lung slices marked under the curves.

    Args:
        path: output PNG.
        study_id: the study, for the title.
        rows: its N slice-table rows (``z_mm`` and each of ``scores``).
        infected: (N,) slice labels (1 = infected; 0 or -1 are not shaded).
        lung: (N,) bool lung slices.
        scores: the three columns drawn (purple, orange, green); a score with fewer than two finite values is left out.

    Returns:
        ``path``.
    """
    z = np.array([r["z_mm"] for r in rows])
    fig = new_figure((9.0, 4.0))
    ax = fig.subplots()
    dz = float(np.median(np.diff(z))) if z.size > 1 else 1.0
    for k in np.flatnonzero(infected == 1):
        ax.axvspan(z[k] - dz / 2, z[k] + dz / 2, color="tab:red", alpha=0.15, lw=0)
    for name, colour in zip(scores, ("tab:purple", "tab:orange", "tab:green")):
        s = np.array([r[name] for r in rows], dtype=np.float64)
        finite = np.isfinite(s)
        if finite.sum() < 2:
            continue
        lo, hi = np.nanmin(s), np.nanmax(s)
        ax.plot(z, (s - lo) / (hi - lo or 1.0), color=colour, label=f"{name} (scaled)")
    ax.plot(z[lung], np.full(lung.sum(), -0.05), "k|", ms=4, label="lung slice")
    ax.set_xlabel("z (mm, patient superior)")
    ax.set_ylabel("score, scaled to [0, 1] over the scan")
    ax.set_title(f"{study_id}: red = slices labelled infected")
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


CAM_CMAP = "turbo"
"""Colour map of Grad-CAM overlays: blue (the weakest evidence shown) through green and yellow to red (the top of the
model's range), the rainbow order of the heat maps radiology viewers draw, in its perceptually more even form (Turbo).
A red-to-yellow map was tried first: its yellow top vanished on the white background of figure panels and its few
hues hid the peaks inside a coloured region."""

_CAM_ALPHA = (0.35, 0.6)  # overlay opacity at the floor and at the top: the anatomy stays visible under the colour


def cam_overlay(image: np.ndarray, cam: np.ndarray, top: float, floor: float, cmap: str = CAM_CMAP) -> np.ndarray:
    """A grey slice with a Grad-CAM map blended in where the map is at least ``floor``; elsewhere the slice as it is.

    Args:
        image: (H, W) grey slice in [0, 1].
        cam: (H, W) map (any unit; the one of ``top`` and ``floor``).
        top: the value that gets the last colour of ``cmap`` (higher values too), > ``floor``.
        floor: the smallest value coloured (the first colour of ``cmap``), >= 0.
        cmap: a matplotlib colour map name.

    Returns:
        (H, W, 3) float RGB in [0, 1]: a pure function of its inputs, so a map gets the same colours in every run.
    """
    image = np.asarray(image, dtype=np.float64)
    cam = np.asarray(cam, dtype=np.float64)
    if image.shape != cam.shape or image.ndim != 2:
        raise ValueError(f"image and cam must be (H, W) arrays of one shape, not {image.shape} and {cam.shape}")
    if not 0 <= floor < top:
        raise ValueError(f"need 0 <= floor < top, not floor {floor} and top {top}")
    grey = np.repeat(np.clip(image, 0.0, 1.0)[..., None], 3, axis=2)
    level = np.clip((cam - floor) / (top - floor), 0.0, 1.0)
    colour = colormaps[cmap](level)[..., :3]
    alpha = np.where(cam >= floor, _CAM_ALPHA[0] + (_CAM_ALPHA[1] - _CAM_ALPHA[0]) * level, 0.0)[..., None]
    return grey * (1.0 - alpha) + colour * alpha


def plot_grad_cam(
    path: str | os.PathLike,
    image: np.ndarray,
    cam: np.ndarray,
    *,
    top: float,
    floor: float,
    bar_label: str,
    titles: tuple[str, str] = ("", ""),
    note: str = "",
    dpi: int = 100,
) -> Path:
    """The slice, and beside it the slice under its Grad-CAM map (:func:`cam_overlay`) with a colour bar.

    Args:
        path: output PNG.
        image: (H, W) grey slice in [0, 1].
        cam: (H, W) map on the same grid.
        top, floor: the colour range (see :func:`cam_overlay`); the bar spans it, values below ``floor`` are not drawn.
        bar_label: the bar's text (the unit).
        titles: titles of the left and right panels.
        note: a line under the figure (where the range comes from).
        dpi: resolution.

    Returns:
        The written path.
    """
    fig = new_figure((8.4, 4.3))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax2.imshow(cam_overlay(image, cam, top, floor))
    if note:
        fig.supxlabel(note, fontsize=7)
    for ax, title in zip((ax1, ax2), titles):
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    bar = fig.colorbar(ScalarMappable(Normalize(floor, top), colormaps[CAM_CMAP]), ax=ax2, fraction=0.046,
                       pad=0.04, extend="max")
    bar.set_ticks(np.linspace(floor, top, 4))
    bar.ax.tick_params(labelsize=7)
    bar.set_label(bar_label, fontsize=7)
    return save_figure(fig, path, dpi=dpi)
