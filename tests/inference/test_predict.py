"""`covidctnet predict` end to end on the real shared scans, and `covidctnet demo` with the bundled model."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from browser import render, study_rows
from click.testing import CliRunner
from model_factories import DEPTH, SIZE, tiny_predict_model

from covidctnet import CLASS_NAMES
from covidctnet.cli import cli
from covidctnet.core.errors import ModelDirError
from covidctnet.core.model_dir import save_model_dir
from covidctnet.inference.predict import DEMO_SCAN, REPORT_COLUMNS, load_pipeline
from covidctnet.models.registry import DEMO_MODEL


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small untrained pipeline (64x64 preprocessing): enough to exercise every step quickly."""
    return tiny_predict_model(tmp_path_factory.mktemp("model") / "tiny")


def test_predict_batch_with_a_bad_study(tiny_model, dicom_dirs, nifti_ct, tmp_path):
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(nifti_ct.read_bytes()[:25000])
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", str(dicom_dirs["covid"]), str(dicom_dirs["control"]), str(bad),
                                      "--model", str(tiny_model), "-o", str(out), "--save-residuals"])
    assert result.exit_code == 1, result.output
    assert sum(line.startswith("Error:") for line in result.output.splitlines()) == 1
    lines = (out / "report.csv").read_text().splitlines()
    assert lines[0].split(",") == list(REPORT_COLUMNS)
    report = json.loads((out / "report.json").read_text())
    rows = {r["study_id"]: r for r in report["studies"]}
    assert rows["corrupt"]["status"] == "error" and "truncated" in rows["corrupt"]["error"]
    for sid in ("covid-P001", "control-normal001"):
        row = rows[sid]
        probs = np.array([row[f"p_{c}"] for c in CLASS_NAMES])
        assert row["status"] == "ok" and row["predicted"] == CLASS_NAMES[int(np.argmax(probs))]
        assert np.all((probs >= 0) & (probs <= 1)) and abs(probs.sum() - 1) < 1e-5
        assert row["weights_sha256"] == report["weights_sha256"] and len(row["weights_sha256"]) == 64
        assert "slice_gaps" in row["checks"]
        img = nib.load(out / f"{sid}_residual.nii.gz")
        assert img.shape == (SIZE, SIZE, DEPTH)
        assert img.get_fdata().min() < 0 < img.get_fdata().max()  # signed residual
        assert (out / f"{sid}_overlay.png").stat().st_size > 10_000
    assert not (out / "corrupt_residual.nii.gz").exists()
    # report.html: the same studies as a browser shows them, with the overlays written above embedded
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2 and "truncated" in page
    dom, shot = render(out / "report.html", tmp_path)
    assert study_rows(dom) == {"ok": 2, "error": 1}
    assert shot.std() > 20


def test_same_input_same_probabilities(tiny_model, dicom_dirs, tmp_path):
    outs = []
    for name in ("a", "b"):
        result = CliRunner().invoke(cli, ["predict", str(dicom_dirs["cap"]), "--model", str(tiny_model),
                                          "-o", str(tmp_path / name), "--batch-size", "3" if name == "a" else "16"])
        assert result.exit_code == 0, result.output
        outs.append(json.loads((tmp_path / name / "report.json").read_text())["studies"][0])
    for c in CLASS_NAMES:
        assert outs[0][f"p_{c}"] == pytest.approx(outs[1][f"p_{c}"], abs=1e-5)


def test_predict_run_imports_only_what_it_uses(tiny_model, dicom_dirs, tmp_path):
    """A whole ``covidctnet predict`` process imports neither MONAI (2 s; training needs it) nor the statistics of
    ``evaluation`` (SciPy stats, scikit-learn, statsmodels: 0.7 s)."""
    import subprocess
    import sys

    code = ("import sys, runpy; sys.argv = ['covidctnet', 'predict', sys.argv[1], '--model', sys.argv[2], '-o', "
            "sys.argv[3], '-q'];\ntry:\n    runpy.run_module('covidctnet', run_name='__main__')\nexcept SystemExit:\n"
            "    pass\nprint([m for m in ('monai', 'statsmodels', 'sklearn') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code, str(dicom_dirs["cap"]), str(tiny_model), str(tmp_path / "o")],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]" and (tmp_path / "o" / "report.json").is_file()


def test_bf16_denoiser_gives_nearly_the_fp32_probabilities(dicom_dirs, tmp_path):
    # the bundled demo model: trained weights, so the residuals (and the probabilities) carry real structure
    reports = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        result = CliRunner().invoke(cli, ["predict", str(dicom_dirs["covid"]), "--model", str(DEMO_MODEL), "-o",
                                          str(out), "--device", "cpu", "--precision", precision])
        assert result.exit_code == 0, result.output
        reports[precision] = json.loads((out / "report.json").read_text())
    assert reports["bf16"]["precision"] == "bf16" and reports["fp32"]["precision"] == "fp32"
    fp32, bf16 = (np.array([reports[p]["studies"][0][f"p_{c}"] for c in CLASS_NAMES]) for p in ("fp32", "bf16"))
    assert np.abs(fp32 - bf16).max() < 0.02 and reports["bf16"]["studies"][0]["predicted"] == reports["fp32"][
        "studies"][0]["predicted"]
    # a precision a backend does not offer (onnx + bf16): tests/inference/test_int8.py


def test_predict_resumes_and_refuses_another_model(tiny_model, dicom_dirs, tmp_path):
    out = tmp_path / "out"
    base = ["predict", "--model", str(tiny_model), "-o", str(out), "--device", "cpu"]
    result = CliRunner().invoke(cli, [*base, str(dicom_dirs["covid"]), str(dicom_dirs["control"])])
    assert result.exit_code == 0, result.output
    first = json.loads((out / "report.json").read_text())["studies"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()}
    assert sorted(stamps) == ["control-normal001.json", "covid-P001.json"]
    # a rerun with one more study predicts only that one; the report lists all three, the first two unchanged
    (out / "predictions" / "control-normal001.json").unlink()  # as if the run had died before this study ended
    result = CliRunner().invoke(cli, [*base, str(dicom_dirs["covid"]), str(dicom_dirs["control"]),
                                      str(dicom_dirs["cap"])])
    assert result.exit_code == 0, result.output
    assert (out / "predictions" / "covid-P001.json").stat().st_mtime_ns == stamps["covid-P001.json"]
    again = {r["study_id"]: r for r in json.loads((out / "report.json").read_text())["studies"]}
    assert sorted(again) == ["cap-cap001", "control-normal001", "covid-P001"]
    for row in first:  # the skipped study keeps its recorded timings too; the recomputed one gets new ones
        keys = ("p_control", "p_covid", "p_cap", "checks") + (("seconds",) if row["study_id"] == "covid-P001" else ())
        assert {k: again[row["study_id"]][k] for k in keys} == {k: row[k] for k in keys}
    assert len((out / "report.csv").read_text().splitlines()) == 4
    # another model into the same folder is refused, before any study, unless --no-resume
    other = tiny_predict_model(tmp_path / "other", seed=1)
    args = ["predict", str(dicom_dirs["cap"]), "--model", str(other), "-o", str(out), "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "weights_sha256" in result.output and "--no-resume" in result.output
    assert CliRunner().invoke(cli, [*args, "--no-resume"]).exit_code == 0


def test_tampered_weights_are_refused(tiny_model, dicom_dirs, tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(tiny_model, bad)
    blob = bytearray((bad / "classifier.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (bad / "classifier.safetensors").write_bytes(bytes(blob))
    result = CliRunner().invoke(cli, ["predict", str(dicom_dirs["cap"]), "--model", str(bad),
                                      "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "does not match SHA256SUMS" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_model_without_denoiser_is_refused(tiny_model, tmp_path):
    from covidctnet.core.model_dir import load_model_dir

    md = load_model_dir(tiny_model)
    config = dict(md.config, components={"classifier": md.component("classifier")})
    save_model_dir(tmp_path / "m", config, {"classifier": md.state_dict("classifier")}, "# no denoiser\n")
    with pytest.raises(ModelDirError, match="denoiser"):
        load_pipeline(tmp_path / "m", "cpu")


@pytest.mark.skipif(not (DEMO_MODEL / "config.yaml").is_file(), reason="the bundled demo model is not in this checkout")
def test_demo_prints_a_report(tmp_path):
    assert DEMO_SCAN.is_file() and DEMO_SCAN.stat().st_size < 5_000_000
    result = CliRunner().invoke(cli, ["demo", "-o", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    (row,) = report["studies"]
    assert abs(sum(row[f"p_{c}"] for c in CLASS_NAMES) - 1) < 1e-5
    assert f"{row['study_id']}: {row['predicted']}" in result.output
    assert (tmp_path / "demo" / row["overlay"]).is_file()


@pytest.mark.skipif(not (DEMO_MODEL / "config.yaml").is_file(), reason="the bundled demo model is not in this checkout")
def test_walkthrough_notebook_runs(data_root, tmp_path, monkeypatch):
    """notebooks/walkthrough.ipynb runs top to bottom on the shared scans (so it cannot rot)."""
    import sys
    from pathlib import Path

    import nbformat
    from nbclient import NotebookClient

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("COVIDCTNET_TEST_DATA", str(data_root))
    monkeypatch.setenv("COVIDCTNET_NOTEBOOK_OUT", str(tmp_path / "nb"))
    nb = nbformat.read(repo / "notebooks" / "walkthrough.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(repo / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"environment: {sys.prefix}" in text
    assert "3 preprocessed, 0 failed" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5
    assert (tmp_path / "nb" / "predict" / "report.csv").is_file()
    assert len((tmp_path / "nb" / "slices" / "preds.csv").read_text().splitlines()) == 1 + 4  # the 2D branch
    assert len(list((tmp_path / "nb" / "cams").glob("*_cam.png"))) == 4


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_predict_slice_scores_is_the_slice_scores_table_from_one_pass(tiny_model, dicom_dirs, tmp_path, backend):
    """``predict --slice-scores`` writes the same <id>_slices.csv as ``slice-scores`` (same model, backend, settings),
    from the residual of its own denoising pass."""
    scan = dicom_dirs["covid"]
    result = CliRunner().invoke(cli, ["predict", str(scan), "--model", str(tiny_model), "-o", str(tmp_path / "p"),
                                      "--slice-scores", "--backend", backend, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "p" / "report.json").read_text())["studies"][0]
    written = tmp_path / "p" / f"{row['study_id']}_slices.csv"
    assert f"slices:   {written}" in result.output
    result = CliRunner().invoke(cli, ["slice-scores", str(scan), "--model", str(tiny_model), "-o", str(tmp_path / "s"),
                                      "--backend", backend, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    expected = (tmp_path / "s" / written.name).read_text()
    assert len(expected.splitlines()) == 1 + len(list(scan.iterdir()))  # header + one row per DICOM slice
    assert written.read_text() == expected
