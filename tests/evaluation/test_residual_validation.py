"""`covidctnet validate-residuals`: slice matching by z, lung slices, per-study and pooled AUCs, outputs."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner
from data_paths import require_data
from sklearn.metrics import roc_auc_score

from covidctnet.cli import cli
from covidctnet.core.errors import LabelError
from covidctnet.evaluation.residual_validation import (
    SliceLabels,
    ValidateResidualsConfig,
    read_covid_ct_md_labels,
    validate_residuals,
)


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


def write_table(rows, path):
    """A ``<id>_slices.csv`` as slice-scores writes it (the columns of the rows given, in their order)."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _write(tmp_path, studies):
    sdir = tmp_path / "slices"
    sdir.mkdir()
    lines = ["study_id,file,z_mm,infected"]
    for rows, labels, _, _ in studies:
        write_table(rows, sdir / f"{rows[0]['study_id']}_slices.csv")
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


def test_labels_match_within_half_a_slice():
    rows = [{"z_mm": z} for z in (0.0, 2.0, 4.0)]
    labels = SliceLabels("labels.csv", by_z={"s": (np.array([0.9, 4.2]), np.array([1, 0]), None)})
    assert list(labels.assign({"s": rows})["s"][0]) == [1, -1, 0]


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


# --------------------------------------------------------------------------------------------------------------------
# COVID-CT-MD's own label files (issue 24): Slice-level-labels-updated-1.npy + Index.csv (+ lobe labels), as published

FULL = {"covid-P001": "covid-P001", "cap-cap001": "cap-cap001", "control-normal001": "control-normal001"}


@pytest.fixture(scope="module")
def full_tables(tmp_path_factory):
    """Slice tables of the three full shared series: one row per file, ascending z (ImagePositionPatient z, the
    slice table's z_mm for these axial series), synthetic scores; and every file's SliceLocation."""
    import pydicom

    sdir = tmp_path_factory.mktemp("full") / "slices"
    sdir.mkdir()
    rng = np.random.default_rng(3)
    locations = {}
    for sid, folder in FULL.items():
        heads = [pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["ImagePositionPatient", "SliceLocation"])
                 for f in require_data("ct-dicom-full", folder).glob("*.dcm")]
        z = np.sort([float(h.ImagePositionPatient[2]) for h in heads])
        locations[sid] = (np.array([float(h.ImagePositionPatient[2]) for h in heads]),
                          np.array([float(h.SliceLocation) for h in heads]))
        n = z.size
        lung = 60 * np.exp(-(((np.arange(n) - n / 2) / (n / 3)) ** 2))
        rows = [{"study_id": sid, "slice": k, "z_mm": f"{z[k]:.3f}", "lung_ml": lung[k],
                 "residual_score": rng.normal(), "hu_score": rng.normal(), "residual_p95": rng.normal()}
                for k in range(n)]
        write_table(rows, sdir / f"{sid}_slices.csv")
    return sdir, locations


def test_slice_location_is_the_slice_tables_z_in_the_shared_series(full_tables):
    """What the label order rests on: in COVID-CT-MD's axial series SliceLocation equals ImagePositionPatient z
    (z_mm), file by file, so descending SliceLocation is descending z_mm."""
    _, locations = full_tables
    for ipp_z, slice_location in locations.values():
        np.testing.assert_allclose(slice_location, ipp_z, atol=1e-3)


def test_covid_ct_md_label_files_give_the_labels_of_the_csv(full_tables, tmp_path):
    """The dataset's native files and the project's CSV (shared slice_labels.csv, made from the same files) give every
    slice of P001 and cap001 the same slice and lobe labels, and the same metrics; label index 0 is the most superior
    slice."""
    sdir, _ = full_tables
    native = require_data("covid-ct-md-labels")
    csv_labels = require_data("ct-dicom-full", "slice_labels.csv")
    m_csv = validate_residuals(sdir, csv_labels, tmp_path / "csv")
    m_npy = validate_residuals(sdir, native / "Slice-level-labels-updated-1.npy", tmp_path / "npy",
                               lobe_labels=native / "Lobe-level-labels-updated-1.npy")
    matched = (tmp_path / "npy" / "matched_labels.csv").read_text()
    assert matched == (tmp_path / "csv" / "matched_labels.csv").read_text()
    rows = list(csv.DictReader(matched.splitlines()))
    assert len(rows) == 148 + 168 + 154 and all(r["infected"] != "" for r in rows)
    assert list(rows[0]) == ["study_id", "slice", "z_mm", "infected", "LLL", "LUL", "RLL", "RML", "RUL"]
    infected = {sid: sum(int(r["infected"]) for r in rows if r["study_id"] == sid) for sid in FULL}
    assert infected == {"covid-P001": 80, "cap-cap001": 30, "control-normal001": 0}  # SOURCES.md
    # label index 0 = the most superior slice: the npy row read top down is the matched labels read by descending z
    p001 = sorted((r for r in rows if r["study_id"] == "covid-P001"), key=lambda r: -float(r["z_mm"]))
    row0 = np.load(native / "Slice-level-labels-updated-1.npy")[0]
    assert [int(r["infected"]) for r in p001] == row0[:148].tolist()
    assert row0[148:].sum() == 0
    # anatomy agrees: P001's right upper lobe labels sit above (larger z) its right lower lobe labels
    z = np.array([float(r["z_mm"]) for r in p001])
    rul, rll = (np.array([int(r[lb]) for r in p001], bool) for lb in ("RUL", "RLL"))
    assert rul.any() and rll.any() and z[rul].mean() > z[rll].mean() + 50
    for sid in FULL:
        assert m_npy["per_study"][sid] == m_csv["per_study"][sid]
    assert m_npy["pooled"] == m_csv["pooled"]
    assert set(m_npy["per_study"]["covid-P001"]["lobes"]) == {"LLL", "LUL", "RLL", "RML", "RUL"}


def test_covid_ct_md_labels_on_the_command_line(full_tables, tmp_path):
    sdir, _ = full_tables
    native = require_data("covid-ct-md-labels")
    r = CliRunner().invoke(cli, ["validate-residuals", str(sdir), "--labels",
                                 str(native / "Slice-level-labels-updated-1.npy"), "--lobe-labels",
                                 str(native / "Lobe-level-labels-updated-1.npy"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "covid-P001: " in r.output and "cap-cap001: " in r.output and "pooled: " in r.output
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Per lobe" in report and "| covid-P001 |" in report


def _native_copy(tmp_path, index_rows):
    """The shared native label files with an Index.csv of ``index_rows`` (Label Index, Folder/ID)."""
    native = require_data("covid-ct-md-labels")
    folder = tmp_path / "labels"
    folder.mkdir(parents=True)
    np.save(folder / "Slice-level-labels-updated-1.npy", np.load(native / "Slice-level-labels-updated-1.npy"))
    (folder / "Index.csv").write_text("Label Index,Diagnosis,Relative Path,Folder/ID\n" + "".join(
        f"{i},COVID-19,./COVID-19/,{case}\n" for i, case in index_rows))
    return folder / "Slice-level-labels-updated-1.npy"


def test_ambiguous_and_missing_matches_are_named_in_one_line(tmp_path, caplog):
    rng = np.random.default_rng(4)
    sdir, _ = _write(tmp_path, [_study("P001", 40, slice(10, 20), rng), _study("covid-P001", 40, slice(10, 20), rng),
                                _study("covid-P777", 40, slice(0, 0), rng), _study("normal005", 40, slice(0, 0), rng)])
    npy = _native_copy(tmp_path, [(0, "P001"), (1, "cap001")])
    r = CliRunner().invoke(cli, ["validate-residuals", str(sdir), "--labels", str(npy), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    (line,) = r.output.strip().splitlines()
    assert "ambiguous" in line and "case P001 matches studies P001, covid-P001" in line
    assert not (tmp_path / "o").exists()
    (sdir / "P001_slices.csv").unlink()
    caplog.set_level(logging.WARNING, logger="covidctnet.evaluation.residual_validation")
    m = validate_residuals(sdir, npy, tmp_path / "o2")
    (missing,) = [rec.getMessage() for rec in caplog.records if "no case" in rec.getMessage()]
    assert missing.startswith("1 studies have no case in") and missing.endswith("left out: covid-P777")
    assert m["skipped"]["covid-P777"] == "no labels"
    assert m["per_study"]["normal005"]["role"].startswith("normal subject")  # COVID-CT-MD's normal patients


def test_label_index_with_a_gap_is_taken_in_order(tmp_path, caplog):
    """The published Index.csv skips a Label Index (42 to 44) for 79 label rows: rows are taken in Label Index
    order, with one line saying so."""
    npy = _native_copy(tmp_path, [(0, "P001"), (2, "cap001")])
    caplog.set_level(logging.WARNING)
    labels = read_covid_ct_md_labels(npy)
    assert "rows taken in Label Index order" in caplog.text
    native = np.load(npy)
    np.testing.assert_array_equal(labels.cases["cap001"][0], native[1])
    bad = _native_copy(tmp_path / "b", [(0, "P001"), (5, "cap001"), (7, "x001")])
    with pytest.raises(LabelError, match=r"Label Index 0..7 for 3 cases, but .* has 2 rows"):
        read_covid_ct_md_labels(bad)
