"""Tests of train-slice / pretrain-slice (covidctnet.training.slice) on small real subsets of the UCSD data."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from covidctnet.core.checkpoint import load_checkpoint
from covidctnet.core.config import load_config
from covidctnet.core.errors import ConfigError
from covidctnet.core.model_dir import load_model_dir
from covidctnet.data.ucsd import SliceDataset, find_records, ucsd_records
from covidctnet.models.registry import load_slice_model
from covidctnet.models.slice import build_slice_model
from covidctnet.training.simclr import PretrainSliceConfig, nt_xent_loss, pretrain_slice
from covidctnet.training.slice import (
    SliceTrainConfig,
    dataset_cam_maps,
    init_slice_weights,
    slice_metrics,
    train_slice,
    youden_threshold,
)

REPO = Path(__file__).resolve().parents[2]


# tiny and fast: 16 training images at 48 px, two steps per epoch, a quarter-width ResNet-18
TINY = {"size": 48, "width": 0.25, "batch_size": 8, "steps_per_epoch": 2, "device": "cpu", "lr": 1e-3}


@pytest.mark.parametrize("cls, name", [(SliceTrainConfig, "slice.yaml"), (PretrainSliceConfig, "pretrain_slice.yaml")])
def test_yaml_defaults_match_dataclass(cls, name):
    assert load_config(cls, REPO / "configs" / name) == cls()


@pytest.mark.parametrize("override", [{"size": 8}, {"threshold": 1.0}, {"arch": "vgg"}, {"min_lr": 1.0},
                                      {"crop_scale": 0.0}, {"lungmask": True}, {"ema": 1.0}, {"ema": 0.0}])
def test_config_validation(override):
    with pytest.raises(ConfigError):
        load_config(SliceTrainConfig, None, override)


def test_slice_metrics_covid_positive():
    labels = np.array([1, 1, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.3, 0.6, 0.1])
    m = slice_metrics(labels, p, 0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # tp 2, fp 1, fn 1
    assert m["auc"] == pytest.approx(5 / 6)
    flipped = slice_metrics(1 - labels, p, 0.5)  # if COVID were the negative class the numbers would differ
    assert flipped["auc"] == pytest.approx(1 / 6)


def test_youden_threshold():
    labels = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.7, 0.6, 0.8, 0.9])
    # J = 2/3 at 0.8 (sens 2/3, spec 1) and at 0.6 (sens 1, spec 2/3): the higher one, midway to the next score
    assert youden_threshold(labels, p) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    p = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.2, 200), 0, 1)  # two overlapping score distributions
    t = youden_threshold(labels, p)
    best = slice_metrics(labels, p, t)
    j = lambda m: m["sensitivity"] + m["specificity"]  # noqa: E731
    assert all(j(best) >= j(slice_metrics(labels, p, c)) - 1e-12 for c in np.unique(p))
    assert not np.isin(t, p) and 0.4 < t < 0.65
    with pytest.raises(ConfigError, match="both classes"):
        youden_threshold(np.ones(4), np.linspace(0, 1, 4))


def test_nt_xent():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=g)
    matched = nt_xent_loss(z, z + 0.01 * torch.randn(8, 16, generator=g), 0.2)
    shuffled = nt_xent_loss(z, z[torch.randperm(8, generator=g)], 0.2)
    assert matched < shuffled
    assert matched > 0


def test_few_steps_lower_the_loss_on_real_slices(mini_ucsd):
    torch.manual_seed(0)
    subset = ucsd_records(mini_ucsd, "train")
    assert sorted(r.label for r in subset) == [0] * 8 + [1] * 8
    ds = SliceDataset(subset, 64)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    y = torch.tensor([r.label for r in subset])
    model = build_slice_model("resnet18", width=0.25)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    model.eval()
    with torch.no_grad():
        before = float(loss())
    model.train()
    for _ in range(8):
        opt.zero_grad()
        loss().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = float(loss())
    assert after < 0.8 * before, (before, after)


def test_train_slice_outputs(mini_ucsd, tmp_path):
    cfg = load_config(SliceTrainConfig, None, {**TINY, "epochs": 2})
    summary = train_slice(mini_ucsd, tmp_path / "full", cfg, command="covidctnet train-slice test")
    run = tmp_path / "full"
    for name in ("metrics.csv", "loss_curve.png", "roc.png", "confusion.png", "val_preds.csv", "val_metrics.json",
                 "config.yaml", "checkpoints/best.pt", "model/model.safetensors", "model/MODEL_CARD.md"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"] and {"val_auc", "val_acc", "val_f1", "val_loss"} <= set(rows[0])
    preds = list(csv.DictReader((run / "val_preds.csv").open()))
    assert len(preds) == 12 and {p["label"] for p in preds} == {"covid", "noncovid"}
    assert all(p["label"] == ("covid" if "CT_COVID" in p["file"] else "noncovid") for p in preds)
    best_auc = max(float(r["val_auc"]) for r in rows)
    assert summary.val["auc"] == pytest.approx(best_auc, abs=1e-4)  # the exported model is the best epoch
    model, config = load_slice_model(run / "model")
    assert config["task"] == "slice" and config["preprocess"]["size"] == 48
    assert "covidctnet train-slice test" in (run / "model" / "MODEL_CARD.md").read_text()
    assert next(model.parameters()).shape[1] == 1  # no lung-mask channel
    # predict-slice --cam's colour range: the 99th percentile of the exported model's maps over the validation split
    val = SliceDataset(find_records(mini_ucsd, "val"), config["preprocess"]["size"], False, None)
    maps = dataset_cam_maps(model, val)
    top = float(np.percentile(maps, 99.0))
    if top > 0:
        assert config["cam_scale"]["images"] == "validation split" and config["cam_scale"]["n_images"] == len(val)
        assert config["cam_scale"]["value"] == pytest.approx(top, rel=1e-4)
    else:  # a barely trained model may show no evidence: no scale then, and still a model directory
        assert "cam_scale" not in config


def test_train_slice_resume_matches(mini_ucsd, tmp_path, monkeypatch):
    cfg = load_config(SliceTrainConfig, None, {**TINY, "epochs": 2, "lung_mask": True})
    train_slice(mini_ucsd, tmp_path / "full", cfg)
    # stop after epoch 0 of the same 2-epoch schedule (same cosine period), as if the process had been killed
    from covidctnet.training import trainer as training

    original = training.Trainer.fit

    def one_epoch(self, resume=False):
        self.max_epochs = 1
        return original(self, resume)

    monkeypatch.setattr(training.Trainer, "fit", one_epoch)
    train_slice(mini_ucsd, tmp_path / "cut", cfg)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["epoch"] == 0
    train_slice(mini_ucsd, tmp_path / "cut", cfg, resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["model"]
    assert a["conv1.weight"].shape[1] == 2  # slice + lung mask
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_then_init(mini_ucsd, tmp_path):
    cfg = load_config(PretrainSliceConfig, None, {**TINY, "epochs": 2})
    summary = pretrain_slice(mini_ucsd, tmp_path / "pre", cfg)
    enc_dir = summary.model_dir
    md = load_model_dir(enc_dir)
    assert md.config["task"] == "slice-encoder"
    enc = md.state_dict("encoder")
    assert not any(k.startswith("fc.") for k in enc)
    train_cfg = load_config(SliceTrainConfig, None, {**TINY, "init": str(enc_dir)})
    model = build_slice_model("resnet18", width=0.25)
    init_slice_weights(model, enc_dir, train_cfg)
    assert torch.equal(model.state_dict()["conv1.weight"], enc["conv1.weight"])
    with pytest.raises(ConfigError, match="same arch, width and lung_mask"):
        init_slice_weights(build_slice_model("resnet18", width=0.5), enc_dir, dataclasses.replace(train_cfg, width=0.5))
