"""int8 denoiser (issue 15): `export-onnx --int8-calibration`, its accuracy gate, and `predict --precision int8`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from covidctnet.cli import cli
from covidctnet.inference import int8
from covidctnet.inference.onnx_export import INT8_COMPONENT, ONNX_MANIFEST
from covidctnet.inference.predict import load_pipeline, predict_volume
from covidctnet.io.volume import read_volume

# the onnx extra is part of `make install`, so CI must have it
ort = __import__("onnxruntime") if os.environ.get("CI", "").lower() == "true" else pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, dicom_dirs, residual_demo_model):
    """The bundled demo model (trained weights) exported with an int8 denoiser calibrated on the control series."""
    out = tmp_path_factory.mktemp("int8") / "demo-int8"
    result = CliRunner().invoke(cli, ["export-onnx", str(residual_demo_model), "-o", str(out), "--int8-calibration",
                                      str(dicom_dirs["control"]), "--calibration-slices", "16"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_export_writes_a_gated_int8_denoiser(int8_export, dicom_dirs):
    out, output = int8_export
    entry = json.loads((out / ONNX_MANIFEST).read_text())["components"][INT8_COMPONENT]
    assert (out / entry["file"]).is_file() and entry["calibration_slices"] == 16
    assert entry["calibration_studies"] == [dicom_dirs["control"].name]
    [gate] = entry["gate"]
    assert gate["residual_correlation"] >= int8.GATE_MIN_CORRELATION
    assert gate["max_probability_change"] <= int8.GATE_MAX_PROBABILITY_CHANGE
    assert f"{INT8_COMPONENT}:" in output and "correlation" in output


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_int8_gate_holds_on_series_it_was_not_calibrated_on(int8_export, dicom_dirs, backend, residual_demo_model):
    """Issue 15's gate against PyTorch fp32 on the COVID and CAP series (calibration: the control one), and int8
    really runs (the residuals are close to fp32's, not equal)."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    out, _ = int8_export
    fp32, fast = load_pipeline(residual_demo_model, "cpu"), load_pipeline(out, "cpu", backend, "int8")
    for name in ("covid", "cap"):
        volume = read_volume(dicom_dirs[name])
        ref, got = predict_volume(fp32, volume), predict_volume(fast, volume)
        r_ref, r_got = ref["residual"][0], got["residual"][0]
        assert np.corrcoef(r_ref.ravel(), r_got.ravel())[0, 1] >= 0.99, name
        assert np.abs(ref["probabilities"] - got["probabilities"]).max() <= 0.01, name
        assert np.abs(r_ref - r_got).max() > 1e-5, name


def test_predict_precision_int8_from_the_command_line(int8_export, dicom_dirs, tmp_path):
    out, _ = int8_export
    result = CliRunner().invoke(cli, ["predict", str(dicom_dirs["cap"]), "--model", str(out), "--backend", "onnx",
                                      "--precision", "int8", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["precision"] == "int8" and report["backend"] == "onnx" and report["studies"][0]["status"] == "ok"


@pytest.mark.parametrize("args,message", [
    (["--backend", "torch", "--precision", "int8"], "onnx or openvino"),
    (["--backend", "onnx", "--precision", "bf16"], "torch and openvino"),
])
def test_precision_the_backend_does_not_offer_is_one_line(dicom_dirs, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["predict", str(dicom_dirs["cap"]), "-o", str(tmp_path / "o"), *args])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_int8_of_an_export_without_one_is_one_line(tmp_path, dicom_dirs, residual_demo_model):
    plain = tmp_path / "plain"
    assert CliRunner().invoke(cli, ["export-onnx", str(residual_demo_model), "-o", str(plain)]).exit_code == 0
    result = CliRunner().invoke(cli, ["predict", str(dicom_dirs["cap"]), "--model", str(plain), "--backend", "onnx",
                                      "--precision", "int8", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no int8 denoiser" in result.output and "--int8-calibration" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_failing_gate_refuses_the_whole_export(tmp_path, dicom_dirs, monkeypatch, residual_demo_model):
    monkeypatch.setattr(int8, "GATE_MIN_CORRELATION", 1.5)  # no correlation reaches it
    out = tmp_path / "refused"
    result = CliRunner().invoke(cli, ["export-onnx", str(residual_demo_model), "-o", str(out), "--int8-calibration",
                                      str(dicom_dirs["control"]), "--calibration-slices", "4"])
    assert result.exit_code == 2 and "fails the accuracy gate" in result.output and "nothing written" in result.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_calibration_scan_is_one_line(tmp_path, residual_demo_model):
    out = tmp_path / "x"
    result = CliRunner().invoke(cli, ["export-onnx", str(residual_demo_model), "-o", str(out), "--int8-calibration",
                                      str(tmp_path / "missing")])
    assert result.exit_code == 2 and "missing" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()
