"""Tests of ``covidctnet train-lesion-model`` (covidctnet.training.lesion) and of the lesion evidence it feeds:
``slice-scores --evidence lesion`` and a ``predict`` whose classifier follows the lesion evidence. Real data: the
normal001 excerpt (32 slices) and a few real MosMed masks; a tiny U-Net and a few steps, so that the test checks the
plumbing, not the model's quality (docs/validation.md measures that)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from covidctnet.cli import cli
from covidctnet.core.config import load_config
from covidctnet.core.errors import ConfigError
from covidctnet.core.model_dir import load_model_dir, save_model_dir
from covidctnet.inference.lesion_maps import lesion_probability
from covidctnet.models.registry import DEMO_MODEL, LESION_COMPONENT, load_lesion_model
from covidctnet.training.lesion import LesionModelConfig
from tests.data_paths import REPO_ROOT, require_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"size_xy": 128, "channels": [4, 8], "strides": [2], "num_res_units": 0, "batch_size": 4, "epochs": 1,
        "steps_per_epoch": 3, "val_max_slices": 4, "device": "cpu", "seed": 3}


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lesion")
    masks = tmp / "masks"
    masks.mkdir()
    for path in sorted(require_data("mosmed-masks", "masks").glob("*_mask.nii.gz"))[:2]:
        (masks / path.name).symlink_to(path)
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    run = tmp / "run"
    res = CliRunner().invoke(cli, ["train-lesion-model", str(require_data("ct-dicom", "control-normal001")), "-o",
                                   str(run), "--config", str(cfg), "--lesion-masks", str(masks)])
    assert res.exit_code == 0, res.output
    return run


def test_yaml_equals_dataclass():
    assert load_config(LesionModelConfig, REPO_ROOT / "configs" / "lesion_model.yaml") == LesionModelConfig()


@pytest.mark.parametrize("override, match", [
    ({"channels": [4, 8], "strides": [2, 2]}, "one entry more"),
    ({"size_xy": 100}, "multiple of 8"),
    ({"synthesis": {"ggo_hu": [-300, -750]}}, "ggo_hu"),
    ({"synthesis": {"no_such_key": 1}}, "unknown key"),
])
def test_bad_config_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(LesionModelConfig, None, override)


def test_run_writes_a_lesion_model_directory(lesion_run):
    md = load_model_dir(lesion_run / "model")
    assert md.config["task"] == "lesion" and md.component(LESION_COMPONENT)["arch"] == "unet2d"
    assert md.config["training"]["n_lesion_shapes"] > 0 and md.config["validation"]["val_dice"] >= 0
    assert (lesion_run / "samples" / "epoch_000.png").is_file() and (lesion_run / "metrics.csv").is_file()
    model = load_lesion_model(lesion_run, "cpu")  # the run folder resolves to its model/
    rng = np.random.default_rng(0)
    array = rng.random((128, 128, 5), dtype=np.float32)
    lung = np.zeros(array.shape, bool)
    lung[30:90, 30:90, 1:4] = True
    prob = lesion_probability(array, lung, model)
    assert prob.shape == array.shape and prob.dtype == np.float32
    assert (prob[~lung] == 0).all() and 0 <= prob.min() and prob.max() <= 1 and prob[lung].max() > 0


def _table(folder, study="control-normal001"):
    with open(folder / f"{study}_slices.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_slice_scores_with_lesion_evidence(lesion_run, tmp_path):
    scan = require_data("ct-dicom", "control-normal001")
    res = CliRunner().invoke(cli, ["slice-scores", str(scan), "-o", str(tmp_path / "s"), "--lesion-model",
                                   str(lesion_run), "--evidence", "lesion", "--backend", "torch", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = _table(tmp_path / "s")
    assert len(rows) == 32 and {r["evidence"] for r in rows} == {"lesion"}
    lung_rows = [r for r in rows if r["lesion_score"]]
    assert lung_rows and all(r["evidence_score"] == r["lesion_score"] for r in rows)
    assert all(0.0 <= float(r["lesion_score"]) <= 1.0 for r in lung_rows)


def test_lesion_evidence_without_a_lesion_model_is_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["slice-scores", str(require_data("ct-dicom", "control-normal001")), "-o",
                                   str(tmp_path / "s"), "--model", str(tmp_path / "m"), "--evidence", "lesion"])
    assert res.exit_code == 2
    plain = tmp_path / "plain"
    md = load_model_dir(DEMO_MODEL)
    states = {c: md.state_dict(c) for c in ("classifier", "denoiser")}
    config = {k: v for k, v in md.config.items() if k != "evidence"}
    config["components"] = {c: md.config["components"][c] for c in states}
    save_model_dir(plain, config, states, "# test model\n")
    res = CliRunner().invoke(cli, ["slice-scores", str(require_data("ct-dicom", "control-normal001")), "-o",
                                   str(tmp_path / "s2"), "--model", str(plain), "--evidence", "lesion"])
    assert res.exit_code == 2 and "no lesion component" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s2" / "control-normal001_slices.csv").exists()


def test_predict_follows_the_recorded_evidence(lesion_run, tmp_path):
    """A model directory whose config says ``evidence: lesion`` gives its classifier the lesion map."""
    md = load_model_dir(DEMO_MODEL)
    lesion = load_model_dir(lesion_run / "model")
    states = {c: md.state_dict(c) for c in ("classifier", "denoiser")} | {LESION_COMPONENT:
                                                                         lesion.state_dict(LESION_COMPONENT)}
    config = {k: v for k, v in md.config.items() if k not in ("evidence",)}
    config["components"] = {**{c: md.config["components"][c] for c in ("classifier", "denoiser")},
                            LESION_COMPONENT: lesion.component(LESION_COMPONENT)}
    scan = require_data("ct-dicom", "control-normal001")
    out = {}
    for evidence in ("residual", "lesion"):
        model = tmp_path / f"m_{evidence}"
        save_model_dir(model, {**config, "evidence": evidence}, states, "# test model\n")
        res = CliRunner().invoke(cli, ["predict", str(scan), "-o", str(tmp_path / evidence), "--model", str(model),
                                       "--backend", "torch", "--device", "cpu", "--slice-scores"])
        assert res.exit_code == 0, res.output
        out[evidence] = json.loads((tmp_path / evidence / "predictions" / "control-normal001.json").read_text())
        assert out[evidence]["evidence"] == evidence
        assert {r["evidence"] for r in _table(tmp_path / evidence)} == {"lesion"}  # the table's default evidence
    assert out["residual"]["p_covid"] != out["lesion"]["p_covid"]  # the classifier saw another volume
    assert out["lesion"]["seconds"].get("lesion", 0) > 0
