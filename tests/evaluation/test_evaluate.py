"""Tests of covidctnet.evaluation.evaluate and of the readers it uses (covidctnet.evaluation.inputs): reading predict /
predict-slice CSVs, metrics by hand and against scikit-learn."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from covidctnet.core.config import load_config
from covidctnet.core.errors import ConfigError, InputError, LabelError
from covidctnet.core.labels import normalize_any_label, normalize_binary_label
from covidctnet.evaluation.evaluate import EvaluateConfig, compute_metrics, evaluate
from covidctnet.evaluation.inputs import match_case_ids, read_predictions, read_truth

REPO = Path(__file__).resolve().parents[2]
REPORT_HEADER = ["study_id", "p_control", "p_covid", "p_cap", "predicted", "status", "error", "model", "weights_sha256"]
CLASSES = ("control", "covid", "cap")
FAST = EvaluateConfig(n_bootstrap=200)


def write_report(path: Path, rows: list[tuple[str, float, float, float]], errors: tuple[str, ...] = ()) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(REPORT_HEADER)
        for sid, *p in rows:
            w.writerow([sid, *p, CLASSES[int(np.argmax(p))], "ok", "", "test-model", "0" * 64])
        for sid in errors:
            w.writerow([sid, "", "", "", "", "error", "NotCTError: modality MR", "test-model", "0" * 64])
    return path


def write_labels(path: Path, labels: dict[str, str], id_column: str = "study_id") -> Path:
    path.write_text(f"{id_column},label\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
    return path


# the hand-computed case: 6 studies, see test_hand_computed_case for the arithmetic
HAND_ROWS = [
    ("a", 0.7, 0.2, 0.1),  # control -> control
    ("b", 0.3, 0.6, 0.1),  # control -> covid
    ("c", 0.1, 0.8, 0.1),  # covid -> covid
    ("d", 0.2, 0.3, 0.5),  # covid -> cap
    ("e", 0.1, 0.2, 0.7),  # cap -> cap
    ("f", 0.2, 0.1, 0.7),  # cap -> cap
]
HAND_TRUTH = {"a": "control", "b": "normal", "c": "COVID-19", "d": "covid", "e": "cap", "f": "CAP"}


@pytest.fixture()
def hand_case(tmp_path):
    return write_report(tmp_path / "report.csv", HAND_ROWS), write_labels(tmp_path / "labels.csv", HAND_TRUTH)


def _metrics(pred_path, labels_path, cfg=FAST):
    pred = read_predictions(pred_path)
    truth = read_truth(labels_path)
    keys = match_case_ids(pred.all_ids, truth, pred_path, labels_path, allow_file_names=pred.id_column == "file")
    return compute_metrics(pred, keys[: len(pred.ids)], truth, cfg)


def _v(est) -> float | None:
    return est.value


def test_hand_computed_case(hand_case):
    m = _metrics(*hand_case)
    two = m["two_class"]
    # argmax calls COVID-19 on b and c; truth COVID-19 is c and d: TP c, FN d, FP b, TN a e f
    assert two["confusion_matrix"]["matrix"] == [[3, 1], [1, 1]]
    mt = two["metrics"]
    assert (_v(mt["accuracy"]), _v(mt["sensitivity"]), _v(mt["specificity"])) == (4 / 6, 1 / 2, 3 / 4)
    assert (_v(mt["precision"]), _v(mt["npv"]), _v(mt["f1"])) == (1 / 2, 3 / 4, 2 / (2 + 1 + 1))
    # p_covid: c (0.8) beats all four negatives, d (0.3) beats a, e, f (0.2, 0.2, 0.1) but not b (0.6): AUC 7/8
    assert _v(mt["auc"]) == pytest.approx(7 / 8)
    assert mt["accuracy"].method == "Wilson score" and mt["auc"].method == "DeLong"

    three = m["three_class"]
    assert three["confusion_matrix"]["matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert _v(three["accuracy"]) == 4 / 6
    pc = three["per_class"]
    # one vs rest: control TP1 FN1 FP0 TN4; covid TP1 FN1 FP1 TN3; cap TP2 FN0 FP1 TN3
    assert [_v(pc[c]["sensitivity"]) for c in CLASSES] == [0.5, 0.5, 1.0]
    assert [_v(pc[c]["specificity"]) for c in CLASSES] == [1.0, 0.75, 0.75]
    assert [_v(pc[c]["precision"]) for c in CLASSES] == pytest.approx([1.0, 0.5, 2 / 3])
    assert [_v(pc[c]["f1"]) for c in CLASSES] == pytest.approx([2 / 3, 0.5, 0.8])
    # control: a (0.7) and b (0.3) above every other p_control (<= 0.2): AUC 1; cap likewise (0.7, 0.7 vs <= 0.5)
    assert [_v(pc[c]["auc"]) for c in CLASSES] == pytest.approx([1.0, 7 / 8, 1.0])
    macro = three["macro"]
    assert _v(macro["sensitivity"]) == pytest.approx(2 / 3)
    assert _v(macro["f1"]) == pytest.approx((2 / 3 + 0.5 + 0.8) / 3)
    assert _v(macro["auc"]) == pytest.approx((1 + 7 / 8 + 1) / 3)


def test_threshold_changes_only_the_two_class_decision(hand_case):
    m = _metrics(*hand_case, cfg=EvaluateConfig(threshold=0.25, n_bootstrap=200))
    # p_covid >= 0.25: b, c, d -> TP c d, FP b, TN a e f
    assert m["two_class"]["confusion_matrix"]["matrix"] == [[3, 1], [0, 2]]
    assert _v(m["two_class"]["metrics"]["sensitivity"]) == 1.0
    assert m["three_class"]["confusion_matrix"]["matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]  # still argmax
    assert "0.25" in m["decision_rule"]


def test_metrics_match_sklearn_on_random_predictions(tmp_path):
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    rng = np.random.default_rng(3)
    n = 90
    truth = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), truth] += 1.2
    probs = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 6)
    ids = [f"s{i:03d}" for i in range(n)]
    pred_path = write_report(tmp_path / "r.csv", [(i, *p) for i, p in zip(ids, probs)])
    labels_path = write_labels(tmp_path / "l.csv", {i: CLASSES[t] for i, t in zip(ids, truth)})
    m = _metrics(pred_path, labels_path)
    pred = probs.argmax(1)
    y, call = truth == 1, pred == 1
    mt = m["two_class"]["metrics"]
    assert _v(mt["accuracy"]) == pytest.approx(accuracy_score(y, call), abs=1e-12)
    assert _v(mt["sensitivity"]) == pytest.approx(recall_score(y, call), abs=1e-12)
    assert _v(mt["specificity"]) == pytest.approx(recall_score(~y, ~call), abs=1e-12)
    assert _v(mt["precision"]) == pytest.approx(precision_score(y, call), abs=1e-12)
    assert _v(mt["f1"]) == pytest.approx(f1_score(y, call), abs=1e-12)
    assert _v(mt["auc"]) == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-12)
    three = m["three_class"]
    assert three["confusion_matrix"]["matrix"] == confusion_matrix(truth, pred, labels=[0, 1, 2]).tolist()
    assert _v(three["accuracy"]) == pytest.approx(accuracy_score(truth, pred), abs=1e-12)
    for j, c in enumerate(CLASSES):
        assert _v(three["per_class"][c]["sensitivity"]) == pytest.approx(
            recall_score(truth, pred, labels=[j], average="macro")
        )
        assert _v(three["per_class"][c]["f1"]) == pytest.approx(f1_score(truth, pred, labels=[j], average="macro"))
    assert _v(three["macro"]["f1"]) == pytest.approx(f1_score(truth, pred, average="macro"), abs=1e-12)
    assert _v(three["macro"]["precision"]) == pytest.approx(precision_score(truth, pred, average="macro"), abs=1e-12)
    assert _v(three["macro"]["auc"]) == pytest.approx(
        roc_auc_score(truth, probs / probs.sum(1, keepdims=True), multi_class="ovr", average="macro"), abs=1e-9
    )
    # every interval brackets its estimate
    for est in [*mt.values(), three["accuracy"], *three["macro"].values()]:
        assert est.ci_low <= est.value <= est.ci_high


def test_error_rows_are_excluded_and_counted(tmp_path):
    pred_path = write_report(tmp_path / "r.csv", HAND_ROWS, errors=("g", "h"))
    labels = dict(HAND_TRUTH, g="covid", h="cap")
    pred = read_predictions(pred_path)
    assert pred.ids == tuple("abcdef") and pred.excluded == {"g": "error", "h": "error"} and pred.n_rows == 8
    result = evaluate(pred_path, write_labels(tmp_path / "l.csv", labels), tmp_path / "out", FAST)
    assert result["inputs"]["n_evaluated"] == 6
    assert result["inputs"]["excluded"] == {"g": "error", "h": "error"}
    assert result["two_class"]["n"] == 6
    assert "Excluded: **2** row(s) with status error (2)" in (tmp_path / "out" / "report.md").read_text()


def test_slice_predictions_matched_by_file_name(tmp_path):
    # preds.csv from predict-slice names files; UCSD-style labels name them without folder (or without extension)
    rows = [("imgs/p1.png", 0.9), ("imgs/p2.png", 0.2), ("imgs/n1.jpg", 0.4), ("imgs/n2.jpg", 0.7)]
    (tmp_path / "preds.csv").write_text(
        "file,p_covid,predicted\n" + "".join(f"{f},{p},{'covid' if p > 0.5 else 'noncovid'}\n" for f, p in rows)
    )
    labels = write_labels(tmp_path / "l.csv", {"p1": "CT_COVID", "p2": "covid", "n1": "CT_NonCOVID", "n2": "noncovid"})
    result = evaluate(tmp_path / "preds.csv", labels, tmp_path / "out", FAST)
    assert result["three_class"] is None and "2-class" in result["three_class_skipped"]
    assert result["two_class"]["confusion_matrix"]["matrix"] == [[1, 1], [1, 1]]
    assert result["two_class"]["metrics"]["auc"]["value"] == pytest.approx(0.5)  # p1 beats both, p2 neither
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.yaml", "confusion_2class.png", "metrics.json", "report.html", "report.md", "roc_2class.png",
    ]  # fmt: skip


def test_same_file_name_in_two_folders_is_ambiguous(tmp_path):
    (tmp_path / "preds.csv").write_text("file,p_covid,predicted\nx/a.png,0.9,covid\ny/a.png,0.1,noncovid\n")
    labels = write_labels(tmp_path / "l.csv", {"a.png": "covid"})
    with pytest.raises(LabelError, match="several rows name the same case.*'x/a.png' and 'y/a.png' both match"):
        evaluate(tmp_path / "preds.csv", labels, tmp_path / "out", FAST)
    assert not (tmp_path / "out").exists()


SLICE_HEADER = "file,p_covid,predicted,status,error,model,weights_sha256,threshold\n"
DOTTED = ["2020.02.22.20024927-p17-73%1.png", "2020.03.01.20029769-p21-73_1.png", "12.png", "2020.02.10-p5.jpg"]


def _slice_preds(path: Path, root: str, threshold: str = "0.6", ps=(0.9, 0.55, 0.3, 0.65)) -> Path:
    # as predict-slice writes it: absolute paths, one model and threshold on every row
    folders = ("CT_COVID", "CT_COVID", "CT_NonCOVID", "CT_NonCOVID")
    path.write_text(SLICE_HEADER + "".join(
        f"{root}/{d}/{n},{p},{'covid' if p >= float(threshold) else 'noncovid'},ok,,m,{'a' * 64},{threshold}\n"
        for d, n, p in zip(folders, DOTTED, ps)))
    return path


@pytest.mark.parametrize("ids", [
    ["CT_COVID/" + DOTTED[0], "CT_COVID/" + DOTTED[1], "CT_NonCOVID/" + DOTTED[2], "CT_NonCOVID/" + DOTTED[3]],
    ["ucsd/CT_COVID/" + DOTTED[0], "ucsd/CT_COVID/" + DOTTED[1], "ucsd/CT_NonCOVID/12.png", "ucsd/CT_NonCOVID/"
     + DOTTED[3]],
    DOTTED,
    [n.rsplit(".", 1)[0] for n in DOTTED],  # names without extension, dots kept
], ids=["relative-path", "other-root", "file-name", "no-extension"])
def test_ucsd_file_label_csv_matched_as_written(tmp_path, ids):
    preds = _slice_preds(tmp_path / "preds.csv", "/data/covid-ct-2d")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n" + "".join(f"{i},{lab}\n" for i, lab in zip(ids, (1, 1, 0, 0))))
    result = evaluate(preds, labels, tmp_path / "out", FAST)
    assert result["threshold"] == 0.6 and "threshold column of preds.csv" in result["threshold_source"]
    # 0.9, 0.55 | 0.3, 0.65 at 0.6: TP 1, FN 1, TN 1, FP 1 (at the argmax 0.5 it would be TP 2, FP 1)
    assert result["two_class"]["confusion_matrix"]["matrix"] == [[1, 1], [1, 1]]
    assert result["inputs"]["model"] == "m" and result["inputs"]["weights_sha256"] == "a" * 64
    report = (tmp_path / "out" / "report.md").read_text()
    assert "p_covid >= 0.6 (the threshold column of preds.csv)" in report and "Model: `m`" in report


def test_given_threshold_overrides_the_files(tmp_path):
    preds = _slice_preds(tmp_path / "preds.csv", "/data")
    labels = write_labels(tmp_path / "l.csv", dict(zip(DOTTED, ("covid", "covid", "noncovid", "noncovid"))), "file")
    result = evaluate(preds, labels, tmp_path / "out", EvaluateConfig(n_bootstrap=200, threshold=0.5))
    assert result["threshold"] == 0.5 and "not the file's 0.6" in result["threshold_source"]
    assert result["two_class"]["confusion_matrix"]["matrix"] == [[1, 1], [0, 2]]


def test_file_matched_equally_by_two_labels_is_an_error_naming_both(tmp_path):
    (tmp_path / "preds.csv").write_text("file,p_covid\n/d/z/a.png,0.9\n")
    labels = write_labels(tmp_path / "l.csv", {"x/a.png": "covid", "y/a.png": "noncovid"}, "file")
    with pytest.raises(LabelError, match=r"'/d/z/a.png' matches both 'x/a.png' and 'y/a.png'"):
        evaluate(tmp_path / "preds.csv", labels, tmp_path / "out", FAST)
    # the longer shared path decides when there is one
    (tmp_path / "preds.csv").write_text("file,p_covid\n/d/x/a.png,0.9\n/d/y/a.png,0.2\n")
    keys = match_case_ids(["/d/x/a.png", "/d/y/a.png"], {"x/a.png": "covid", "y/a.png": "noncovid"}, "p", "l",
                          allow_file_names=True)
    assert keys == ["x/a.png", "y/a.png"]


@pytest.mark.parametrize("cells, match", [
    (("0.6", "0.5"), r"threshold differs between rows \('0.6' on row 2, '0.5' on row 3\)"),
    (("1.5", "1.5"), "threshold = 1.5 is outside"),
    (("high", "high"), "threshold = 'high' is not a number"),
], ids=["two-thresholds", "above-1", "not-a-number"])
def test_bad_threshold_column(tmp_path, cells, match):
    (tmp_path / "preds.csv").write_text("file,p_covid,threshold\na.png,0.9," + cells[0] + "\nb.png,0.2," + cells[1]
                                        + "\n")
    with pytest.raises(InputError, match=match):
        read_predictions(tmp_path / "preds.csv")


def test_evaluate_writes_the_report_folder(hand_case, tmp_path):
    out = tmp_path / "report"
    result = evaluate(*hand_case, out, FAST)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(result["files"]) == [
        "config.yaml", "confusion_2class.png", "confusion_3class.png", "metrics.json", "report.html", "report.md",
        "roc_2class.png", "roc_3class.png",
    ]  # fmt: skip
    assert json.loads((out / "metrics.json").read_text()) == result
    report = (out / "report.md").read_text()
    assert "Wilson score interval" in report and "DeLong" in report and "bootstrap" in report
    assert "| accuracy | 66.7% |" in report
    assert load_config(EvaluateConfig, out / "config.yaml") == FAST


@pytest.mark.parametrize(
    "rows, error, match",
    [
        ([("a", 0.7, 0.2, 0.1), ("a", 0.1, 0.8, 0.1)], InputError, "duplicated study_id 'a'"),
        ([("a", 1.2, -0.1, -0.1)], InputError, "outside"),
        ([("a", 0.5, 0.3, 0.1)], InputError, "expected 1"),
        ([("a", "x", 0.3, 0.1)], InputError, "not a number"),
        ([("a", "nan", 0.3, 0.1)], InputError, "not a finite number"),
    ],
)
def test_read_predictions_rejects_bad_rows(tmp_path, rows, error, match):
    path = tmp_path / "r.csv"
    path.write_text(",".join(REPORT_HEADER) + "\n" + "".join(f"{r[0]},{r[1]},{r[2]},{r[3]},,ok,,m,\n" for r in rows))
    with pytest.raises(error, match=match):
        read_predictions(path)


def test_sum_tolerance_is_configurable(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text(",".join(REPORT_HEADER) + "\na,0.5,0.3,0.1995,,ok,,m,\n")  # sums to 0.9995
    assert read_predictions(path).ids == ("a",)
    with pytest.raises(InputError, match="tolerance 0.0001"):
        read_predictions(path, prob_tolerance=1e-4)


def test_unknown_class_in_predicted_column(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text(",".join(REPORT_HEADER) + "\na,0.5,0.3,0.2,flu,ok,,m,\n")
    with pytest.raises(LabelError, match="unknown class 'flu'"):
        read_predictions(path)


def test_all_rows_failed(tmp_path):
    path = write_report(tmp_path / "r.csv", [], errors=("a", "b"))
    with pytest.raises(InputError, match="no usable rows: all 2 rows have status error"):
        read_predictions(path)


def test_truth_accepts_both_label_sets():
    assert normalize_any_label("CT_NonCOVID") == "noncovid"
    assert normalize_any_label("CT-3") == "covid"
    assert normalize_binary_label("pneumonia") == "noncovid"
    with pytest.raises(LabelError, match="unknown class"):
        normalize_any_label("flu")


def test_config_yaml_matches_dataclass_defaults():
    assert load_config(EvaluateConfig, REPO / "configs" / "evaluate.yaml") == EvaluateConfig()


@pytest.mark.parametrize(
    "overrides", [{"threshold": 1.5}, {"ci_level": 1.0}, {"auc_ci": "jackknife"}, {"n_bootstrap": 0}, {"bogus": 1}]
)
def test_config_rejects_bad_values(overrides):
    with pytest.raises(ConfigError):
        load_config(EvaluateConfig, None, overrides)
