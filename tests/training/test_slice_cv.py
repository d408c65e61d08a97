"""Tests of cv-slice (covidctnet.training.slice_cv): source groups, grouped folds, nested thresholds, a tiny run."""

from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidctnet.core.config import load_config
from covidctnet.core.errors import ConfigError
from covidctnet.data.ucsd import SliceRecord
from covidctnet.models.registry import load_slice_model
from covidctnet.training.slice import SliceTrainConfig, youden_threshold
from covidctnet.training.slice_cam import calibrate_cam
from covidctnet.training.slice_cv import (
    assign_folds,
    compare_cv_runs,
    cv_slice,
    nested_thresholds,
    source_groups,
)


def _rec(name: str, label: int) -> SliceRecord:
    return SliceRecord(Path("CT_COVID" if label else "CT_NonCOVID") / name, label)


def test_source_groups_follow_the_ucsd_names():
    recs = [_rec("2020.02.22.20024927-p19-62.png", 1), _rec("2020.02.22.20024927-p20-1%3.png", 1),
            _rec("2020.03.01.20029769-p21-73_1.png", 1), _rec("39%0.jpg", 0), _rec("39%8.jpg", 0),
            _rec("39.jpg", 0), _rec("40%0.jpg", 0), _rec("1306.png", 0), _rec("1309.png", 0), _rec("1313.png", 0),
            _rec("1328.png", 0), _rec("39.png", 0), _rec("covid-19-pneumonia-15%1.png", 1)]
    g = source_groups(recs)
    assert g[0] == g[1] != g[2]  # one paper, however its pages and panels are numbered
    assert g[3] == g[4] == g[5] != g[6]  # panels of figure 39 (and its single-image sibling), not figure 40
    assert g[7] == g[8] == g[9] != g[10]  # a run of PNG numbers with gaps <= 5, then a gap of 15
    assert g[11] != g[5]  # 39.png is not figure 39.jpg
    assert g[12] == "covid:covid-19-pneumonia-15"
    assert all(x.startswith("covid:") for x, r in zip(g, recs) if r.label == 1)
    assert all(x.startswith("noncovid:") for x, r in zip(g, recs) if r.label == 0)
    assert source_groups(recs, png_gap=2)[8] != source_groups(recs, png_gap=2)[7]


def _grouped(n_groups: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 12, n_groups)
    group_label = rng.integers(0, 2, n_groups)
    groups = np.repeat([f"g{i}" for i in range(n_groups)], sizes)
    labels = np.repeat(group_label, sizes)
    return labels, groups


def test_folds_keep_groups_whole_stratified_and_deterministic():
    labels, groups = _grouped()
    fold = assign_folds(labels, groups, 5, seed=0)
    assert set(fold) == set(range(5))
    folds_of = defaultdict(set)
    for g, k in zip(groups, fold):
        folds_of[g].add(k)
    assert all(len(v) == 1 for v in folds_of.values())  # no group straddles two folds
    share = labels.mean()
    for k in range(5):  # class shares near the overall one (groups of up to 11 images limit how near)
        assert abs(labels[fold == k].mean() - share) < 0.25
    assert np.array_equal(fold, assign_folds(labels, groups, 5, seed=0))
    assert not np.array_equal(fold, assign_folds(labels, groups, 5, seed=1))


def test_fold_stratification_beats_chance():
    # many small groups: StratifiedGroupKFold balances classes far better than the worst case would allow
    labels, groups = _grouped(200, seed=3)
    fold = assign_folds(labels, groups, 5, seed=0)
    shares = [labels[fold == k].mean() for k in range(5)]
    assert max(shares) - min(shares) < 0.1


def test_folds_need_enough_groups():
    labels, groups = np.array([1, 1, 0, 0, 0]), np.array(["a", "a", "b", "c", "d"])
    with pytest.raises(ConfigError, match="source groups"):
        assign_folds(labels, groups, 3)
    with pytest.raises(ConfigError, match=">= 2"):
        assign_folds(labels, groups, 1)


def test_nested_thresholds_ignore_their_own_fold():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)
    p = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.2, 120), 0, 1)
    fold = np.arange(120) % 3
    t = nested_thresholds(labels, p, fold)
    assert t[1] == youden_threshold(labels[fold != 1], p[fold != 1])
    changed = p.copy()
    changed[fold == 0] = rng.uniform(0, 1, (fold == 0).sum())  # fold 0's own scores do not move its threshold
    t2 = nested_thresholds(labels, changed, fold)
    assert t2[0] == t[0] and t2[1] != t[1]


@pytest.fixture(scope="module")
def tiny_grouped_data(tmp_path_factory) -> Path:
    """A folder-per-class dataset of 24 synthetic 40 px images: 4 COVID papers and 4 non-COVID figures, 3 each."""
    root = tmp_path_factory.mktemp("grouped")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("covid", "noncovid"):
            (root / split / cls).mkdir(parents=True)
    for g in range(4):
        split = "val" if g == 3 else "train"
        for i in range(3):
            bright = rng.uniform(0.5, 0.8, (40, 40))
            Image.fromarray((bright * 255).astype(np.uint8)).save(
                root / split / "covid" / f"2020.03.0{g}.2003{g}-p{i + 1}-{i}.png")
            Image.fromarray((rng.uniform(0.1, 0.4, (40, 40)) * 255).astype(np.uint8)).save(
                root / split / "noncovid" / f"{20 + g}%{i}.jpg")
    return root


def test_tiny_cv_run(tiny_grouped_data, tmp_path):
    cfg = load_config(SliceTrainConfig, None, {"size": 32, "width": 0.25, "batch_size": 4, "epochs": 1,
                                               "steps_per_epoch": 2, "device": "cpu", "lung_mask": True,
                                               "source_aug": True})
    out = tmp_path / "cv"
    partial = cv_slice(tiny_grouped_data, out, cfg, folds=2, only_folds=[1], n_boot=50)
    assert partial == {"folds_done": [1]}
    result = cv_slice(tiny_grouped_data, out, cfg, folds=2, n_boot=50, command="covidctnet cv-slice DATA -o OUT")
    with open(out / "oof_preds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 24 and len({r["file"] for r in rows}) == 24  # every image out-of-fold exactly once
    folds_of = defaultdict(set)
    for r in rows:
        folds_of[r["group"]].add(r["fold"])
    assert len(folds_of) == 8 and all(len(v) == 1 for v in folds_of.values())
    p = np.array([float(r["p_covid"]) for r in rows])
    assert np.all((p >= 0) & (p <= 1))
    assert result["n"] == 24 and len(result["fold_auc"]) == 2 and len(result["nested_thresholds"]) == 2
    lo, hi = result["auc"]["cluster_ci"]
    assert lo <= result["auc"]["value"] <= hi
    assert json.loads((out / "cv_metrics.json").read_text())["n"] == 24
    for name in ("roc.png", "confusion.png", "fold0/model/model.safetensors", "fold1/heldout_preds.csv"):
        assert (out / name).is_file()
    model, config = load_slice_model(out / "model")
    assert len(model.members) == config["components"]["model"]["members"] == 2
    assert config["threshold"] == pytest.approx(result["pooled_youden_threshold"])
    assert config["cross_validation"]["expected_performance"]["auc"] == pytest.approx(result["auc"]["value"])
    # the Grad-CAM colour scale: the ensemble's maps over every out-of-fold image; the fold models' over their fold's
    scale = config["cam_scale"]
    assert scale["images"] == "out-of-fold" and scale["n_images"] == 24 and scale["value"] > 0
    fold_scale = load_slice_model(out / "fold1" / "model")[1]["cam_scale"]
    assert fold_scale["images"] == "held-out fold" and fold_scale["n_images"] == int((np.array(
        [r["fold"] for r in rows]) == "1").sum())
    # calibrate-cam recomputes it from the data alone, and refuses other data
    assert calibrate_cam(out / "model", tiny_grouped_data, device="cpu").value == pytest.approx(scale["value"],
                                                                                              rel=1e-5)
    shutil.copytree(tiny_grouped_data, tmp_path / "other")
    next((tmp_path / "other" / "train" / "covid").iterdir()).unlink()
    with pytest.raises(ConfigError, match="cross-validated on 24"):
        calibrate_cam(out / "model", tmp_path / "other", device="cpu")
    text = (out / "model" / "config.yaml").read_text() + (out / "model" / "MODEL_CARD.md").read_text()
    assert str(tmp_path) not in text and str(tiny_grouped_data) not in text  # no absolute path in what ships
    # finished folds are reused, not retrained
    stamp = (out / "fold0" / "model" / "model.safetensors").stat().st_mtime_ns
    cv_slice(tiny_grouped_data, out, cfg, folds=2, n_boot=50)
    assert (out / "fold0" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    same = compare_cv_runs(out, out, n_boot=50)
    assert same["difference"] == 0 and same["cluster_ci"] == [0, 0]
    with pytest.raises(ConfigError, match="other images, groups or folds"):
        cv_slice(tiny_grouped_data, out, cfg, folds=3, n_boot=50)
