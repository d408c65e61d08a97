"""`covidctnet export-onnx` and the onnxruntime backend of `predict`, on the real shared DICOM series."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from model_factories import DEPTH, SIZE, tiny_predict_model

from covidctnet import CLASS_NAMES
from covidctnet.cli import cli
from covidctnet.core.errors import ConfigError, ModelDirError
from covidctnet.core.model_dir import load_model_dir, save_model_dir
from covidctnet.inference.onnx_export import ONNX_MANIFEST, export_onnx
from covidctnet.inference.predict import load_pipeline, predict_volume


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small untrained predict model directory (64x64 preprocessing)."""
    return tiny_predict_model(tmp_path_factory.mktemp("model") / "tiny")

@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    result = CliRunner().invoke(cli, ["export-onnx", str(tiny_model), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_export_writes_a_checked_onnx_model_dir(tiny_model, tiny_onnx):
    import onnx

    assert sorted(p.name for p in tiny_onnx.iterdir()) == sorted(
        ["config.yaml", "MODEL_CARD.md", "SHA256SUMS", "denoiser.onnx", "classifier.onnx", ONNX_MANIFEST])
    assert (tiny_onnx / "SHA256SUMS").read_bytes() == (tiny_model / "SHA256SUMS").read_bytes()
    manifest = json.loads((tiny_onnx / ONNX_MANIFEST).read_text())
    assert manifest["components"]["denoiser"]["input_shape"] == ["batch", 1, SIZE, SIZE]
    assert manifest["components"]["classifier"]["input_shape"] == ["batch", 1, DEPTH, SIZE, SIZE]
    for entry in manifest["components"].values():
        assert 0 <= entry["max_abs_diff"] <= 1e-4
        graph = onnx.load(str(tiny_onnx / entry["file"])).graph
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch axis
    assert not list(tiny_onnx.parent.glob(".*.tmp"))


def test_onnx_and_torch_agree_on_a_real_scan(tiny_model, tiny_onnx, dicom_dirs, tmp_path):
    from covidctnet.io.volume import read_volume

    volume = read_volume(dicom_dirs["covid"])
    results = {b: predict_volume(load_pipeline(m, "cpu", b), volume, batch_size=5)
               for b, m in (("torch", tiny_model), ("onnx", tiny_onnx))}
    residual_t, residual_o = results["torch"]["residual"][0], results["onnx"]["residual"][0]
    assert residual_t.shape == residual_o.shape == (SIZE, SIZE, DEPTH)
    assert np.abs(residual_t).max() > 1e-3  # a real residual, not zeros on both sides
    np.testing.assert_allclose(residual_o, residual_t, atol=1e-4, rtol=0)
    np.testing.assert_allclose(results["onnx"]["probabilities"], results["torch"]["probabilities"], atol=1e-4, rtol=0)
    assert results["onnx"]["predicted"] == results["torch"]["predicted"]

    # the same through the CLI: same probabilities (to 1e-4), same model identity in the report
    reports = {}
    for backend, model in (("torch", tiny_model), ("onnx", tiny_onnx)):
        out = tmp_path / backend
        result = CliRunner().invoke(cli, ["predict", str(dicom_dirs["control"]), "--model", str(model), "-o", str(out),
                                          "--backend", backend])
        assert result.exit_code == 0, result.output
        reports[backend] = json.loads((out / "report.json").read_text())
    row_t, row_o = reports["torch"]["studies"][0], reports["onnx"]["studies"][0]
    for c in CLASS_NAMES:
        assert row_o[f"p_{c}"] == pytest.approx(row_t[f"p_{c}"], abs=1e-4)
    assert reports["onnx"]["weights_sha256"] == reports["torch"]["weights_sha256"]


def test_export_without_denoiser_is_a_one_line_error(tiny_model, tmp_path):
    md = load_model_dir(tiny_model)
    config = dict(md.config, components={"classifier": md.component("classifier")})
    save_model_dir(tmp_path / "m", config, {"classifier": md.state_dict("classifier")}, "# no denoiser\n")
    out = tmp_path / "onnx"
    result = CliRunner().invoke(cli, ["export-onnx", str(tmp_path / "m"), "-o", str(out)])
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and "no denoiser component" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


def test_export_that_disagrees_is_refused(tiny_model, tmp_path):
    with pytest.raises(ModelDirError, match="differ by .* nothing written"):
        export_onnx(tiny_model, tmp_path / "onnx", tolerance=1e-12)
    assert not (tmp_path / "onnx").exists() and not list(tmp_path.glob(".*.tmp"))


def test_export_refuses_to_overwrite_other_folders(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="must differ"):
        export_onnx(tiny_model, tiny_model)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier ONNX export"):
        export_onnx(tiny_model, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_onnx_backend_on_a_pytorch_model_runs_its_cached_export(tiny_model, tiny_onnx, dicom_dirs, tmp_path):
    """A forced onnx backend given the PyTorch model directory runs the export cache's copy (tests/conftest.py points
    the cache to the session's folder): the same probabilities as the export-onnx folder."""
    reports = []
    for model in (tiny_model, tiny_onnx):
        out = tmp_path / model.name
        result = CliRunner().invoke(cli, ["predict", str(dicom_dirs["cap"]), "--model", str(model), "-o", str(out),
                                          "--backend", "onnx"])
        assert result.exit_code == 0, result.output
        reports.append(json.loads((out / "report.json").read_text()))
    assert reports[0]["backend"] == reports[1]["backend"] == "onnx"
    for c in CLASS_NAMES:
        assert reports[0]["studies"][0][f"p_{c}"] == pytest.approx(reports[1]["studies"][0][f"p_{c}"], abs=1e-6)


def test_tampered_onnx_file_is_refused(tiny_onnx, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_onnx, bad)
    blob = bytearray((bad / "classifier.onnx").read_bytes())
    blob[-1] ^= 0xFF
    (bad / "classifier.onnx").write_bytes(bytes(blob))
    with pytest.raises(ModelDirError, match="classifier.onnx: sha256 does not match"):
        load_pipeline(bad, "cpu", "onnx")


def test_slice_model_export_and_predict_slice_backends_agree(ucsd_root, tmp_path):
    import csv

    from covidctnet.data.ucsd import ucsd_records
    from covidctnet.models.slice import build_slice_model

    torch.manual_seed(0)
    net = build_slice_model("resnet18", in_channels=2, num_classes=2, width=0.25)
    config = {"name": "tiny-slice", "task": "slice", "classes": ["noncovid", "covid"], "threshold": 0.5,
              "components": {"model": {"arch": "resnet18", "kwargs": {"in_channels": 2, "num_classes": 2,
                                                                      "width": 0.25}}},
              "preprocessing": {"size": 64, "lung_mask": True}}
    save_model_dir(tmp_path / "slice", config, {"model": net.eval().state_dict()}, "# tiny slice model\n")
    result = CliRunner().invoke(cli, ["export-onnx", str(tmp_path / "slice"), "-o", str(tmp_path / "slice-onnx")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "slice-onnx" / ONNX_MANIFEST).read_text())
    assert manifest["components"]["model"]["input_shape"] == ["batch", 2, 64, 64]

    images = [str(r.path) for r in ucsd_records(ucsd_root, "val")[:3]]
    probs = {}
    for backend, model in (("torch", "slice"), ("onnx", "slice-onnx")):
        out = tmp_path / f"{backend}-preds"
        result = CliRunner().invoke(cli, ["predict-slice", *images, "--model", str(tmp_path / model), "-o", str(out),
                                          "--backend", backend, "--device", "cpu"])
        assert result.exit_code == 0, result.output
        with (out / "preds.csv").open(newline="") as fh:
            probs[backend] = np.array([float(r["p_covid"]) for r in csv.DictReader(fh)])
    assert probs["torch"].shape == (3,)
    np.testing.assert_allclose(probs["onnx"], probs["torch"], atol=1e-4, rtol=0)
    result = CliRunner().invoke(cli, ["predict-slice", images[0], "--model", str(tmp_path / "slice-onnx"),
                                      "-o", str(tmp_path / "cam-preds"), "--backend", "onnx", "--cam", str(tmp_path)])
    assert result.exit_code == 2 and "--cam needs gradients" in result.output
