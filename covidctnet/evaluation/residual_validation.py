"""``covidctnet validate-residuals``: do the residual maps find infected slices, better than density does?

Input: a ``covidctnet slice-scores`` folder (``<study_id>_slices.csv``) and slice labels in the shape of the shared
``slice_labels.csv`` (``study_id, z_mm, infected``; other columns are ignored). A slice is matched to the label row of
its study whose ``z_mm`` is within half the slice spacing; unmatched slices are left out and counted.

Slice position confounds these labels: infection is marked mostly in mid-lung slices with large lung cross-sections,
while partial volume raises density near the apex and the base. So the evaluation keeps **lung slices** only:
``lung_ml >= lung_fraction ×`` that scan's largest ``lung_ml`` (0.25 by default), and always reports three scores
side by side: ``residual_score``, ``hu_score`` (density baseline) and ``lung_ml`` itself (position proxy).

* per study with infected and clean lung slices: within-patient AUC (infected vs not) with a DeLong 95% CI for each
  score, and DeLong's paired test of ``residual_score`` against ``hu_score`` and against ``lung_ml``;
* pooled: the infected lung slices of the studies with any infection (COVID-19 / CAP patients) against the lung
  slices of the studies without any (normal subjects), same AUCs and tests;
* any other ``residual_*`` column of the CSVs (the candidate statistics) gets its AUCs too, under ``candidates``.

Outputs: ``metrics.json``, ``report.md`` and ``<study_id>_scores.png`` (the three scores along z, each scaled to
[0, 1] over the scan, infected slices shaded, lung slices marked).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covidctnet.core.errors import ConfigError, InputError, LabelError
from covidctnet.core.files import atomic_write_text, to_jsonable
from covidctnet.core.slice_table import SLICES_SUFFIX, read_slices_csv
from covidctnet.evaluation.plots import new_figure, save_figure
from covidctnet.evaluation.stats import auc_score, delong_auc_ci, delong_test

__all__ = ["ValidateResidualsConfig", "read_slice_labels", "match_labels", "validate_residuals", "SCORES"]

logger = logging.getLogger(__name__)

SCORES = ("residual_score", "hu_score", "lung_ml")
"""The scores always reported side by side; ``residual_score`` is compared with the other two."""


@dataclass(frozen=True)
class ValidateResidualsConfig:
    """Settings of ``covidctnet validate-residuals`` (defaults = ``configs/validate_residuals.yaml``).

    Attributes:
        lung_fraction: a slice is a lung slice when its ``lung_ml`` is at least this fraction of the scan's largest.
        level: confidence level of the DeLong intervals.
    """

    lung_fraction: float = 0.25
    level: float = 0.95

    def __post_init__(self) -> None:
        if not 0.0 <= self.lung_fraction < 1.0:
            raise ConfigError(f"'lung_fraction' must be in [0, 1), not {self.lung_fraction}")
        if not 0.5 <= self.level < 1.0:
            raise ConfigError(f"'level' must be in [0.5, 1), not {self.level}")


def read_slice_labels(path: str | os.PathLike) -> dict[str, list[tuple[float, int]]]:
    """``{study_id: [(z_mm, infected), ...]}`` from a labels CSV (``study_id, z_mm, infected`` columns).

    Raises:
        LabelError: missing file or column, or a value that is not a number / 0-1 flag (the message names the row).
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("study_id", "z_mm", "infected") if c not in (reader.fieldnames or [])]
            if missing:
                raise LabelError(f"{path}: column(s) {missing} missing; expected study_id, z_mm, infected")
            out: dict[str, list[tuple[float, int]]] = {}
            for i, row in enumerate(reader, start=2):
                try:
                    z = float(row["z_mm"])
                    flag = int(row["infected"])
                except (TypeError, ValueError) as err:
                    raise LabelError(f"{path}, line {i}: z_mm must be a number and infected 0 or 1") from err
                if flag not in (0, 1):
                    raise LabelError(f"{path}, line {i}: infected must be 0 or 1, not {flag}")
                out.setdefault(row["study_id"], []).append((z, flag))
    except OSError as err:
        raise LabelError(f"{path}: cannot read labels: {err.strerror or err}") from err
    if not out:
        raise LabelError(f"{path}: no label rows")
    return out


def match_labels(rows: Sequence[dict[str, Any]], labels: Sequence[tuple[float, int]]) -> np.ndarray:
    """Label of each slice row: the label whose z is nearest, if within half the slice spacing; else -1.

    Args:
        rows: ``<id>_slices.csv`` rows (ascending ``z_mm``).
        labels: ``(z_mm, infected)`` of that study.

    Returns:
        (N,) int: 0, 1, or -1 (no label).
    """
    z = np.array([r["z_mm"] for r in rows], dtype=np.float64)
    lz = np.array([t[0] for t in labels], dtype=np.float64)
    lf = np.array([t[1] for t in labels], dtype=np.int64)
    half = 0.5 * float(np.median(np.diff(z))) if z.size > 1 else 0.5
    nearest = np.abs(z[:, None] - lz[None, :]).argmin(axis=1)
    ok = np.abs(z - lz[nearest]) <= half + 1e-6
    return np.where(ok, lf[nearest], -1)


def _auc_block(y: np.ndarray, scores: dict[str, np.ndarray], level: float) -> dict[str, Any]:

    out: dict[str, Any] = {"n_slices": int(y.size), "n_infected": int(y.sum()), "auc": {}, "tests": {}}
    for name, s in scores.items():
        out["auc"][name] = delong_auc_ci(y, s, level).to_dict()
    for other in ("hu_score", "lung_ml"):
        if "residual_score" in scores and other in scores:
            out["tests"][f"residual_score_vs_{other}"] = delong_test(y, scores["residual_score"],
                                                                     scores[other]).to_dict()
    return out


def _plot_study(path: Path, sid: str, rows: list[dict[str, Any]], y: np.ndarray, lung: np.ndarray) -> None:

    z = np.array([r["z_mm"] for r in rows])
    fig = new_figure((9.0, 4.0))
    ax = fig.subplots()
    for k in np.flatnonzero(y == 1):
        dz = float(np.median(np.diff(z))) if z.size > 1 else 1.0
        ax.axvspan(z[k] - dz / 2, z[k] + dz / 2, color="tab:red", alpha=0.15, lw=0)
    for name, colour in zip(SCORES, ("tab:purple", "tab:orange", "tab:green")):
        s = np.array([r[name] for r in rows], dtype=np.float64)
        finite = np.isfinite(s)
        if finite.sum() < 2:
            continue
        lo, hi = np.nanmin(s), np.nanmax(s)
        ax.plot(z, (s - lo) / (hi - lo or 1.0), color=colour, label=f"{name} (scaled)")
    ax.plot(z[lung], np.full(lung.sum(), -0.05), "k|", ms=4, label="lung slice")
    ax.set_xlabel("z (mm, patient superior)")
    ax.set_ylabel("score, scaled to [0, 1] over the scan")
    ax.set_title(f"{sid}: red = slices labelled infected")
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path)


def _fmt_auc(d: dict[str, Any]) -> str:
    if d.get("value") is None:
        return "n/a"
    return f"{d['value']:.3f} ({d['ci_low']:.3f}–{d['ci_high']:.3f})"


def _report(metrics: dict[str, Any]) -> str:
    lines = ["# Residual validation (slice level)", "",
             f"Slice scores: `{metrics['slices_dir']}`; labels: `{metrics['labels']}`; lung slices: lung_ml ≥ "
             f"{metrics['config']['lung_fraction']:.2f} × the scan's largest. AUC with DeLong "
             f"{int(metrics['config']['level'] * 100)}% CI; p: DeLong paired test against residual_score.", "",
             "| analysis | slices (infected) | " + " | ".join(SCORES) + " | p vs hu_score | p vs lung_ml |",
             "|---|---|" + "---|" * (len(SCORES) + 2)]
    blocks = [(f"within {sid}", b) for sid, b in metrics["per_study"].items() if "auc" in b]
    if metrics.get("pooled") and "auc" in metrics["pooled"]:
        blocks.append(("pooled vs normal subjects", metrics["pooled"]))
    for name, b in blocks:
        tests = b["tests"]
        lines.append(f"| {name} | {b['n_slices']} ({b['n_infected']}) | "
                     + " | ".join(_fmt_auc(b["auc"][s]) for s in SCORES) + " | "
                     + " | ".join(f"{tests[k]['p_value']:.3g}" if k in tests else "n/a"
                                  for k in ("residual_score_vs_hu_score", "residual_score_vs_lung_ml")) + " |")
    if "mean_within_auc" in metrics:
        lines += ["", "Mean within-patient AUC: " + ", ".join(f"{s} {v:.3f}" for s, v in
                                                                metrics["mean_within_auc"].items())]
    cands = metrics.get("candidates") or {}
    if cands:
        lines += ["", "## Candidate residual statistics (AUC)", "",
                  "| statistic | " + " | ".join(cands[next(iter(cands))]) + " |",
                  "|---|" + "---|" * len(cands[next(iter(cands))])]
        for stat, per in cands.items():
            lines.append(f"| {stat} | " + " | ".join(f"{v:.3f}" if v is not None else "n/a" for v in per.values())
                         + " |")
    lines += ["", "Studies without labels or without both classes among their lung slices are listed in "
              "metrics.json (`skipped`). Figures: `<study_id>_scores.png`."]
    return "\n".join(lines) + "\n"


def validate_residuals(slices_dir: str | os.PathLike, labels_path: str | os.PathLike, out_dir: str | os.PathLike,
                       cfg: ValidateResidualsConfig = ValidateResidualsConfig()) -> dict[str, Any]:
    """Slice-level AUCs of the residual score against the HU and lung-area baselines (see the module docstring).

    Args:
        slices_dir: folder of ``<study_id>_slices.csv`` files (``covidctnet slice-scores`` output).
        labels_path: slice labels (``study_id, z_mm, infected``).
        out_dir: where ``metrics.json``, ``report.md`` and the PNGs go (written only once everything is computed).
        cfg: lung-slice fraction and CI level.

    Returns:
        The metrics (as written to ``metrics.json``).

    Raises:
        InputError: no slice CSV, no study with labels, or no analysis possible (message says why).
        LabelError: unreadable labels.
    """

    slices_dir, out_dir = Path(slices_dir), Path(out_dir)
    files = sorted(slices_dir.glob(f"*{SLICES_SUFFIX}")) if slices_dir.is_dir() else []
    if not files:
        raise InputError(f"{slices_dir}: no *{SLICES_SUFFIX} files (run `covidctnet slice-scores` first)")
    labels = read_slice_labels(labels_path)
    per_study: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    pooled_pos: list[dict[str, np.ndarray]] = []
    pooled_neg: list[dict[str, np.ndarray]] = []
    plots: list[tuple[str, list[dict[str, Any]], np.ndarray, np.ndarray]] = []
    extra: list[str] = []
    for path in files:
        rows = read_slices_csv(path)
        if not rows:
            skipped[path.name] = "empty"
            continue
        sid = rows[0]["study_id"]
        if sid not in labels:
            skipped[sid] = "no labels"
            continue
        y = match_labels(rows, labels[sid])
        lung_ml = np.array([r["lung_ml"] for r in rows], dtype=np.float64)
        lung = lung_ml >= cfg.lung_fraction * float(lung_ml.max()) if lung_ml.max() > 0 else np.zeros_like(y, bool)
        if not extra:
            extra = [k for k in rows[0] if k.startswith("residual_") and k != "residual_score"]
        cols = list(SCORES) + extra
        values = {c: np.array([r.get(c, np.nan) for r in rows], dtype=np.float64) for c in cols}
        keep = lung & (y >= 0) & np.all([np.isfinite(values[c]) for c in cols], axis=0)
        plots.append((sid, rows, y, lung))
        info: dict[str, Any] = {"n_rows": len(rows), "n_unmatched": int((y < 0).sum()),
                                "n_lung_slices": int(keep.sum()), "n_infected_all": int((y == 1).sum())}
        yk = y[keep]
        chosen = {c: values[c][keep] for c in cols}
        if (y == 1).any():
            pooled_pos.append({c: v[yk == 1] for c, v in chosen.items()})
        else:
            pooled_neg.append(chosen)
            info["role"] = "normal subject (no infected slice): negatives of the pooled analysis"
        if yk.size and 0 < yk.sum() < yk.size:
            info.update(_auc_block(yk, {c: chosen[c] for c in SCORES}, cfg.level))
            info["candidates"] = {c: auc_score(yk, chosen[c]) for c in extra}
        elif (y == 1).any():
            skipped[sid] = "lung slices hold only one class"
        per_study[sid] = info
    if not per_study:
        raise InputError(f"{slices_dir}: none of the studies {[p.name for p in files]} has labels in {labels_path}")
    metrics: dict[str, Any] = {"slices_dir": str(slices_dir), "labels": str(labels_path),
                               "config": {"lung_fraction": cfg.lung_fraction, "level": cfg.level},
                               "per_study": per_study, "skipped": skipped}
    within = [b for b in per_study.values() if "auc" in b]
    if within:
        metrics["mean_within_auc"] = {s: float(np.mean([b["auc"][s]["value"] for b in within])) for s in SCORES}
    candidates: dict[str, dict[str, float | None]] = {}
    for c in extra:
        candidates[c] = {sid: b["candidates"][c] for sid, b in per_study.items() if "candidates" in b}
    if pooled_pos and pooled_neg:
        pos = {c: np.concatenate([p[c] for p in pooled_pos]) for c in pooled_pos[0]}
        neg = {c: np.concatenate([n[c] for n in pooled_neg]) for c in pooled_neg[0]}
        y = np.concatenate([np.ones(pos["lung_ml"].size, int), np.zeros(neg["lung_ml"].size, int)])
        both = {c: np.concatenate([pos[c], neg[c]]) for c in pos}
        if 0 < y.sum() < y.size:
            metrics["pooled"] = _auc_block(y, {c: both[c] for c in SCORES}, cfg.level)
            metrics["pooled"]["positives"] = "infected lung slices of studies with infection"
            metrics["pooled"]["negatives"] = "lung slices of studies without infection"
            for c in extra:
                candidates[c]["pooled"] = auc_score(y, both[c])
    if candidates:
        metrics["candidates"] = candidates

    metrics = to_jsonable(metrics)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sid, rows, y, lung in plots:
        _plot_study(out_dir / f"{sid}_scores.png", sid, rows, y, lung)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))
    atomic_write_text(out_dir / "report.md", _report(metrics))
    return metrics
