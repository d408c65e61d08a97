"""``covidctnet evaluate``: metrics with confidence intervals from a predictions CSV and a labels CSV.

The inputs (``report.csv`` from ``predict``, ``preds.csv`` from ``predict-slice``, a labels CSV) are read and matched
by :mod:`covidctnet.evaluation.inputs`; ``report.md`` is rendered by :mod:`covidctnet.evaluation.report_md`.

Outputs (``report.md``, the same as one self-contained page ``report.html`` with its figures embedded,
``metrics.json``, ``config.yaml`` and PNGs) are written only after every input check passed, each file atomically: bad
input leaves no report at all.

Two views are computed. **2-class**: COVID-19 (positive) against everything else, with accuracy, sensitivity,
specificity, precision, NPV, F1 and the AUC of ``p_covid``. **3-class** (when both predictions and labels are
3-class): accuracy, the confusion matrix, one-vs-rest sensitivity / specificity / precision / F1 / AUC per class and
their macro averages. Intervals: Wilson for proportions, DeLong (or a stratified bootstrap) for AUCs, a stratified
percentile bootstrap for F1 and macro averages; the report states which.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from covidctnet.core.config import config_to_dict, save_config
from covidctnet.core.files import atomic_write_text, sha256_file, to_jsonable
from covidctnet.core.labels import CLASS_NAMES
from covidctnet.evaluation.html_report import write_markdown_html
from covidctnet.evaluation.inputs import (
    POSITIVE_CLASS,
    Predictions,
    check_eval_settings,
    decide,
    decision_rule,
    effective_threshold,
    match_case_ids,
    read_predictions,
    read_truth,
)
from covidctnet.evaluation.plots import OperatingPoint, RocCurve, plot_confusion, plot_roc
from covidctnet.evaluation.report_md import format_estimate, render_evaluation_report
from covidctnet.evaluation.stats import (
    Estimate,
    WeightedAuc,
    bootstrap_auc_ci,
    bootstrap_ci,
    bootstrap_roc_band,
    delong_auc_ci,
    nan_to_none,
    proportion,
    roc_points,
    undefined_auc,
)

__all__ = [
    "EvaluateConfig",
    "binary_metrics",
    "multiclass_metrics",
    "compute_metrics",
    "evaluate",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of ``covidctnet evaluate`` (defaults = ``configs/evaluate.yaml``).

    Attributes:
        threshold: 2-class decision threshold on ``p_covid`` (COVID-19 when ``p_covid >= threshold``); ``None`` uses
            the argmax of the class probabilities (ties go to the earlier class: control, covid, cap; for 2-class
            ``preds.csv`` COVID-19 when ``p_covid > 0.5``). The 3-class decision is always the argmax.
        ci_level: confidence level of every interval (0.95 = 95%).
        auc_ci: ``delong`` (DeLong's variance, normal interval clipped to [0, 1]) or ``bootstrap`` (stratified
            percentile bootstrap) for AUC intervals.
        n_bootstrap: bootstrap resamples for F1, macro averages, ROC bands (and AUCs with ``auc_ci: bootstrap``).
        seed: seed of the bootstrap's ``numpy.random.default_rng``.
        prob_tolerance: how far ``p_control + p_covid + p_cap`` may be from 1.
        roc_band: draw a pointwise bootstrap band around the 2-class ROC curve.
    """
    threshold: float | None = None
    ci_level: float = 0.95
    auc_ci: Literal["delong", "bootstrap"] = "delong"
    n_bootstrap: int = 2000
    seed: int = 0
    prob_tolerance: float = 1e-3
    roc_band: bool = True

    def __post_init__(self) -> None:
        check_eval_settings(self)


# ----------------------------------------------------------------------------------------------------------------------
# metrics


def _auc_estimate(y: np.ndarray, score: np.ndarray, cfg: Any) -> Any:
    if y.all() or not y.any():
        return undefined_auc(int(y.size), cfg.ci_level)
    if cfg.auc_ci == "bootstrap":
        return bootstrap_auc_ci(y, score, n_boot=cfg.n_bootstrap, seed=cfg.seed, level=cfg.ci_level)
    return delong_auc_ci(y, score, level=cfg.ci_level)


def _f1(tp: float, fp: float, fn: float) -> float:
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else math.nan


def _boot_method(cfg: Any) -> str:
    return f"stratified bootstrap (percentile, {cfg.n_bootstrap} resamples, seed {cfg.seed})"


def _est(value: float, low: float, high: float, method: str, level: float, n: int | None = None) -> Any:
    return Estimate(nan_to_none(value), nan_to_none(low), nan_to_none(high), method, n=n, level=level)


def binary_metrics(y_true: np.ndarray, call: np.ndarray, score: np.ndarray | None, cfg: Any) -> dict[str, Any]:
    """2-class metrics (COVID-19 positive) with confidence intervals.

    Args:
        y_true: (n,) bool, True for COVID-19.
        call: (n,) bool, True where the rater calls COVID-19.
        score: (n,) COVID-19 score for the AUC (higher = more likely COVID-19), or ``None`` for no AUC.
        cfg: an :class:`EvaluateConfig` (or any object with ``ci_level``, ``auc_ci``, ``n_bootstrap``, ``seed``).

    Returns:
        ``{"n", "n_positive", "n_negative", "confusion_matrix": {"labels", "matrix"}, "metrics": {name: Estimate}}``
        where the matrix is ``[[TN, FP], [FN, TP]]`` (rows = truth noncovid / covid).
    """
    y = np.asarray(y_true, dtype=bool)
    c = np.asarray(call, dtype=bool)
    tp, fn = int(np.sum(y & c)), int(np.sum(y & ~c))
    fp, tn = int(np.sum(~y & c)), int(np.sum(~y & ~c))
    level = cfg.ci_level
    metrics: dict[str, Any] = {
        "accuracy": proportion(tp + tn, y.size, level),
        "sensitivity": proportion(tp, tp + fn, level),
        "specificity": proportion(tn, tn + fp, level),
        "precision": proportion(tp, tp + fp, level),
        "npv": proportion(tn, tn + fn, level),
    }

    def stat(idx: np.ndarray) -> list[float]:
        w = np.bincount(idx, minlength=y.size)
        return [_f1(w[y & c].sum(), w[~y & c].sum(), w[y & ~c].sum())]

    low, high = bootstrap_ci(stat, y.size, strata=y, n_boot=cfg.n_bootstrap, seed=cfg.seed, level=level)
    metrics["f1"] = _est(_f1(tp, fp, fn), low[0], high[0], _boot_method(cfg), level, n=int(y.size))
    if score is not None:
        metrics["auc"] = _auc_estimate(y, np.asarray(score, dtype=np.float64), cfg)
    return {
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int((~y).sum()),
        "confusion_matrix": {"labels": ["noncovid", "covid"], "matrix": [[tn, fp], [fn, tp]]},
        "metrics": metrics,
    }


def _per_class_rates(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One-vs-rest sensitivity, specificity, precision, F1 per class from a (C, C) confusion matrix (NaN if 0/0)."""
    total = cm.sum()
    tp = np.diag(cm).astype(np.float64)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = total - tp - fn - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = tp / (tp + fn)
        spec = tn / (tn + fp)
        prec = tp / (tp + fp)
        f1 = 2 * tp / (2 * tp + fp + fn)
    return sens, spec, prec, f1


def multiclass_metrics(truth: np.ndarray, predicted: np.ndarray, probs: np.ndarray, cfg: Any) -> dict[str, Any]:
    """3-class metrics: accuracy, confusion matrix, one-vs-rest per-class metrics and macro averages.

    Args:
        truth: (n,) true class indices (0 control, 1 covid, 2 cap).
        predicted: (n,) predicted class indices.
        probs: (n, 3) class probabilities (scores of the one-vs-rest AUCs).
        cfg: see :func:`binary_metrics`.

    Returns:
        ``{"n", "confusion_matrix", "accuracy", "per_class": {class: {...}}, "macro": {...}, "notes": [...]}``.
        Macro averages are the unweighted means over the three classes (the macro AUC equals scikit-learn's
        ``roc_auc_score(multi_class="ovr", average="macro")``); they are ``None`` when a class is absent from the
        labels or never predicted (a per-class metric is then undefined).
    """
    t = np.asarray(truth, dtype=np.int64)
    p = np.asarray(predicted, dtype=np.int64)
    k = len(CLASS_NAMES)
    level = cfg.ci_level
    cm = np.bincount(k * t + p, minlength=k * k).reshape(k, k)
    sens, spec, prec, f1 = _per_class_rates(cm)
    present = np.bincount(t, minlength=k) > 0
    aucs = [_auc_estimate(t == j, probs[:, j], cfg) for j in range(k)]
    macro_point = {
        "sensitivity": float(np.mean(sens)),
        "specificity": float(np.mean(spec)),
        "precision": float(np.mean(prec)),
        "f1": float(np.mean(f1)),
        "auc": float(np.mean([a.value for a in aucs])) if all(a.value is not None for a in aucs) else math.nan,
    }

    boot_auc = cfg.auc_ci == "bootstrap"
    auc_of = [WeightedAuc(t == j, probs[:, j]) for j in range(k)]
    cells = k * t + p

    def stat(idx: np.ndarray) -> list[float]:
        w = np.bincount(idx, minlength=t.size).astype(np.float64)
        m = np.bincount(cells, weights=w, minlength=k * k).reshape(k, k)
        s_, sp_, pr_, f_ = _per_class_rates(m)
        a = [auc_of[j](w) for j in range(k)]
        out = list(f_) + [np.mean(s_), np.mean(sp_), np.mean(pr_), np.mean(f_), np.mean(a)]
        return out + (a if boot_auc else [])

    low, high = bootstrap_ci(stat, t.size, strata=t, n_boot=cfg.n_bootstrap, seed=cfg.seed, level=level)
    method = _boot_method(cfg)
    per_class: dict[str, Any] = {}
    for j, name in enumerate(CLASS_NAMES):
        tp = int(cm[j, j])
        pos, called = int(cm[j].sum()), int(cm[:, j].sum())
        neg = int(cm.sum() - pos)
        tn = int(cm.sum() - pos - called + tp)
        per_class[name] = {
            "n": pos,
            "sensitivity": proportion(tp, pos, level),
            "specificity": proportion(tn, neg, level),
            "precision": proportion(tp, called, level),
            "f1": _est(f1[j], low[j], high[j], method, level, n=int(t.size)),
            "auc": aucs[j],
        }
    macro = {
        name: _est(macro_point[name], low[k + i], high[k + i], method, level, n=int(t.size))
        for i, name in enumerate(("sensitivity", "specificity", "precision", "f1", "auc"))
    }
    notes = []
    if not present.all():
        notes.append(
            "class(es) " + ", ".join(n for n, ok in zip(CLASS_NAMES, present) if not ok) + " absent from the labels: "
            "their sensitivity and AUC are undefined, and so are the macro averages that need them"
        )
    never = [n for n, c in zip(CLASS_NAMES, cm.sum(axis=0)) if c == 0]
    if never:
        notes.append("class(es) " + ", ".join(never) + " never predicted: precision undefined")
    return {
        "n": int(t.size),
        "confusion_matrix": {"labels": list(CLASS_NAMES), "matrix": cm.tolist()},
        "accuracy": proportion(int(np.trace(cm)), int(t.size), level),
        "per_class": per_class,
        "macro": macro,
        "notes": notes,
    }


def _methods(cfg: Any) -> dict[str, str]:
    auc = (
        "DeLong variance (DeLong et al. 1988; Sun & Xu 2014), normal interval clipped to [0, 1]"
        if cfg.auc_ci == "delong"
        else _boot_method(cfg)
    )
    return {
        "proportions": "Wilson score interval",
        "auc": auc,
        "f1_and_macro_averages": _boot_method(cfg),
        "level": f"{100 * cfg.ci_level:g}%",
    }


def compute_metrics(
    predictions: Predictions,
    truth_keys: Sequence[str],
    truth: Mapping[str, str],
    cfg: EvaluateConfig,
    threshold_source: str = "",
) -> dict[str, Any]:
    """All metrics of a validated predictions file against its labels (no file is written).

    Args:
        predictions: from :func:`read_predictions`.
        truth_keys: the labels key of each *used* prediction row (from :func:`match_case_ids`).
        truth: the labels.
        cfg: the config; ``cfg.threshold`` is the threshold applied (see :func:`effective_threshold`).
        threshold_source: where that threshold came from, for the report.

    Returns:
        the ``metrics.json`` content except file provenance; ``Estimate`` objects are kept (see ``to_jsonable``).
    """
    labels = np.asarray([truth[k] for k in truth_keys], dtype=object)
    labels3, call = decide(predictions, cfg.threshold)
    y = labels == POSITIVE_CLASS
    result: dict[str, Any] = {
        "decision_rule": decision_rule(predictions.kind, cfg.threshold, threshold_source),
        "threshold": cfg.threshold,
        "threshold_source": threshold_source or None,
        "methods": _methods(cfg),
        "two_class": binary_metrics(y, call, predictions.p_covid, cfg),
    }
    truth_is_3class = all(v in CLASS_NAMES for v in truth.values())
    if labels3 is not None and truth_is_3class:
        index = {n: i for i, n in enumerate(CLASS_NAMES)}
        assert predictions.probs is not None
        result["three_class"] = multiclass_metrics(
            np.asarray([index[v] for v in labels]), np.asarray([index[v] for v in labels3]), predictions.probs, cfg
        )
    else:
        reason = "the predictions are 2-class (preds.csv)" if labels3 is None else "the labels are 2-class (noncovid)"
        result["three_class"] = None
        result["three_class_skipped"] = f"3-class metrics need 3-class predictions and labels; {reason}"
    return result


def _write_plots(
    result: Mapping[str, Any],
    predictions: Predictions,
    truth_keys: Sequence[str],
    truth: Mapping[str, str],
    cfg: EvaluateConfig,
    out_dir: Path,
) -> dict[str, str]:
    images: dict[str, str] = {}
    labels = np.asarray([truth[k] for k in truth_keys], dtype=object)
    y = labels == POSITIVE_CLASS
    two = result["two_class"]
    if 0 < y.sum() < y.size:
        fpr, tpr, _ = roc_points(y, predictions.p_covid)
        auc = two["metrics"]["auc"]
        band: dict[str, Any] = {}
        if cfg.roc_band:
            grid = np.linspace(0.0, 1.0, 101)
            low, high = bootstrap_roc_band(
                y, predictions.p_covid, grid, n_boot=cfg.n_bootstrap, seed=cfg.seed, level=cfg.ci_level
            )
            band = {"band_fpr": grid, "band_low": low, "band_high": high}
        curve = RocCurve(fpr, tpr, "model, COVID-19 vs rest", auc=auc.value, auc_ci=(auc.ci_low, auc.ci_high), **band)
        sens, spec = two["metrics"]["sensitivity"].value, two["metrics"]["specificity"].value
        point = OperatingPoint(1.0 - spec, sens, "decision rule", marker="o", color="C0")
        plot_roc(
            out_dir / "roc_2class.png",
            [curve],
            [point],
            title="ROC, COVID-19 vs rest",
            band_label=f"{100 * cfg.ci_level:g}% pointwise CI (bootstrap)" if band else None,
        )
        images["roc_2class"] = "roc_2class.png"
    cm = two["confusion_matrix"]
    plot_confusion(out_dir / "confusion_2class.png", cm["matrix"], cm["labels"], title="COVID-19 vs rest")
    images["confusion_2class"] = "confusion_2class.png"
    three = result.get("three_class")
    if three is not None and predictions.probs is not None:
        curves = []
        for j, name in enumerate(CLASS_NAMES):
            yj = labels == name
            if 0 < yj.sum() < yj.size:
                fpr, tpr, _ = roc_points(yj, predictions.probs[:, j])
                a = three["per_class"][name]["auc"]
                curves.append(RocCurve(fpr, tpr, f"{name} vs rest", auc=a.value, auc_ci=(a.ci_low, a.ci_high)))
        if curves:
            plot_roc(out_dir / "roc_3class.png", curves, title="ROC, one vs rest (3-class)")
            images["roc_3class"] = "roc_3class.png"
        cm = three["confusion_matrix"]
        plot_confusion(out_dir / "confusion_3class.png", cm["matrix"], cm["labels"], title="Control / COVID-19 / CAP")
        images["confusion_3class"] = "confusion_3class.png"
    return images


def evaluate(
    predictions_csv: str | os.PathLike,
    labels_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: EvaluateConfig | None = None,
) -> dict[str, Any]:
    """Evaluate a predictions CSV against a labels CSV and write the report folder.

    Every input check runs before anything is written, so bad input leaves no report.

    Args:
        predictions_csv: ``report.csv`` (predict) or ``preds.csv`` (predict-slice).
        labels_csv: ``study_id,label`` (or ``case_id,label``); 3-class or 2-class labels.
        out_dir: report folder; gets ``report.md``, ``report.html`` (the report as one page, figures embedded),
            ``metrics.json``, ``config.yaml``, ``roc_2class.png``,
            ``confusion_2class.png`` and, for 3-class inputs, ``roc_3class.png`` and ``confusion_3class.png``.
        config: options; defaults from :class:`EvaluateConfig`.

    Returns:
        the content of ``metrics.json``.

    Raises:
        InputError / LabelError: bad or inconsistent inputs (one-line message naming the file).
    """
    cfg = config or EvaluateConfig()
    predictions_csv, labels_csv, out_dir = Path(predictions_csv), Path(labels_csv), Path(out_dir)
    predictions = read_predictions(predictions_csv, cfg.prob_tolerance)
    truth = read_truth(labels_csv)
    keys_all = match_case_ids(
        predictions.all_ids, truth, predictions_csv, labels_csv, allow_file_names=predictions.id_column == "file"
    )
    truth_keys = keys_all[: len(predictions.ids)]
    threshold, source = effective_threshold(predictions, cfg.threshold)
    if cfg.threshold is None and threshold is not None:
        logger.info("%s: threshold %.6g from its threshold column (the one predict-slice used)", predictions_csv,
                    threshold)
    result = compute_metrics(predictions, truth_keys, truth, dataclasses.replace(cfg, threshold=threshold), source)
    inputs = {
        "predictions": str(predictions_csv),
        "predictions_kind": "report.csv, 3-class" if predictions.kind == "3class" else "preds.csv, 2-class",
        "predictions_sha256": sha256_file(predictions_csv),
        "labels": str(labels_csv),
        "labels_sha256": sha256_file(labels_csv),
        "n_rows": predictions.n_rows,
        "n_evaluated": len(predictions.ids),
        "model": predictions.model or None,
        "weights_sha256": predictions.weights_sha256 or None,
        "excluded": dict(predictions.excluded),
    }
    if predictions.excluded:
        logger.warning("%s: %d row(s) excluded (status error/skipped)", predictions_csv, len(predictions.excluded))
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _write_plots(result, predictions, truth_keys, truth, cfg, out_dir)
    save_config(cfg, out_dir / "config.yaml")
    payload = {
        "schema": "covidctnet-evaluate/1",
        "inputs": inputs,
        "config": config_to_dict(cfg),
        **to_jsonable(result),
        "files": sorted(["report.md", "report.html", "metrics.json", "config.yaml", *images.values()]),
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
    report_md = render_evaluation_report(result, inputs, cfg.ci_level, images)
    atomic_write_text(out_dir / "report.md", report_md)
    write_markdown_html(out_dir / "report.html", report_md, out_dir, "covidctnet evaluation report")
    two = result["two_class"]["metrics"]
    logger.info(
        "evaluated %d cases: 2-class accuracy %s, AUC %s; report in %s",
        len(predictions.ids),
        format_estimate(two["accuracy"])[0],
        format_estimate(two["auc"], percent=False)[0] if "auc" in two else "n/a",
        out_dir,
    )
    return payload
