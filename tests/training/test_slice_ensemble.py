"""``covidctnet ensemble-slice`` (covidctnet.training.slice_ensemble) on two tiny slice models trained on real UCSD
images."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from covidctnet.cli import cli
from covidctnet.core.config import load_config
from covidctnet.core.errors import ConfigError
from covidctnet.inference.onnx_export import export_onnx
from covidctnet.models.registry import load_slice_model
from covidctnet.training.slice import SliceTrainConfig, train_slice, youden_threshold
from covidctnet.training.slice_ensemble import ensemble_slice_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"size": 48, "width": 0.25, "batch_size": 8, "steps_per_epoch": 2, "device": "cpu", "lr": 1e-3, "epochs": 1,
        "lung_mask": True}


@pytest.fixture(scope="module")
def members(mini_ucsd, tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    dirs = []
    for seed in (0, 1):
        train_slice(mini_ucsd, root / f"s{seed}", load_config(SliceTrainConfig, None, {**TINY, "seed": seed}))
        dirs.append(root / f"s{seed}" / "model")
    return dirs


def _scores(out_dir):
    return {r["file"]: float(r["p_covid"]) for r in csv.DictReader((out_dir / "preds.csv").open())}


def test_ensemble_is_the_mean_of_its_members(members, mini_ucsd, tmp_path):
    out = tmp_path / "ens"
    result = CliRunner().invoke(cli, ["ensemble-slice", *map(str, members), "-o", str(out), "--data", str(mini_ucsd),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["components"]["model"]["members"] == 2 and len(config["ensemble"]["members"]) == 2
    assert config["validation"]["n"] == 12 and (out / "roc.png").is_file() and (out / "val_preds.csv").is_file()
    assert config["cam_scale"]["images"] == "validation split" and config["cam_scale"]["n_images"] == 12
    images = mini_ucsd / "CT_COVID"
    scores = {}
    for name, model in (("a", members[0]), ("b", members[1]), ("ens", out)):
        res = CliRunner().invoke(cli, ["predict-slice", str(images), "--model", str(model), "-o",
                                       str(tmp_path / f"{name}-preds"), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        scores[name] = _scores(tmp_path / f"{name}-preds")
    assert len(scores["ens"]) == 14
    for f, p in scores["ens"].items():
        assert p == pytest.approx((scores["a"][f] + scores["b"][f]) / 2, abs=1e-5)
    assert any(abs(scores["a"][f] - scores["b"][f]) > 1e-3 for f in scores["ens"])  # the members differ
    # the ensemble's validation AUC is recomputed from its own predictions, not copied from a member
    preds = list(csv.DictReader((out / "val_preds.csv").open()))
    assert len(preds) == 12 and {p["label"] for p in preds} == {"covid", "noncovid"}
    # Grad-CAM through all members
    res = CliRunner().invoke(cli, ["predict-slice", str(next(images.iterdir())), "--model", str(out), "-o",
                                   str(tmp_path / "cam-preds"), "--cam", str(tmp_path / "cams"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "cams").glob("*_cam.png"))) == 1


def test_ensemble_exports_to_onnx(members, mini_ucsd, tmp_path):
    ens = ensemble_slice_models(members, tmp_path / "ens")["model_dir"]
    onnx_dir = export_onnx(ens, tmp_path / "onnx").out_dir
    images = mini_ucsd / "CT_NonCOVID"
    for backend, model in (("torch", ens), ("onnx", onnx_dir)):
        res = CliRunner().invoke(cli, ["predict-slice", str(images), "--model", str(model), "-o",
                                       str(tmp_path / backend), "--backend", backend, "--device", "cpu"])
        assert res.exit_code == 0, res.output
    torch_p, onnx_p = _scores(tmp_path / "torch"), _scores(tmp_path / "onnx")
    np.testing.assert_allclose([onnx_p[f] for f in torch_p], list(torch_p.values()), atol=1e-4)


def test_threshold_chosen_on_validation(members, mini_ucsd, tmp_path):
    out = tmp_path / "ens"
    res = CliRunner().invoke(cli, ["ensemble-slice", *map(str, members), "-o", str(out), "--data", str(mini_ucsd),
                                   "--threshold", "youden", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    preds = list(csv.DictReader((out / "val_preds.csv").open()))
    labels = np.array([r["label"] == "covid" for r in preds], int)
    p = np.array([float(r["p_covid"]) for r in preds])
    t = config["threshold"]
    assert t == pytest.approx(youden_threshold(labels, p), abs=1e-5)  # val_preds are rounded to 6 decimals
    assert [r["predicted"] == "covid" for r in preds] == list(p >= t)
    assert config["threshold_selection"]["n"] == 12 and "validation_at_0.5" in config["threshold_selection"]
    assert "Youden" in (out / "MODEL_CARD.md").read_text()
    # predict-slice applies the ensemble's own threshold
    res = CliRunner().invoke(cli, ["predict-slice", str(mini_ucsd / "CT_NonCOVID"), "--model", str(out), "-o",
                                   str(tmp_path / "p"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "p" / "preds.csv").open()))
    assert rows and all((r["predicted"] == "covid") == (float(r["p_covid"]) >= t) for r in rows)
    for args, message in ((["--threshold", "youden"], "give --data"), (["--threshold", "1.5"], "(0, 1)"),
                          (["--threshold", "high"], "'youden'")):
        res = CliRunner().invoke(cli, ["ensemble-slice", *map(str, members), "-o", str(tmp_path / "bad"), *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "bad").exists()


def test_members_must_match(members, mini_ucsd, tmp_path):
    other = tmp_path / "other"
    train_slice(mini_ucsd, other, load_config(SliceTrainConfig, None, {**TINY, "lung_mask": False}))
    res = CliRunner().invoke(cli, ["ensemble-slice", str(members[0]), str(other / "model"), "-o", str(tmp_path / "e")])
    assert res.exit_code == 2 and "differs from" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "e").exists()
    with pytest.raises(ConfigError, match="at least 2"):
        ensemble_slice_models(members[:1], tmp_path / "e")
    ens = ensemble_slice_models(members, tmp_path / "ens")["model_dir"]
    with pytest.raises(ConfigError, match="already an ensemble"):
        ensemble_slice_models([ens, members[0]], tmp_path / "e2")
    model, config = load_slice_model(ens)
    assert "validation" not in config  # not scored without --data
    assert len(model.members) == 2
