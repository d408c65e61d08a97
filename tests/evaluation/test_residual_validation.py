"""`covidctnet validate-residuals`: slice matching by z, lung slices, per-study and pooled AUCs, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from covidctnet.cli import cli
from covidctnet.evaluation.residual_validation import ValidateResidualsConfig, match_labels, validate_residuals
from covidctnet.inference.slice_scores import write_slices_csv


def _study(sid, n, infected, rng, z0=-300.0, dz=2.0, signal=1.0):
    """Synthetic slice scores: lung area a bump along z, residual separating infected slices by ``signal``."""
    z = z0 + dz * np.arange(n)
    lung = 60 * np.exp(-(((np.arange(n) - n / 2) / (n / 3)) ** 2))
    y = np.zeros(n, int)
    y[infected] = 1
    res = rng.normal(0, 1, n) + signal * y
    hu = rng.normal(0, 1, n) + 0.3 * y
    rows = [{"study_id": sid, "slice": k, "z_mm": z[k], "lung_ml": lung[k], "residual_score": res[k],
             "hu_score": hu[k], "residual_mean_pos": res[k], "residual_mean_abs": -res[k],
             "residual_p95": hu[k], "residual_frac_pos": res[k]} for k in range(n)]
    labels = [(sid, z[k] + 0.3, y[k]) for k in range(n)]  # label z off by 0.3 mm: still matched
    return rows, labels, y, lung


def _write(tmp_path, studies):
    sdir = tmp_path / "slices"
    sdir.mkdir()
    lines = ["study_id,file,z_mm,infected"]
    for rows, labels, _, _ in studies:
        write_slices_csv(rows, sdir / f"{rows[0]['study_id']}_slices.csv")
        lines += [f"{s},x.dcm,{z:.3f},{f}" for s, z, f in labels]
    labels_path = tmp_path / "labels.csv"
    labels_path.write_text("\n".join(lines) + "\n")
    return sdir, labels_path


def test_aucs_match_sklearn_on_lung_slices(tmp_path):
    rng = np.random.default_rng(0)
    a = _study("covid-A", 60, slice(20, 40), rng)
    b = _study("cap-B", 50, slice(10, 22), rng, signal=2.0)
    n = _study("control-N", 55, slice(0, 0), rng)
    sdir, labels = _write(tmp_path, [a, b, n])
    m = validate_residuals(sdir, labels, tmp_path / "out")
    for rows, _, y, lung in (a, b):
        sid = rows[0]["study_id"]
        keep = lung >= 0.25 * lung.max()
        res = np.array([r["residual_score"] for r in rows])[keep]
        got = m["per_study"][sid]["auc"]["residual_score"]
        assert got["value"] == pytest.approx(roc_auc_score(y[keep], res))
        assert got["ci_low"] < got["value"] < got["ci_high"]
        assert m["per_study"][sid]["n_slices"] == int(keep.sum())
        assert 0 <= m["per_study"][sid]["tests"]["residual_score_vs_hu_score"]["p_value"] <= 1
    assert "role" in m["per_study"]["control-N"]
    # pooled: infected lung slices of A and B against the lung slices of N
    pos = [np.array([r["residual_score"] for r in rows])[(lung >= 0.25 * lung.max()) & (y == 1)]
           for rows, _, y, lung in (a, b)]
    rows_n, _, _, lung_n = n
    neg = np.array([r["residual_score"] for r in rows_n])[lung_n >= 0.25 * lung_n.max()]
    yy = np.r_[np.ones(sum(p.size for p in pos)), np.zeros(neg.size)]
    expected = roc_auc_score(yy, np.concatenate([*pos, neg]))
    assert m["pooled"]["auc"]["residual_score"]["value"] == pytest.approx(expected)
    assert m["candidates"]["residual_mean_abs"]["covid-A"] == pytest.approx(
        1 - m["per_study"]["covid-A"]["auc"]["residual_score"]["value"])
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["per_study"].keys() == m["per_study"].keys()
    report = (out / "report.md").read_text()
    assert "within covid-A" in report and "pooled vs normal subjects" in report
    for sid in ("covid-A", "cap-B", "control-N"):
        assert (out / f"{sid}_scores.png").stat().st_size > 5_000


def test_lung_fraction_changes_the_slices(tmp_path):
    rng = np.random.default_rng(1)
    sdir, labels = _write(tmp_path, [_study("covid-A", 60, slice(20, 40), rng)])
    all_slices = validate_residuals(sdir, labels, tmp_path / "o1", ValidateResidualsConfig(lung_fraction=0.0))
    lung = validate_residuals(sdir, labels, tmp_path / "o2")
    assert all_slices["per_study"]["covid-A"]["n_slices"] == 60
    assert lung["per_study"]["covid-A"]["n_slices"] < 60


def test_match_labels_half_slice():
    rows = [{"z_mm": z} for z in (0.0, 2.0, 4.0)]
    assert list(match_labels(rows, [(0.9, 1), (4.2, 0)])) == [1, -1, 0]


def test_cli_bad_inputs_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    labels = tmp_path / "bad_labels.csv"
    labels.write_text("study_id,z_mm\nA,1\n")
    r = CliRunner().invoke(cli, ["validate-residuals", str(tmp_path / "empty"), "--labels", str(labels), "-o",
                                 str(tmp_path / "out")])
    assert r.exit_code == 2 and "no *_slices.csv files" in r.output and len(r.output.strip().splitlines()) == 1
    rng = np.random.default_rng(2)
    sdir, _ = _write(tmp_path, [_study("covid-A", 30, slice(5, 15), rng)])
    r = CliRunner().invoke(cli, ["validate-residuals", str(sdir), "--labels", str(labels), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "column(s) ['infected'] missing" in r.output
    assert not (tmp_path / "o").exists()


def test_config_defaults_match_yaml():
    from covidctnet.core.config import load_config
    from tests.data_paths import REPO_ROOT

    cfg = load_config(ValidateResidualsConfig, REPO_ROOT / "configs" / "validate_residuals.yaml")
    assert cfg == ValidateResidualsConfig()
