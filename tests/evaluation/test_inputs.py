"""Tests of covidctnet.evaluation.inputs not covered through evaluate (tests/evaluation/test_evaluate.py) and
reader-study: the decision of a predictions file and its wording, the reader CSV's checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covidctnet.core.errors import ConfigError, InputError, LabelError
from covidctnet.evaluation.inputs import (
    Predictions,
    check_eval_settings,
    decide,
    decision_rule,
    effective_threshold,
    listed,
    read_csv_rows,
    read_reader_csv,
)


def _three_class(p_covid_threshold: float | None = None) -> Predictions:
    probs = np.array([[0.5, 0.3, 0.2], [0.2, 0.45, 0.35], [0.1, 0.2, 0.7]])
    return Predictions(Path("report.csv"), "3class", "study_id", ("a", "b", "c"), probs[:, 1].copy(), probs,
                       threshold=p_covid_threshold)


def test_decide_argmax_and_threshold():
    labels3, call = decide(_three_class())
    assert labels3.tolist() == ["control", "covid", "cap"] and call.tolist() == [False, True, False]
    _, call = decide(_three_class(), 0.25)
    assert call.tolist() == [True, True, False]  # 0.3 and 0.45 reach 0.25; the 3-class labels stay the argmax


def test_effective_threshold_prefers_the_given_one():
    assert effective_threshold(_three_class(0.4), None) == (0.4, "the threshold column of report.csv")
    value, source = effective_threshold(_three_class(0.4), 0.3)
    assert value == 0.3 and "not the file's 0.4" in source
    assert effective_threshold(_three_class(), None) == (None, "")


def test_decision_rule_wordings():
    assert decision_rule("3class", None).startswith("argmax of p_control, p_covid, p_cap")
    assert decision_rule("2class", None) == "COVID-19 when p_covid > 0.5 (argmax of the two classes)"
    assert decision_rule("3class", 0.3, "from --threshold") == (
        "COVID-19 when p_covid >= 0.3 (from --threshold) (2-class); argmax of the probabilities (3-class)")
    assert decision_rule("3class", 0.3, brief=True) == "COVID-19 when p_covid >= 0.3; 3-class argmax"
    assert decision_rule("3class", None, brief=True) == "argmax of the probabilities"
    assert decision_rule("2class", None, brief=True) == "COVID-19 when p_covid > 0.5"


def test_listed_shows_ten_sorted_ids():
    assert listed(["b", "a"]) == "['a', 'b']"
    assert listed([f"id{i:02d}" for i in range(12)]).endswith("'id09', …]")


def test_read_csv_rows_strips_and_skips_blank_lines(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("\ufeff a , b \n1, 2\n\n3\n", encoding="utf-8")
    header, rows = read_csv_rows(path, "test CSV")
    assert header == ["a", "b"] and rows == [(2, {"a": "1", "b": "2"}), (4, {"a": "3", "b": ""})]
    path.write_text("a,a\n1,2\n")
    with pytest.raises(InputError, match="duplicated column"):
        read_csv_rows(path, "test CSV")


@pytest.mark.parametrize("field, value", [("threshold", 1.5), ("ci_level", 0.4), ("n_bootstrap", 5), ("seed", -1),
                                          ("prob_tolerance", 0.0)])
def test_check_eval_settings_names_the_bad_field(field, value):
    settings = {"threshold": None, "ci_level": 0.95, "n_bootstrap": 100, "seed": 0, "prob_tolerance": 1e-3}
    settings[field] = value
    with pytest.raises(ConfigError, match=field):
        check_eval_settings(type("Cfg", (), settings)())


@pytest.mark.parametrize("text, error, message", [
    ("case_id,label,score\na,covid,4\nb,control,\n", InputError, "row 3: score '' is not a number"),
    ("case_id,label,score\na,covid,inf\n", InputError, "row 2: score 'inf' is not a finite number"),
    ("case_id,diagnosis\na,covid\n", InputError, r"missing column\(s\) \['label'\]"),
    ("case_id,label\na,covid\na,cap\n", LabelError, r"row 3: duplicated case_id 'a' \(first on row 2\)"),
    ("case_id,label\n,covid\n", LabelError, "row 2: empty case_id"),
])  # fmt: skip
def test_read_reader_csv_errors(tmp_path, text, error, message):
    path = tmp_path / "r.csv"
    path.write_text(text)
    with pytest.raises(error, match=message):
        read_reader_csv(path)


def test_read_reader_csv_accepts_study_id_and_label_aliases(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("study_id,label\na,COVID-19\nb,normal\n")
    reads = read_reader_csv(path, "R")
    assert reads.name == "R" and reads.labels == {"a": "covid", "b": "control"} and reads.scores is None
