"""Tests of covidctnet.evaluation.report_md: table cells of estimates and the parts of the reports that the
evaluate and reader-study tests do not reach."""

from __future__ import annotations

from covidctnet.evaluation.report_md import estimate_cell, format_estimate, render_evaluation_report
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
