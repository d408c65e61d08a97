"""Tests of covidctnet.evaluation.reader_study: a study with known answers computed independently, the example and its
notebook."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import binomtest, norm
from sklearn.metrics import roc_auc_score
from statsmodels.stats.proportion import proportion_confint

from covidctnet.cli import cli
from covidctnet.core.config import load_config
from covidctnet.core.errors import InputError
from covidctnet.evaluation.reader_study import ReaderStudyConfig, run_reader_study

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "reader_study"
CLASSES = ("control", "covid", "cap")
REPORT_HEADER = ["study_id", "p_control", "p_covid", "p_cap", "predicted", "status", "error", "model", "weights_sha256"]


# ----------------------------------------------------------------------------------------------------------------------
# building a study


def make_study(tmp: Path, seed: int = 0, n: int = 40, scored: tuple[bool, ...] = (True, True, False, False)) -> dict:
    """Random but seeded study: truth, model report.csv, one CSV per reader (``scored[r]``: has a score column)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, n)
    ids = [f"case{i:02d}" for i in range(n)]
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), truth] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    with open(tmp / "model.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(REPORT_HEADER)
        for cid, p in zip(ids, probs):
            w.writerow([cid, *(repr(float(x)) for x in p), CLASSES[int(p.argmax())], "ok", "", "m", ""])
    (tmp / "truth.csv").write_text("case_id,label\n" + "".join(f"{c},{CLASSES[t]}\n" for c, t in zip(ids, truth)))
    readers, scores = [], []
    for r, has_score in enumerate(scored):
        right = rng.random(n) < 0.7 + 0.05 * r
        labels = np.where(right, truth, rng.integers(0, 3, n))
        score = np.clip(np.round(2.5 + 1.5 * (labels == 1) + 0.6 * (truth == 1) + rng.normal(0, 0.8, n)), 1, 5)
        path = tmp / f"reader{r + 1}.csv"
        header = "case_id,label" + (",score" if has_score else "")
        lines = [f"{c},{CLASSES[lab]}" + (f",{int(s)}" if has_score else "") for c, lab, s in zip(ids, labels, score)]
        path.write_text(header + "\n" + "\n".join(lines[::-1]) + "\n")  # reversed order: rows are matched by id
        readers.append(np.array([CLASSES[lab] for lab in labels], dtype=object))
        scores.append(score if has_score else None)
    (tmp / "fast.yaml").write_text("n_bootstrap: 200\n")
    truth_names = np.array([CLASSES[t] for t in truth], dtype=object)
    return {"truth": truth_names, "probs": probs, "readers": readers, "scores": scores, "tmp": tmp}


# independent reference computations ---------------------------------------------------------------------------------


def naive_delong_p(y: np.ndarray, scores: list[np.ndarray], contrast: list[float]) -> float:
    """Two-sided DeLong p-value from the O(n1 n0) pairwise kernel (DeLong et al. 1988)."""
    y = y.astype(bool)
    v10, v01, aucs = [], [], []
    for s in scores:
        psi = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
        v10.append(psi.mean(1))
        v01.append(psi.mean(0))
        aucs.append(psi.mean())
    cov = np.cov(np.array(v10)) / y.sum() + np.cov(np.array(v01)) / (~y).sum()
    c = np.array(contrast)
    z = c @ np.array(aucs) / math.sqrt(c @ cov @ c)
    return 2 * norm.sf(abs(z))


def kappa_by_hand(a, b) -> float:
    a, b = list(a), list(b)
    po = np.mean([x == y for x, y in zip(a, b)])
    pe = sum(a.count(c) / len(a) * b.count(c) / len(b) for c in set(a) | set(b))
    return (po - pe) / (1 - pe)


def fleiss_by_hand(ratings: np.ndarray) -> float:
    cats = sorted(set(ratings.ravel()))
    counts = np.array([[np.sum(row == c) for c in cats] for row in ratings], dtype=float)
    r = ratings.shape[1]
    p_i = (np.sum(counts**2, 1) - r) / (r * (r - 1))
    p_j = counts.sum(0) / counts.sum()
    return (p_i.mean() - np.sum(p_j**2)) / (1 - np.sum(p_j**2))


def sign_flip_by_polynomial(d: np.ndarray) -> float:
    """Exact sign-flip p-value by multiplying the generating polynomials (x^-v + x^v) / 2."""
    dist = np.array([1.0])
    for v in np.abs(d[d != 0]).astype(int):
        term = np.zeros(2 * v + 1)
        term[0] = term[-1] = 0.5
        dist = np.convolve(dist, term)
    half = (dist.size - 1) // 2
    values = np.arange(-half, half + 1)
    return float(dist[np.abs(values) >= abs(d.sum())].sum())


def read_csv_dicts(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def num(x: str) -> float | None:
    return None if x == "" else float(x)


# ----------------------------------------------------------------------------------------------------------------------
# the known-answer study, through the CLI


@pytest.fixture(scope="module")
def known_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    study = make_study(tmp)
    readers = [str(tmp / f"reader{r}.csv") for r in (1, 2, 3, 4)]
    result = CliRunner().invoke(
        cli,
        ["reader-study", "--model", str(tmp / "model.csv"), "--readers", *readers, "--truth", str(tmp / "truth.csv"),
         "-o", str(tmp / "out"), "--config", str(tmp / "fast.yaml")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    study["out"] = tmp / "out"
    study["stdout"] = result.stdout
    return study


def _expected_rows(study: dict) -> dict[str, dict[str, float]]:
    truth = study["truth"]
    y = truth == "covid"
    raters = {f"reader{r + 1}": (labels, study["scores"][r]) for r, labels in enumerate(study["readers"])}
    model_labels = np.array([CLASSES[i] for i in study["probs"].argmax(1)], dtype=object)
    # majority vote, written out independently: most votes, ties to covid, then cap, then control
    votes = []
    for row in np.stack(study["readers"], axis=1):
        counts = Counter(row)
        best = max(counts.values())
        votes.append(next(c for c in ("covid", "cap", "control") if counts.get(c) == best))
    vote_fraction = np.mean([labels == "covid" for labels in study["readers"]], axis=0)
    raters["Majority vote"] = (np.array(votes, dtype=object), vote_fraction)
    raters["Model"] = (model_labels, study["probs"][:, 1])
    expected = {}
    for name, (labels, score) in raters.items():
        call = labels == "covid"
        auc_input = score if score is not None else call.astype(float)
        expected[name] = {
            "accuracy_2class": np.mean(call == y),
            "accuracy_3class": np.mean(labels == truth),
            "sensitivity": np.mean(call[y]),
            "specificity": np.mean(~call[~y]),
            "auc": roc_auc_score(y, auc_input),
        }
    readers = [expected[f"reader{r}"] for r in (1, 2, 3, 4)]
    expected["Reader average"] = {k: np.mean([r[k] for r in readers]) for k in readers[0]}
    return expected


def test_table_matches_independent_computation(known_study):
    rows = {r["rater"]: r for r in read_csv_dicts(known_study["out"] / "table.csv")}
    assert list(rows) == ["reader1", "reader2", "reader3", "reader4", "Reader average", "Majority vote", "Model"]
    expected = _expected_rows(known_study)
    y = known_study["truth"] == "covid"
    n, n_pos = y.size, int(y.sum())
    for name, exp in expected.items():
        for key, value in exp.items():
            assert float(rows[name][key]) == pytest.approx(value, abs=1e-6), (name, key)
        if name != "Reader average":  # single raters: Wilson intervals
            for key, denom in (("accuracy_2class", n), ("accuracy_3class", n), ("sensitivity", n_pos)):
                k = round(exp[key] * denom)
                low, high = proportion_confint(k, denom, alpha=0.05, method="wilson")
                assert float(rows[name][f"{key}_ci_low"]) == pytest.approx(low, abs=1e-6)
                assert float(rows[name][f"{key}_ci_high"]) == pytest.approx(high, abs=1e-6)
    assert [rows[f"reader{r}"]["auc_source"] for r in (1, 2, 3, 4)] == ["score", "score", "binary call", "binary call"]
    assert "Reader average" in known_study["stdout"]


def test_paired_tests_match_scipy_and_naive_delong(known_study):
    tests = {t["other"]: t for t in read_csv_dicts(known_study["out"] / "tests.csv")}
    truth = known_study["truth"]
    y = truth == "covid"
    model = np.array([CLASSES[i] for i in known_study["probs"].argmax(1)], dtype=object)
    m2, m3 = (model == "covid") == y, model == truth
    for r, labels in enumerate(known_study["readers"]):
        t = tests[f"reader{r + 1}"]
        for suffix, mc, oc in (("2class", m2, (labels == "covid") == y), ("3class", m3, labels == truth)):
            b, c = int(np.sum(mc & ~oc)), int(np.sum(~mc & oc))
            assert (int(t[f"b_{suffix}"]), int(t[f"c_{suffix}"])) == (b, c)
            assert float(t[f"p_{suffix}"]) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, abs=1e-6)
        score = known_study["scores"][r]
        if score is None:
            assert t["auc_p"] == "" and t["auc_test"].startswith("n/a")
        else:
            p = naive_delong_p(y, [known_study["probs"][:, 1], score], [1, -1])
            assert float(t["auc_p"]) == pytest.approx(p, abs=1e-4)
    # average reader: exact sign-flip test on R * model correct - readers correct
    avg = tests["Reader average"]
    readers = known_study["readers"]
    d2 = 4 * m2.astype(int) - np.sum([(lab == "covid") == y for lab in readers], axis=0)
    d3 = 4 * m3.astype(int) - np.sum([lab == truth for lab in readers], axis=0)
    assert float(avg["p_2class"]) == pytest.approx(sign_flip_by_polynomial(d2), abs=1e-6)
    assert float(avg["p_3class"]) == pytest.approx(sign_flip_by_polynomial(d3), abs=1e-6)
    assert avg["auc_p"] == ""  # readers 3 and 4 gave no scores


def test_kappas_match_hand_formulas(known_study):
    readers = known_study["readers"]
    pairs = read_csv_dicts(known_study["out"] / "agreement.csv")
    assert len(pairs) == 6
    for row in pairs:
        a, b = readers[int(row["reader_a"][-1]) - 1], readers[int(row["reader_b"][-1]) - 1]
        assert float(row["cohen_kappa_3class"]) == pytest.approx(kappa_by_hand(a, b), abs=1e-6)
        assert float(row["cohen_kappa_2class"]) == pytest.approx(kappa_by_hand(a == "covid", b == "covid"), abs=1e-6)
    import json

    agreement = json.loads((known_study["out"] / "metrics.json").read_text())["agreement"]
    ratings = np.stack(readers, axis=1)
    assert agreement["fleiss_kappa_3class"] == pytest.approx(fleiss_by_hand(ratings), abs=1e-6)
    assert agreement["fleiss_kappa_2class"] == pytest.approx(fleiss_by_hand(ratings == "covid"), abs=1e-6)


def test_outputs_and_report(known_study):
    out = known_study["out"]
    assert sorted(p.name for p in out.iterdir()) == [
        "agreement.csv", "config.yaml", "metrics.json", "report.md", "roc.png", "table.csv", "tests.csv",
    ]  # fmt: skip
    report = (out / "report.md").read_text()
    for text in ("Accuracy (COVID-19 vs non-COVID)", "exact McNemar", "Fleiss' kappa", "Wilson", "DeLong", "roc.png"):
        assert text in report
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_average_reader_delong_contrast_when_all_readers_score(tmp_path):
    study = make_study(tmp_path, seed=4, n=36, scored=(True, True, True))
    result = run_reader_study(
        tmp_path / "model.csv", [tmp_path / f"reader{r}.csv" for r in (1, 2, 3)], tmp_path / "truth.csv",
        tmp_path / "out", ReaderStudyConfig(n_bootstrap=100),
    )  # fmt: skip
    avg = next(t for t in result["paired_tests"] if t["other"] == "Reader average")
    y = study["truth"] == "covid"
    expected = naive_delong_p(y, [study["probs"][:, 1], *study["scores"]], [1, -1 / 3, -1 / 3, -1 / 3])
    assert avg["auc_p"] == pytest.approx(expected, abs=1e-4)
    row = next(r for r in result["table"] if r["rater"] == "Reader average")
    assert row["auc"]["value"] == pytest.approx(np.mean([roc_auc_score(y, s) for s in study["scores"]]), abs=1e-9)


def test_single_reader_average_equals_mcnemar(tmp_path):
    make_study(tmp_path, seed=2, scored=(False,))
    result = run_reader_study(
        tmp_path / "model.csv", [tmp_path / "reader1.csv"], tmp_path / "truth.csv", tmp_path / "out",
        ReaderStudyConfig(n_bootstrap=50),
    )  # fmt: skip
    tests = {t["other"]: t for t in result["paired_tests"]}
    assert tests["Reader average"]["p_2class"] == pytest.approx(tests["reader1"]["p_2class"], abs=1e-12)
    assert tests["Reader average"]["p_3class"] == pytest.approx(tests["reader1"]["p_3class"], abs=1e-12)
    assert result["agreement"]["fleiss_kappa_3class"] is None  # one reader: no agreement to measure


def test_two_class_model_and_binary_reader(tmp_path):
    (tmp_path / "truth.csv").write_text("case_id,label\na,covid\nb,control\nc,cap\nd,covid\n")
    (tmp_path / "preds.csv").write_text(
        "file,p_covid,predicted\na.png,0.9,covid\nb.png,0.2,noncovid\nc.png,0.6,covid\nd.png,0.4,noncovid\n"
    )
    (tmp_path / "r1.csv").write_text("case_id,label\na,covid\nb,noncovid\nc,noncovid\nd,noncovid\n")
    (tmp_path / "r2.csv").write_text("case_id,label\na,covid\nb,control\nc,covid\nd,covid\n")
    result = run_reader_study(
        tmp_path / "preds.csv", [tmp_path / "r1.csv", tmp_path / "r2.csv"], tmp_path / "truth.csv", tmp_path / "out",
        ReaderStudyConfig(n_bootstrap=50),
    )  # fmt: skip
    rows = {r["rater"]: r for r in result["table"]}
    assert rows["Model"]["accuracy_3class"] is None and rows["r1"]["accuracy_3class"] is None
    assert rows["r2"]["accuracy_3class"]["value"] == 0.75  # a, b, d right; c called covid, truth cap
    assert rows["Model"]["accuracy_2class"]["value"] == 0.5  # a, b right; c false positive, d missed
    assert rows["r1"]["sensitivity"]["value"] == 0.5 and rows["r1"]["specificity"]["value"] == 1.0
    assert result["agreement"]["fleiss_kappa_3class"] is None
    assert result["agreement"]["fleiss_kappa_2class"] is not None


def test_model_rows_with_status_error_are_refused(tmp_path):
    make_study(tmp_path, n=10, scored=(False,))
    text = (tmp_path / "model.csv").read_text().splitlines()
    parts = text[1].split(",")
    text[1] = ",".join([parts[0], "", "", "", "", "error", "boom", "m", ""])
    (tmp_path / "model.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(InputError, match="needs every case"):
        run_reader_study(tmp_path / "model.csv", [tmp_path / "reader1.csv"], tmp_path / "truth.csv", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_yaml_matches_dataclass_defaults():
    assert load_config(ReaderStudyConfig, REPO / "configs" / "reader_study.yaml") == ReaderStudyConfig()


# ----------------------------------------------------------------------------------------------------------------------
# the bundled synthetic example and its notebook


def test_example_files_are_the_generator_output(tmp_path):
    spec = importlib.util.spec_from_file_location("make_example", EXAMPLE / "make_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.generate(tmp_path)
    assert [p.name for p in written] == [
        "truth.csv", "model_report.csv", "reader_1.csv", "reader_2.csv", "reader_3.csv", "reader_4.csv",
    ]  # fmt: skip
    for path in written:
        assert path.read_bytes() == (EXAMPLE / path.name).read_bytes(), path.name
    assert "SYNTHETIC" in (EXAMPLE / "README.md").read_text()


def test_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("COVIDCTNET_NOTEBOOK_OUT", str(tmp_path / "nb_out"))
    nb = nbformat.read(REPO / "notebooks" / "reader_study.ipynb", as_version=4)
    # kernel "python3" is ipykernel's own spec; jupyter_client launches it with this interpreter (sys.executable)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert f"environment: {sys.prefix}\n" in text  # the kernel ran in this (the venv's) Python environment
    assert "Reader average" in text and "Fleiss" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert (tmp_path / "nb_out" / "table.csv").exists()
