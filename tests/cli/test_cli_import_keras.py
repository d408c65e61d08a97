"""``covidctnet import-keras`` on the real official h5: the model directory it writes, its card, the optional
denoiser (model directory or training run directory), and one-line errors that leave nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from covidctnet import CLASS_NAMES
from covidctnet.cli import cli
from covidctnet.core.files import sha256_file
from covidctnet.core.model_dir import load_model_dir, save_model_dir
from covidctnet.models.cnn3d import CovidCTNet3D
from covidctnet.models.keras_import import OFFICIAL_CNN3D_SOURCE, cnn3d_state_dict_from_keras
from covidctnet.models.registry import load_classifier

H5_NAME = "weight_cnn_CovidCtNet_v2_final.h5"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def official_h5(reference_dir):
    return reference_dir / H5_NAME


def _run(*args):
    return CliRunner().invoke(cli, ["import-keras", *map(str, args)])


def _tiny_denoiser():
    from covidctnet.models.bcdunet import BCDUNet

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return BCDUNet(features=2, dense_blocks=1)


def _official_preprocess(**changes):
    from covidctnet.core.config import config_to_dict
    from covidctnet.preprocessing.preprocess import OFFICIAL_PROFILE, PreprocessConfig

    return config_to_dict(PreprocessConfig(**{**OFFICIAL_PROFILE, **changes}))


def _denoiser_model_dir(path, **preprocess_changes):
    """A model directory laid out as `train-denoiser` writes one (component, preprocess, input), tiny weights."""
    net = _tiny_denoiser()
    preprocess = _official_preprocess(**preprocess_changes)
    config = {"name": "tiny-denoiser", "task": "denoise",
              "components": {"denoiser": {"arch": "bcdunet", "kwargs": net.config}},
              "preprocess": preprocess, "input": {"size_xy": preprocess["size_xy"], "channels": 1}}
    save_model_dir(path, config, {"denoiser": net.state_dict()}, "# tiny denoiser\n")
    return net


def test_import_official_without_denoiser(official_h5, tmp_path):
    out = tmp_path / "official"
    result = _run(official_h5, "-o", out)
    assert result.exit_code == 0, result.output
    md = load_model_dir(out)
    assert sorted(md.config["components"]) == ["classifier"]
    assert md.config["preprocess_profile"] == "official"
    assert md.config["preprocess"] == _official_preprocess()
    assert md.config["preprocess"]["size_xy"] == 128
    assert md.config["class_names"] == list(CLASS_NAMES)
    assert (md.config["input"]["depth"], md.config["input"]["size_xy"]) == (50, 128)
    comp = md.component("classifier")
    assert comp["arch"] == "covidctnet3d" and comp["kwargs"]["input_size"] == [50, 128, 128]
    assert comp["source"]["sha256"] == sha256_file(official_h5) == OFFICIAL_CNN3D_SOURCE["sha256"]
    assert comp["source"]["commit"] == OFFICIAL_CNN3D_SOURCE["commit"]

    model = load_classifier(out)
    assert isinstance(model, CovidCTNet3D) and model.input_size == (50, 128, 128)
    assert sum(p.numel() for p in model.parameters()) == 920_715
    expected = cnn3d_state_dict_from_keras(official_h5)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)

    card = (out / "MODEL_CARD.md").read_text()
    for phrase in ("never published", "missing", "No denoiser is included", "cannot use this directory",
                   OFFICIAL_CNN3D_SOURCE["commit"], sha256_file(official_h5), "no license", "Not a medical device"):
        assert phrase in card, phrase


def test_import_with_denoiser_model_dir(official_h5, tmp_path):
    net = _denoiser_model_dir(tmp_path / "den")
    out = tmp_path / "paired"
    result = _run(official_h5, "-o", out, "--denoiser", tmp_path / "den")
    assert result.exit_code == 0, result.output
    md = load_model_dir(out)
    assert sorted(md.config["components"]) == ["classifier", "denoiser"]
    den = md.component("denoiser")
    assert den["arch"] == "bcdunet" and den["kwargs"] == net.config
    assert den["source"]["weights_sha256"] == load_model_dir(tmp_path / "den").weights_sha256("denoiser")
    state = md.state_dict("denoiser")
    for key, value in net.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    card = (out / "MODEL_CARD.md").read_text()
    assert "trained by this project" in card and "never published" in card
    assert "No denoiser is included" not in card


def test_paired_directory_meets_the_predict_contract(official_h5, tmp_path):
    """What `predict` needs from a model directory: a loadable denoiser and classifier, and a `preprocess` config
    whose in-plane size equals the classifier's height and width."""
    from covidctnet.core.config import validate_config
    from covidctnet.models import registry
    from covidctnet.preprocessing.preprocess import PreprocessConfig

    _denoiser_model_dir(tmp_path / "den")
    out = tmp_path / "out"
    assert _run(official_h5, "-o", out, "--denoiser", tmp_path / "den").exit_code == 0
    md = load_model_dir(out)
    pre = validate_config(PreprocessConfig, md.config["preprocess"], "preprocess")
    classifier = load_classifier(md, device="cpu")
    assert pre.profile == "official" and classifier.input_size == (50, pre.size_xy, pre.size_xy)
    denoiser = registry.load_denoiser(out, device="cpu")
    assert denoiser.size_xy == pre.size_xy == md.config["input"]["size_xy"]


def test_denoiser_trained_at_another_size_is_refused(official_h5, tmp_path):
    _denoiser_model_dir(tmp_path / "den", size_xy=240)
    out = tmp_path / "out"
    result = _run(official_h5, "-o", out, "--denoiser", tmp_path / "den")
    assert result.exit_code == 2
    assert "240x240 slices" in result.output and "--profile official" in result.output
    assert not out.exists()


def test_denoiser_of_default_profile_is_flagged(official_h5, tmp_path):
    """A 128x128 denoiser preprocessed with the default profile still pairs, but config and card say so."""
    _denoiser_model_dir(tmp_path / "den", profile="default", out_of_window="clip", interpolation="linear")
    result = _run(official_h5, "-o", tmp_path / "out", "--denoiser", tmp_path / "den")
    assert result.exit_code == 0, result.output
    md = load_model_dir(tmp_path / "out")
    assert md.config["preprocess_profile"] == "default" and md.config["preprocess"]["profile"] == "default"
    assert "differs from `official`" in (tmp_path / "out" / "MODEL_CARD.md").read_text()


def test_import_with_run_dir_holding_model_dir(official_h5, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _denoiser_model_dir(run / "model")
    result = _run(official_h5, "-o", tmp_path / "out", "--denoiser", run)
    assert result.exit_code == 0, result.output
    # recorded relative to the working directory: a shipped model directory names no folder of this machine
    recorded = load_model_dir(tmp_path / "out").component("denoiser")["source"]["path"]
    assert not Path(recorded).is_absolute() and (Path.cwd() / recorded).resolve() == (run / "model").resolve()


def test_import_with_run_dir_raw_safetensors(official_h5, tmp_path):
    """Raw weights + the run's config.yaml giving the BCDUNet kwargs (under `model`)."""
    from safetensors.torch import save_file

    net = _tiny_denoiser()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_file(net.state_dict(), str(run / "checkpoints" / "best.safetensors"))
    (run / "config.yaml").write_text(yaml.safe_dump({"epochs": 3, "model": {"features": 2, "dense_blocks": 1}}))
    result = _run(official_h5, "-o", tmp_path / "out", "--denoiser", run)
    assert result.exit_code == 0, result.output
    den = load_model_dir(tmp_path / "out").component("denoiser")
    assert den["kwargs"] == {"features": 2, "dense_blocks": 1}


def test_denoiser_that_does_not_fit_is_refused(official_h5, tmp_path):
    """Weights of a features=2 BCDU-Net with no kwargs in the run config (defaults: features=32): refused."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    save_file(_tiny_denoiser().state_dict(), str(run / "model.safetensors"))
    out = tmp_path / "out"
    result = _run(official_h5, "-o", out, "--denoiser", run)
    assert result.exit_code == 2
    assert "model.safetensors: denoiser weights do not fit BCDUNet" in result.output
    assert "shape mismatch" in result.output
    assert not out.exists()


def test_no_denoiser_found(official_h5, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    result = _run(official_h5, "-o", out, "--denoiser", tmp_path / "empty")
    assert result.exit_code == 2
    assert "no denoiser found" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_other_architecture_h5_is_refused(reference_dir, tmp_path):
    other = reference_dir / "bcdunet_keras_seeded_random.h5"
    out = tmp_path / "out"
    result = _run(other, "-o", out)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and "not the CovidCTNet 3D CNN" in lines[-1] and str(other) in lines[-1]
    assert "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-written output, no temp folder left


def test_refuses_to_replace_a_folder_that_is_not_a_model_dir(official_h5, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = _run(official_h5, "-o", out)
    assert result.exit_code == 2 and "not a model directory; refusing to replace it" in result.output
    assert (out / "notes.txt").read_text() == "keep me"


def test_replaces_an_existing_model_dir(official_h5, tmp_path):
    out = tmp_path / "md"
    assert _run(official_h5, "-o", out).exit_code == 0
    _denoiser_model_dir(tmp_path / "den")
    assert _run(official_h5, "-o", out, "--denoiser", tmp_path / "den").exit_code == 0
    assert sorted(load_model_dir(out).config["components"]) == ["classifier", "denoiser"]


def test_command_module_does_not_import_torch():
    code = "import sys, covidctnet.cli.import_keras; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
