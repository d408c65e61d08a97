"""Tests of covidctnet.models.registry: every network is rebuilt from its model directory, and what does not fit is
refused in one line that names it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_factories import tiny_denoiser_dir, tiny_predict_model

from covidctnet.core.errors import ModelDirError
from covidctnet.core.model_dir import load_model_dir, save_model_dir
from covidctnet.models.registry import (
    DEFAULT_SLICE_MODEL,
    build_denoiser,
    load_classifier,
    load_denoiser,
    load_slice_model,
    resolve_denoiser_dir,
    state_dict_mismatch,
)


def test_state_dict_mismatch_names_keys_and_shapes():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    assert state_dict_mismatch(model, model.state_dict()) is None
    state = dict(model.state_dict())
    state.pop("1.bias")
    state["0.weight"] = torch.zeros(4, 2)
    state["extra"] = torch.zeros(1)
    text = state_dict_mismatch(model, state)
    assert "1 missing: 1.bias" in text and "1 unexpected: extra" in text
    assert "0.weight: file (4, 2) vs model (3, 2)" in text
    many = {f"k{i}": torch.zeros(1) for i in range(5)}
    assert "5 unexpected: k0, k1, k2 (+2 more)" in state_dict_mismatch(nn.Identity(), many)


def test_classifier_round_trip_and_wrong_weights(tmp_path):
    path = tiny_predict_model(tmp_path / "m")
    md = load_model_dir(path)
    model = load_classifier(md)
    entry = md.component("classifier")
    assert not model.training and model.spec == {k: v for k, v in entry.items() if k != "weights"}
    for name, value in load_classifier(path).state_dict().items():
        assert torch.equal(value, md.state_dict("classifier")[name])
    bad = tiny_predict_model(tmp_path / "bad", classifier_state={"w": torch.zeros(1)})
    with pytest.raises(ModelDirError, match="classifier weights do not fit arch 'covidctnet3d'.*unexpected: w"):
        load_classifier(bad)
    with pytest.raises(ModelDirError, match="lesion"):
        load_classifier(path, component="lesion")


def test_denoiser_from_a_run_folder(tmp_path):
    model_dir = tiny_denoiser_dir(tmp_path / "run" / "model", size=32)
    assert resolve_denoiser_dir(tmp_path / "run") == model_dir and resolve_denoiser_dir(model_dir) == model_dir
    den = load_denoiser(tmp_path / "run", device="cpu")
    assert den.size_xy == 32 and den.path == model_dir and len(den.weights_sha256) == 64
    assert den.preprocess["size_xy"] == 32 and not den.model.training
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert den.model(x).shape == (1, 1, 32, 32)
    with pytest.raises(ModelDirError, match="not a model directory"):
        resolve_denoiser_dir(tmp_path)


def test_denoiser_of_another_architecture_is_refused(tmp_path):
    net = build_denoiser({"features": 4})
    config = {"name": "x", "input": {"size_xy": 32},
              "components": {"denoiser": {"arch": "unet", "kwargs": dict(net.config)}}}
    save_model_dir(tmp_path / "m", config, {"denoiser": net.state_dict()}, "# x\n")
    with pytest.raises(ModelDirError, match="denoiser architecture 'unet' is not supported"):
        load_denoiser(tmp_path / "m", device="cpu")


@pytest.mark.skipif(not DEFAULT_SLICE_MODEL.is_dir(), reason="no bundled slice model in this installation")
def test_bundled_slice_model_loads_with_its_hash():
    model, config = load_slice_model()
    md = load_model_dir(DEFAULT_SLICE_MODEL)
    assert config["task"] == "slice" and config["weights_sha256"] == md.weights_sha256("model")
    assert not model.training


def test_slice_model_refuses_another_task(tmp_path):
    path = tiny_denoiser_dir(tmp_path / "den", size=32)
    with pytest.raises(ModelDirError, match="not a slice model directory"):
        load_slice_model(path)
