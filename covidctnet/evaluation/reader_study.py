"""``covidctnet reader-study``: the model against radiologists on the same cases, as in the CovidCTNet paper.

Javaheri et al. (npj Digit. Med. 4:29, 2021) compared CovidCTNet with four radiologists on 20 cases and reported, per
reader, for the reader average and for the model: accuracy (COVID-19 vs non-COVID and 3-class), sensitivity,
specificity and AUC. This module builds that table with confidence intervals and adds what a paper needs next to it:

* paired tests of the model against each reader, the majority vote and the average reader: exact McNemar on
  correctness (2-class and 3-class) and DeLong's test of the AUCs where the reader gave confidence scores;
* inter-reader agreement: Cohen's kappa for every pair of readers and Fleiss' kappa over all of them;
* a ROC plot of the model with each reader's operating point.

What is computed on the readers, their majority vote and the model is in :mod:`covidctnet.evaluation.raters`; this
module reads the files into raters and writes the study folder.

Inputs (see ``docs/evaluation.md``): the model's ``report.csv`` (or ``preds.csv``), one CSV per reader
(``case_id,label[,score]``; ``score`` = the reader's confidence that the case is COVID-19, higher = more likely, any
scale) and the truth (``case_id,label``). Every file must hold exactly the truth's cases. Outputs go to one folder:
``table.csv``, ``tests.csv``, ``agreement.csv``, ``metrics.json``, ``report.md``, ``roc.png`` and ``config.yaml``,
written only after every check passed, each atomically.
"""

from __future__ import annotations

import json
import logging
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
from covidctnet.evaluation.raters import (
    Rater,
    majority_vote_rater,
    paired_tests,
    rater_metrics,
    reader_agreement,
    reader_average,
    reader_average_method,
)
from covidctnet.evaluation.report_md import render_reader_study_report, write_reader_study_tables
from covidctnet.evaluation.stats import roc_points

__all__ = ["ReaderStudyConfig", "run_reader_study"]

logger = logging.getLogger(__name__)


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

    vote = majority_vote_rater(readers)
    strata = truth_arr.astype(str)
    rows = [rater_metrics(r, y, truth3, cfg.ci_level) for r in readers]
    rows.append(reader_average(readers, y, truth3, strata, cfg.ci_level, cfg.n_bootstrap, cfg.seed))
    rows.append(rater_metrics(vote, y, truth3, cfg.ci_level))
    rows.append(rater_metrics(model, y, truth3, cfg.ci_level))
    tests = paired_tests(model, [*readers, vote], readers, y, truth3)
    agreement = reader_agreement(readers)

    payload = _metrics_payload(cfg, truth_csv, truth_arr, model_csv, model_pred, reads, rows, tests, agreement)
    roc_scores = {r.name: (r.score, r.score_name) for r in (model, *readers) if r.score is not None}
    _write_study(out_dir, cfg, payload, rows, tests, agreement, y, roc_scores)
    logger.info("reader study: %d cases, %d readers; results in %s", len(case_ids), len(readers), out_dir)
    return payload


def _model_rater(
    model_csv: Path, truth: Mapping[str, str], truth_csv: Path, cfg: ReaderStudyConfig
) -> tuple[Rater, Predictions]:
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
    model = Rater(
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
) -> tuple[list[Rater], list[ReaderReads]]:
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
    readers: list[Rater] = []
    reads: list[ReaderReads] = []
    for path, name in zip(reader_paths, names):
        rr = read_reader_csv(path, name)
        match_case_ids(list(rr.labels), truth, path, truth_csv, what=f"reader CSV of {name!r}")
        labs = np.asarray([rr.labels[c] for c in case_ids], dtype=object)
        is3 = all(v in CLASS_NAMES for v in labs)
        score = None if rr.scores is None else np.asarray([rr.scores[c] for c in case_ids], dtype=np.float64)
        readers.append(Rater(name, "reader", labs == POSITIVE_CLASS, labs if is3 else None, score, "score"))
        reads.append(rr)
    return readers, reads


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
            "reader_average": reader_average_method(cfg.n_bootstrap, cfg.seed),
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
    rocs = {}
    if 0 < y.sum() < y.size:  # with one class there is no curve, only the rates that exist
        rocs = {name: (*roc_points(y, score)[:2], what) for name, (score, what) in roc_scores.items()}
    plot_reader_study_roc(out_dir / "roc.png", rows, rocs)
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
