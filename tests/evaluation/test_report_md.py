"""Tests of covidctnet.evaluation.report_md: table cells of estimates and the parts of the reports that the
evaluate and reader-study tests do not reach, and the reader study's CSV cells."""

from __future__ import annotations

import csv

import numpy as np

from covidctnet.evaluation.report_md import (
    estimate_cell,
    format_estimate,
    render_evaluation_report,
    write_reader_study_tables,
)
from covidctnet.evaluation.stats import Estimate, proportion, undefined_auc


def test_format_estimate_percent_and_decimals():
    est = proportion(3, 4)
    value, ci, frac = format_estimate(est)
    assert value == "75.0%" and frac == "3/4" and ci == f"{100 * est.ci_low:.1f}%–{100 * est.ci_high:.1f}%"
    auc = Estimate(0.8123, 0.7, 0.9, "DeLong", n=20)
    assert format_estimate(auc, percent=False) == ("0.812", "0.700–0.900", "")
    assert format_estimate(auc.to_dict(), percent=False) == format_estimate(auc, percent=False)  # metrics.json form


def test_undefined_estimates_are_n_a():
    assert format_estimate(undefined_auc(5, 0.95)) == ("n/a", "n/a", "")
    assert estimate_cell(undefined_auc(5, 0.95)) == "n/a" and estimate_cell(None) == "n/a"
    assert estimate_cell(Estimate(0.5, None, 0.6, "m"), percent=False) == "0.500 (n/a–0.600)"


def test_evaluation_report_without_three_class():
    two = {"n_positive": 1, "n_negative": 1,
           "metrics": {"accuracy": proportion(1, 2), "auc": undefined_auc(2, 0.9)},
           "confusion_matrix": {"labels": ["noncovid", "covid"], "matrix": [[1, 0], [1, 0]]}}
    result = {"decision_rule": "rule R", "two_class": two, "three_class": None, "three_class_skipped": "why W",
              "methods": {"level": "90%", "proportions": "Wilson", "auc": "DeLong", "f1_and_macro_averages": "boot"}}
    inputs = {"predictions": "p.csv", "predictions_kind": "preds.csv, 2-class", "predictions_sha256": "a" * 64,
              "labels": "l.csv", "labels_sha256": "b" * 64, "n_evaluated": 2, "n_rows": 3, "excluded": {"x": "error"}}
    text = render_evaluation_report(result, inputs, 0.9, {"confusion_2class": "c.png"})
    assert "- Decision rule: rule R" in text and "Not computed: why W." in text
    assert "| metric | value | 90% CI | k/n | CI method |" in text and "| AUC | n/a | n/a |  | undefined" in text
    assert "![confusion_2class](c.png)" in text and "roc_2class" not in text
    assert "- Excluded: **1** row(s) with status error (1): `x` (error)" in text


def test_reader_study_tables_cells(tmp_path):
    row = {"rater": "R1", "type": "reader", "n_cases": np.int64(4), "auc_source": "binary call",
           "accuracy_2class": proportion(3, 4), "accuracy_3class": None, "sensitivity": proportion(1, 3),
           "specificity": Estimate(1.0, None, None, "Wilson score"), "auc": undefined_auc(4, 0.95)}
    test = {"comparison": "model vs R1", "b_2class": 2, "p_2class": float("nan"), "auc_p": np.float64(0.125)}
    pair = {"reader_a": "R1", "reader_b": "R2", "cohen_kappa_3class": None, "agreement_2class": True}
    write_reader_study_tables(tmp_path, [row], [test], [pair])
    with open(tmp_path / "table.csv", newline="") as fh:
        table = next(csv.DictReader(fh))
    assert table["n_cases"] == "4" and table["accuracy_2class"] == "0.75" and table["accuracy_3class"] == ""
    assert table["sensitivity"] == format(1 / 3, ".12g") and table["specificity_ci_low"] == ""
    assert table["auc"] == "" and table["ci_method_auc"] == "undefined: only one class present"
    with open(tmp_path / "tests.csv", newline="") as fh:
        tests = next(csv.DictReader(fh))
    assert tests["b_2class"] == "2" and tests["c_2class"] == "" and tests["p_2class"] == ""
    assert tests["auc_p"] == "0.125"
    with open(tmp_path / "agreement.csv", newline="") as fh:
        agreement = next(csv.DictReader(fh))
    assert agreement["cohen_kappa_3class"] == "" and agreement["agreement_2class"] == "true"
