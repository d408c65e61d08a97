"""``covidctnet reader-study``: the model against radiologists on the same cases, as in the CovidCTNet paper.

Javaheri et al. (npj Digit. Med. 4:29, 2021) compared CovidCTNet with four radiologists on 20 cases and reported, per
reader, for the reader average and for the model: accuracy (COVID-19 vs non-COVID and 3-class), sensitivity,
specificity and AUC. This module builds that table with confidence intervals and adds what a paper needs next to it:

* paired tests of the model against each reader, the majority vote and the average reader: exact McNemar on
  correctness (2-class and 3-class) and DeLong's test of the AUCs where the reader gave confidence scores;
* inter-reader agreement: Cohen's kappa for every pair of readers and Fleiss' kappa over all of them;
* a ROC plot of the model with each reader's operating point.

Inputs (see ``docs/evaluation.md``): the model's ``report.csv`` (or ``preds.csv``), one CSV per reader
(``case_id,label[,score]``; ``score`` = the reader's confidence that the case is COVID-19, higher = more likely, any
scale) and the truth (``case_id,label``). Every file must hold exactly the truth's cases. Outputs go to one folder:
``table.csv``, ``tests.csv``, ``agreement.csv``, ``metrics.json``, ``report.md``, ``roc.png`` and ``config.yaml``,
written only after every check passed, each atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covidctnet.core.config import config_to_dict, save_config
from covidctnet.core.errors import ConfigError, InputError
from covidctnet.core.files import atomic_write_text, sha256_file, to_jsonable
from covidctnet.core.labels import CLASS_NAMES
from covidctnet.evaluation.inputs import (
    POSITIVE_CLASS,
    Predictions,
    ReaderReads,
    check_eval_settings,
    decide,
    decision_rule,
    listed,
    match_case_ids,
    read_predictions,
    read_reader_csv,
    read_truth,
)
from covidctnet.evaluation.plots import plot_reader_study_roc
from covidctnet.evaluation.report_md import render_reader_study_report, write_reader_study_tables
from covidctnet.evaluation.stats import (
    DeLongTest,
    Estimate,
    bootstrap_ci,
    cohen_kappa,
    delong_auc_ci,
    delong_contrast_test,
    delong_covariance,
    delong_interval,
    delong_test,
    fleiss_kappa,
    mcnemar_exact,
    nan_to_none,
    proportion,
    sign_flip_test,
    undefined_auc,
)

__all__ = ["ReaderStudyConfig", "majority_vote", "run_reader_study"]

logger = logging.getLogger(__name__)

# Tie-break of the majority vote: a tie that involves COVID-19 is called COVID-19 (the cautious call that triggers
# isolation and testing), then CAP, then control.
_VOTE_PRIORITY = ("covid", "cap", "control")


@dataclass(frozen=True)
class ReaderStudyConfig:
    """Options of ``covidctnet reader-study`` (defaults = ``configs/reader_study.yaml``).

    Attributes:
        threshold: the model's 2-class threshold on ``p_covid``; ``None`` = argmax (as in ``evaluate``).
        ci_level: confidence level of every interval.
        n_bootstrap: case-bootstrap resamples for the reader-average intervals.
        seed: seed of the bootstrap's ``numpy.random.default_rng``.
        prob_tolerance: how far the model's three probabilities may sum from 1.
    """

    threshold: float | None = None
    ci_level: float = 0.95
    n_bootstrap: int = 2000
    seed: int = 0
    prob_tolerance: float = 1e-3

    def __post_init__(self) -> None:
        check_eval_settings(self)


def majority_vote(labels: np.ndarray) -> np.ndarray:
    """Per-case majority of R readers' labels; ties go to covid, then cap, then control (noncovid last).

    Args:
        labels: (N, R) labels (3-class names, or covid / noncovid).

    Returns:
        (N,) the voted label.
    """
    priority = {name: i for i, name in enumerate((*_VOTE_PRIORITY, "noncovid"))}
    out = []
    for row in np.asarray(labels, dtype=object):
        counts = Counter(row.tolist())
        best = max(counts.values())
        out.append(min((lab for lab, c in counts.items() if c == best), key=lambda lab: priority[lab]))
    return np.asarray(out, dtype=object)


# ----------------------------------------------------------------------------------------------------------------------
# the study


@dataclass
class _Rater:
    name: str
    kind: str  # "reader", "majority vote", "model"
    call: np.ndarray  # (N,) bool: called COVID-19
    labels3: np.ndarray | None  # (N,) 3-class labels, None if the rater only gave 2 classes
    score: np.ndarray | None  # (N,) COVID-19 score, None if none was given
    score_name: str = "score"

    def auc_input(self) -> tuple[np.ndarray, str]:
        """The ROC score (the given score, else the binary call) and its description."""
        if self.score is not None:
            return self.score, self.score_name
        return self.call.astype(np.float64), "binary call"


def _rater_metrics(r: _Rater, y: np.ndarray, truth3: np.ndarray | None, level: float) -> dict[str, Any]:
    n = int(y.size)
    correct2 = r.call == y
    row: dict[str, Any] = {
        "rater": r.name,
        "type": r.kind,
        "n_cases": n,
        "accuracy_2class": proportion(int(correct2.sum()), n, level),
        "accuracy_3class": None,
        "sensitivity": proportion(int(np.sum(r.call & y)), int(y.sum()), level),
        "specificity": proportion(int(np.sum(~r.call & ~y)), int((~y).sum()), level),
    }
    if r.labels3 is not None and truth3 is not None:
        row["accuracy_3class"] = proportion(int(np.sum(r.labels3 == truth3)), n, level)
    score, source = r.auc_input()
    row["auc"] = delong_auc_ci(y.astype(int), score, level) if 0 < y.sum() < n else undefined_auc(n, level)
    row["auc_source"] = source
    return row


def _reader_average(
    readers: Sequence[_Rater], y: np.ndarray, truth3: np.ndarray | None, strata: np.ndarray, cfg: ReaderStudyConfig
) -> dict[str, Any]:
    """Mean of the readers' metrics; CIs by a stratified case bootstrap, the AUC's by DeLong (mean of the AUCs)."""
    level, n = cfg.ci_level, int(y.size)
    correct2 = np.stack([r.call == y for r in readers]).astype(np.float64)  # (R, N)
    calls = np.stack([r.call for r in readers]).astype(np.float64)
    with3 = [r for r in readers if r.labels3 is not None]
    correct3 = (
        np.stack([r.labels3 == truth3 for r in with3]).astype(np.float64) if (with3 and truth3 is not None) else None
    )

    def means(w: np.ndarray) -> list[float]:
        pos, neg = w * y, w * ~y
        acc2 = float((correct2 @ w).mean() / w.sum())
        acc3 = float((correct3 @ w).mean() / w.sum()) if correct3 is not None else math.nan
        sens = float((calls @ pos).mean() / pos.sum()) if pos.sum() else math.nan
        spec = float(((1.0 - calls) @ neg).mean() / neg.sum()) if neg.sum() else math.nan
        return [acc2, acc3, sens, spec]

    point = means(np.ones(n))
    low, high = bootstrap_ci(
        lambda idx: means(np.bincount(idx, minlength=n).astype(np.float64)),
        n,
        strata=strata,
        n_boot=cfg.n_bootstrap,
        seed=cfg.seed,
        level=level,
    )
    method = f"stratified case bootstrap (percentile, {cfg.n_bootstrap} resamples, seed {cfg.seed})"

    def est(i: int) -> Estimate | None:
        if math.isnan(point[i]):
            return None
        return Estimate(point[i], nan_to_none(low[i]), nan_to_none(high[i]), method, n=n, level=level)

    row: dict[str, Any] = {
        "rater": "Reader average",
        "type": "reader average",
        "n_cases": n,
        "accuracy_2class": est(0),
        "accuracy_3class": est(1),
        "sensitivity": est(2),
        "specificity": est(3),
    }
    sources = sorted({r.auc_input()[1] for r in readers})
    if 0 < y.sum() < n:
        scores = np.stack([r.auc_input()[0] for r in readers])
        aucs, cov = delong_covariance(y.astype(int), scores)
        c = np.full(len(readers), 1.0 / len(readers))
        auc_method = "DeLong (mean of the readers' AUCs)"
        row["auc"] = delong_interval(float(c @ aucs), float(c @ cov @ c), level, auc_method, n)
    else:
        row["auc"] = undefined_auc(n, level)
    row["auc_source"] = "mean of readers (" + ", ".join(sources) + ")"
    if correct3 is not None and len(with3) < len(readers):
        row["note"] = f"3-class accuracy averaged over the {len(with3)} readers who gave 3-class labels"
    return row


def _paired_tests(
    model: _Rater, others: Sequence[_Rater], readers: Sequence[_Rater], y: np.ndarray, truth3: np.ndarray | None
) -> list[dict[str, Any]]:
    """The model against each of ``others`` (readers, majority vote), then against the average of ``readers``.

    Args:
        model: the model as a rater.
        others: the raters compared one by one (exact McNemar, DeLong where both gave scores).
        readers: the readers whose average is compared last (exact sign-flip test, DeLong contrast).
        y: (N,) bool truth, COVID-19 vs non-COVID.
        truth3: (N,) 3-class truth, or ``None`` for 2-class labels.

    Returns:
        one row per comparison, the keys of ``tests.csv``.
    """
    m_correct3 = model.labels3 == truth3 if (model.labels3 is not None and truth3 is not None) else None
    out = [_paired_test(model, other, y, truth3, m_correct3) for other in others]
    out.append(_average_reader_test(model, readers, y, truth3, m_correct3))
    return out


def _paired_test(
    model: _Rater, other: _Rater, y: np.ndarray, truth3: np.ndarray | None, m_correct3: np.ndarray | None
) -> dict[str, Any]:
    """The model against one rater: exact McNemar on correctness (2- and 3-class), DeLong on the AUCs."""
    both_classes = 0 < y.sum() < y.size
    row: dict[str, Any] = {"comparison": f"model vs {other.name}", "other": other.name, "other_type": other.kind}
    row.update(_mcnemar_fields(model.call == y, other.call == y, "2class"))
    if m_correct3 is not None and other.labels3 is not None:
        row.update(_mcnemar_fields(m_correct3, other.labels3 == truth3, "3class"))
    else:
        row.update(_NO_3CLASS_TEST)
    if other.score is not None and model.score is not None and both_classes:
        t = delong_test(y.astype(int), model.score, other.score)
        row.update(_auc_test_fields(f"DeLong (model p_covid vs {other.score_name})", t, t.aucs[1]))
    else:
        row.update(_auc_test_fields("n/a (no scores)"))
    return row


_NO_3CLASS_TEST = {"test_3class": "n/a (no 3-class labels)", "b_3class": None, "c_3class": None, "p_3class": None}


def _auc_test_fields(test: str, t: DeLongTest | None = None, auc_other: float | None = None) -> dict[str, Any]:
    """The ``auc_*`` fields of a ``tests.csv`` row: ``test`` names DeLong's test ``t`` of the model's AUC against the
    other's (``auc_other``), or says why there is none (``t`` is ``None``: every other field empty)."""
    if t is None:
        return dict(auc_test=test, auc_model=None, auc_other=None, auc_difference=None, auc_z=None, auc_p=None)
    return dict(
        auc_test=test, auc_model=t.aucs[0], auc_other=auc_other, auc_difference=t.estimate, auc_z=t.z, auc_p=t.p_value
    )


def _mcnemar_fields(m_correct: np.ndarray, o_correct: np.ndarray, view: str) -> dict[str, Any]:
    """The exact McNemar test of two raters' (N,) correctness, as the ``*_<view>`` fields of a ``tests.csv`` row."""
    res = mcnemar_exact(m_correct, o_correct)
    return {
        f"test_{view}": "exact McNemar",
        f"b_{view}": res.b,
        f"c_{view}": res.c,
        f"p_{view}": res.p_value,
        f"accuracy_difference_{view}": float(m_correct.mean() - o_correct.mean()),
    }


def _sign_flip_fields(m_correct: np.ndarray, readers_correct: Sequence[np.ndarray], view: str) -> dict[str, Any]:
    """The exact paired sign-flip test of the model's (N,) correctness against the mean of R readers' (N,)
    correctness, as the ``*_<view>`` fields of a ``tests.csv`` row.

    The per-case difference is scaled by R to integers; with R = 1 the test is the exact McNemar test.
    """
    n_readers = len(readers_correct)
    d = n_readers * m_correct.astype(int) - np.sum(readers_correct, axis=0)
    return {
        f"test_{view}": "exact paired sign-flip test",
        f"b_{view}": None,
        f"c_{view}": None,
        f"p_{view}": sign_flip_test(d),
        f"accuracy_difference_{view}": float(d.mean() / n_readers),
    }


def _average_reader_test(
    model: _Rater, readers: Sequence[_Rater], y: np.ndarray, truth3: np.ndarray | None, m_correct3: np.ndarray | None
) -> dict[str, Any]:
    """The model against the average reader: exact sign-flip tests on correctness, a DeLong contrast on the AUCs."""
    both_classes = 0 < y.sum() < y.size
    R = len(readers)
    row: dict[str, Any] = {
        "comparison": "model vs average reader", "other": "Reader average", "other_type": "reader average"
    }
    row.update(_sign_flip_fields(model.call == y, [r.call == y for r in readers], "2class"))
    if m_correct3 is not None and all(r.labels3 is not None for r in readers):
        row.update(_sign_flip_fields(m_correct3, [r.labels3 == truth3 for r in readers], "3class"))
    else:
        row.update(_NO_3CLASS_TEST)
    if model.score is not None and all(r.score is not None for r in readers) and both_classes:
        scores = np.stack([model.score, *[r.score for r in readers]])  # type: ignore[misc]
        t = delong_contrast_test(y.astype(int), scores, np.r_[1.0, np.full(R, -1.0 / R)])
        row.update(_auc_test_fields("DeLong contrast (model AUC - mean reader AUC)", t, float(np.mean(t.aucs[1:]))))
    else:
        row.update(_auc_test_fields("n/a (not every reader gave scores)"))
    return row


def _agreement(readers: Sequence[_Rater]) -> dict[str, Any]:
    pairs = []
    for i in range(len(readers)):
        for j in range(i + 1, len(readers)):
            a, b = readers[i], readers[j]
            row: dict[str, Any] = {"reader_a": a.name, "reader_b": b.name}
            if a.labels3 is not None and b.labels3 is not None:
                row["cohen_kappa_3class"] = cohen_kappa(a.labels3, b.labels3, CLASS_NAMES)
                row["agreement_3class"] = float(np.mean(a.labels3 == b.labels3))
            else:
                row["cohen_kappa_3class"] = None
                row["agreement_3class"] = None
            row["cohen_kappa_2class"] = cohen_kappa(a.call, b.call, [False, True])
            row["agreement_2class"] = float(np.mean(a.call == b.call))
            pairs.append(row)
    result: dict[str, Any] = {"pairwise": pairs, "fleiss_kappa_3class": None, "fleiss_kappa_2class": None}
    if len(readers) >= 2:
        if all(r.labels3 is not None for r in readers):
            result["fleiss_kappa_3class"] = fleiss_kappa(np.stack([r.labels3 for r in readers], axis=1), CLASS_NAMES)
        result["fleiss_kappa_2class"] = fleiss_kappa(
            np.stack([np.where(r.call, "covid", "noncovid") for r in readers], axis=1), ("noncovid", "covid")
        )
    return result


def run_reader_study(
    model_csv: str | os.PathLike,
    reader_csvs: Sequence[str | os.PathLike],
    truth_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: ReaderStudyConfig | None = None,
    reader_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Compare the model with readers on the same cases and write the study folder.

    Args:
        model_csv: the model's ``report.csv`` (3-class) or ``preds.csv`` (2-class, then no 3-class accuracy).
        reader_csvs: one ``case_id,label[,score]`` CSV per reader.
        truth_csv: ``case_id,label``.
        out_dir: output folder (``table.csv``, ``tests.csv``, ``agreement.csv``, ``metrics.json``, ``report.md``,
            ``roc.png``, ``config.yaml``).
        config: options; defaults from :class:`ReaderStudyConfig`.
        reader_names: display names, one per reader CSV (default: the file stems, made unique).

    Returns:
        the content of ``metrics.json``.

    Raises:
        InputError / LabelError: no reader, bad files, ids unknown to the truth or missing from a file, model rows
            that failed (status error) — a paired study needs every case.
    """
    cfg = config or ReaderStudyConfig()
    model_csv, truth_csv, out_dir = Path(model_csv), Path(truth_csv), Path(out_dir)
    reader_paths = [Path(p) for p in reader_csvs]
    if not reader_paths:
        raise InputError("no reader CSV given; pass --readers R1.csv [R2.csv ...]")
    if reader_names is not None and len(reader_names) != len(reader_paths):
        raise ConfigError(f"{len(reader_names)} reader names for {len(reader_paths)} reader CSVs")
    names = list(reader_names) if reader_names is not None else _unique_names([p.stem for p in reader_paths])

    truth = read_truth(truth_csv)
    model, model_pred = _model_rater(model_csv, truth, truth_csv, cfg)
    readers, reads = _reader_raters(reader_paths, names, truth, truth_csv)

    case_ids = list(truth)
    truth_arr = np.asarray([truth[c] for c in case_ids], dtype=object)
    y = truth_arr == POSITIVE_CLASS
    truth3 = truth_arr if all(v in CLASS_NAMES for v in truth_arr) else None
    if 0 == y.sum() or y.all():
        logger.warning(
            "%s: only one class in COVID-19 vs non-COVID; sensitivity, specificity or AUC are undefined", truth_csv
        )

    vote = _majority_vote_rater(readers)
    strata = truth_arr.astype(str)
    rows = [_rater_metrics(r, y, truth3, cfg.ci_level) for r in readers]
    rows.append(_reader_average(readers, y, truth3, strata, cfg))
    rows.append(_rater_metrics(vote, y, truth3, cfg.ci_level))
    rows.append(_rater_metrics(model, y, truth3, cfg.ci_level))
    tests = _paired_tests(model, [*readers, vote], readers, y, truth3)
    agreement = _agreement(readers)

    payload = _metrics_payload(cfg, truth_csv, truth_arr, model_csv, model_pred, reads, rows, tests, agreement)
    roc_scores = {r.name: (r.score, r.score_name) for r in (model, *readers) if r.score is not None}
    _write_study(out_dir, cfg, payload, rows, tests, agreement, y, roc_scores)
    logger.info("reader study: %d cases, %d readers; results in %s", len(case_ids), len(readers), out_dir)
    return payload


def _model_rater(
    model_csv: Path, truth: Mapping[str, str], truth_csv: Path, cfg: ReaderStudyConfig
) -> tuple[_Rater, Predictions]:
    """Read the model's predictions and put them in the truth's case order.

    Args:
        model_csv: ``report.csv`` (3-class) or ``preds.csv`` (2-class).
        truth: ``{case id: label}``; its order is the study's case order.
        truth_csv: the truth's path (for messages).
        cfg: options (``prob_tolerance``, ``threshold``).

    Returns:
        the model as a rater ((N,) arrays in truth order, score ``p_covid``) and the predictions file as read.

    Raises:
        InputError / LabelError: a bad file, ids that do not match the truth, or rows without a prediction.
    """
    order = {cid: i for i, cid in enumerate(truth)}
    model_pred = read_predictions(model_csv, cfg.prob_tolerance)
    keys = match_case_ids(
        model_pred.all_ids,
        truth,
        model_csv,
        truth_csv,
        allow_file_names=model_pred.id_column == "file",
        what="model predictions",
    )
    if model_pred.excluded:
        raise InputError(
            f"{model_csv}: the model has no prediction for {len(model_pred.excluded)} case(s) "
            f"(status {'/'.join(sorted(set(model_pred.excluded.values())))}): {listed(model_pred.excluded)}; "
            "a paired reader study needs every case: re-run predict or drop these cases from the truth and reader files"
        )
    perm = np.argsort([order[k] for k in keys])  # model rows into truth order
    labels3_model, call_model = decide(model_pred, cfg.threshold)
    model = _Rater(
        "Model",
        "model",
        call_model[perm],
        None if labels3_model is None else labels3_model[perm],
        model_pred.p_covid[perm],
        "p_covid",
    )
    return model, model_pred


def _reader_raters(
    reader_paths: Sequence[Path], names: Sequence[str], truth: Mapping[str, str], truth_csv: Path
) -> tuple[list[_Rater], list[ReaderReads]]:
    """Read every reader's CSV and put its reads in the truth's case order.

    Args:
        reader_paths: one CSV per reader.
        names: display names, one per CSV.
        truth: ``{case id: label}``; its order is the study's case order.
        truth_csv: the truth's path (for messages).

    Returns:
        the readers as raters ((N,) arrays in truth order; 3-class labels only when every read is a 3-class name) and
        their reads as read.

    Raises:
        InputError / LabelError: a bad file or ids that do not match the truth.
    """
    case_ids = list(truth)
    readers: list[_Rater] = []
    reads: list[ReaderReads] = []
    for path, name in zip(reader_paths, names):
        rr = read_reader_csv(path, name)
        match_case_ids(list(rr.labels), truth, path, truth_csv, what=f"reader CSV of {name!r}")
        labs = np.asarray([rr.labels[c] for c in case_ids], dtype=object)
        is3 = all(v in CLASS_NAMES for v in labs)
        score = None if rr.scores is None else np.asarray([rr.scores[c] for c in case_ids], dtype=np.float64)
        readers.append(_Rater(name, "reader", labs == POSITIVE_CLASS, labs if is3 else None, score, "score"))
        reads.append(rr)
    return readers, reads


def _majority_vote_rater(readers: Sequence[_Rater]) -> _Rater:
    """The readers' majority vote as one more rater.

    It votes on 3-class labels when every reader gave them, else on covid / noncovid; its ROC score is the (N,)
    fraction of readers calling COVID-19.
    """
    all3 = all(r.labels3 is not None for r in readers)
    votes = majority_vote(
        np.stack([r.labels3 if all3 else np.where(r.call, "covid", "noncovid") for r in readers], axis=1)
    )
    return _Rater(
        "Majority vote",
        "majority vote",
        votes == POSITIVE_CLASS,
        votes if all3 else None,
        np.mean([r.call for r in readers], axis=0),
        "vote fraction",
    )


def _metrics_payload(
    cfg: ReaderStudyConfig,
    truth_csv: Path,
    truth_arr: np.ndarray,
    model_csv: Path,
    model_pred: Predictions,
    reads: Sequence[ReaderReads],
    rows: Sequence[Mapping[str, Any]],
    tests: Sequence[Mapping[str, Any]],
    agreement: Mapping[str, Any],
) -> dict[str, Any]:
    """The content of ``metrics.json``: the inputs with their sha256, the config, the decision rule, the methods and
    the results (JSON-plain).

    Args:
        cfg: options.
        truth_csv: the truth's path.
        truth_arr: (N,) the true labels in case order.
        model_csv: the model predictions' path.
        model_pred: the model predictions as read.
        reads: every reader's reads.
        rows: the table rows (one per rater).
        tests: the paired tests.
        agreement: the inter-reader agreement.
    """
    class_counts = ", ".join(f"{n} {c}" for c, n in Counter(truth_arr.tolist()).items())
    return {
        "schema": "covidctnet-reader-study/1",
        "inputs": {
            "truth": str(truth_csv),
            "truth_sha256": sha256_file(truth_csv),
            "n_cases": len(truth_arr),
            "class_counts": class_counts,
            "model": str(model_csv),
            "model_kind": "report.csv, 3-class" if model_pred.kind == "3class" else "preds.csv, 2-class",
            "model_sha256": sha256_file(model_csv),
            "readers": [
                {
                    "name": rr.name,
                    "path": str(rr.path),
                    "sha256": sha256_file(rr.path),
                    "has_scores": rr.scores is not None,
                }
                for rr in reads
            ],
        },
        "config": config_to_dict(cfg),
        "decision_rule": decision_rule(model_pred.kind, cfg.threshold, brief=True),
        "methods": {
            "proportions": "Wilson score interval",
            "reader_average": f"stratified case bootstrap (percentile, {cfg.n_bootstrap} resamples, seed {cfg.seed})",
            "auc": "DeLong variance, normal interval clipped to [0, 1]",
            "level": f"{100 * cfg.ci_level:g}%",
            "majority_vote_ties": "covid > cap > control",
        },
        "table": to_jsonable(rows),
        "paired_tests": to_jsonable(tests),
        "agreement": to_jsonable(agreement),
        "files": sorted(
            ["table.csv", "tests.csv", "agreement.csv", "metrics.json", "report.md", "roc.png", "config.yaml"]
        ),
    }


def _write_study(
    out_dir: Path,
    cfg: ReaderStudyConfig,
    payload: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    tests: Sequence[Mapping[str, Any]],
    agreement: Mapping[str, Any],
    y: np.ndarray,
    roc_scores: Mapping[str, tuple[np.ndarray, str]],
) -> None:
    """Write the study folder, each file atomically: ``table.csv``, ``tests.csv``, ``agreement.csv``, ``roc.png``,
    ``config.yaml``, ``metrics.json`` and ``report.md``.

    Args:
        out_dir: the folder (created if missing).
        cfg: options (saved as ``config.yaml``).
        payload: the content of ``metrics.json``.
        rows: the table rows (one per rater).
        tests: the paired tests.
        agreement: the inter-reader agreement.
        y: (N,) bool truth, COVID-19 vs non-COVID (for the ROC plot).
        roc_scores: rater name → ((N,) score, its description) of the model and the readers who gave scores: the
            ROC plot's curves.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    write_reader_study_tables(out_dir, rows, tests, agreement["pairwise"])
    plot_reader_study_roc(out_dir / "roc.png", y, rows, roc_scores)
    save_config(cfg, out_dir / "config.yaml")
    atomic_write_text(out_dir / "metrics.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out_dir / "report.md", render_reader_study_report(payload, rows, tests, cfg.ci_level))


def _unique_names(stems: Sequence[str]) -> list[str]:
    counts = Counter(stems)
    seen: Counter[str] = Counter()
    out = []
    for s in stems:
        seen[s] += 1
        out.append(f"{s} ({seen[s]})" if counts[s] > 1 else s)
    return out
