"""Tests of covidctnet.training.denoiser and ``covidctnet train-denoiser`` on the real control series (64x64)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from data_paths import CONTROL, SIZE, preprocessed_control

from covidctnet.cli import cli
from covidctnet.core.checkpoint import load_checkpoint
from covidctnet.core.config import load_config
from covidctnet.core.errors import ConfigError
from covidctnet.core.model_dir import load_model_dir
from covidctnet.data.control_slices import (
    ControlSliceDataset,
    load_slices,
    noise_transform_kwargs,
    split_control_slices,
)
from covidctnet.models.registry import build_denoiser, load_denoiser
from covidctnet.training.denoiser import DenoiserConfig, denoiser_loss
from covidctnet.training.trainer import TIMING_COLUMNS

REPO_ROOT = Path(__file__).resolve().parents[2]
# A tiny but real configuration: the official recipe (BCE, Adam, half-noised batches) with a narrow network and few
# steps, so one epoch takes about a second on a shared CPU.
TINY = {"features": 4, "batch_size": 4, "steps_per_epoch": 3, "val_batch_size": 16, "slices_per_study": 24,
        "seed": 5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return preprocessed_control(tmp_path_factory)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _run(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_yaml_equals_dataclass():
    assert load_config(DenoiserConfig, REPO_ROOT / "configs" / "denoiser.yaml") == DenoiserConfig()
    keys = set(yaml.safe_load((REPO_ROOT / "configs" / "denoiser.yaml").read_text()))
    assert keys == {f.name for f in fields(DenoiserConfig)}


@pytest.mark.parametrize("override, match", [
    ({"size_xy": 60}, "multiple of 8"),
    ({"features": 3}, "even"),
    ({"dense_blocks": 2}, "D1"),
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"noise_scale_range": [30, 10]}, "noise_scale_range"),
    ({"loss": "hinge"}, "loss"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_config_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DenoiserConfig, None, override)


def test_official_defaults():
    cfg = DenoiserConfig()
    assert (cfg.loss, cfg.lr, cfg.batch_size, cfg.features, cfg.dense_blocks) == ("bce", 1e-3, 5, 32, 3)
    assert cfg.noise_fraction == 0.5 and cfg.noise_octaves == 10 and tuple(cfg.noise_scale_range) == (10, 30)


def test_a_few_steps_lower_the_loss(data_dir):
    stacks = load_slices(data_dir, [CONTROL])
    split = split_control_slices({CONTROL: stacks[CONTROL].shape[0]})
    ds = ControlSliceDataset(stacks, split.train, seed=0, noise_kwargs=noise_transform_kwargs(SIZE))
    batch = ds.collate([ds[i] for i in range(0, len(ds), len(ds) // 6)][:6])  # 3 noised + 3 clean real slices
    torch.manual_seed(0)
    model = build_denoiser(DenoiserConfig(features=8).model_kwargs())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            value = float(denoiser_loss("bce", model(batch["image"]), batch["target"]))
        model.train()
        return value

    before = loss_now()
    for _ in range(12):
        opt.zero_grad()
        denoiser_loss("bce", model(batch["image"]), batch["target"]).backward()
        opt.step()
    after = loss_now()
    assert after < before - 0.005, (before, after)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _metrics(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "metrics.csv").open()))


def test_cli_train_resume_is_exact_and_writes_a_model_dir(data_dir, tiny_config, tmp_path):
    common = [str(data_dir), "--config", str(tiny_config), "--device", "cpu", "--studies", CONTROL]
    full, cut = tmp_path / "full", tmp_path / "cut"
    res = _run(["train-denoiser", *common, "-o", str(full), "--epochs", "2"])
    assert res.exit_code == 0, res.output
    res = _run(["train-denoiser", *common, "-o", str(cut), "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(cut / "checkpoints" / "last.pt")["epoch"] == 0
    # without --resume an existing run is never overwritten
    res = CliRunner().invoke(cli, ["train-denoiser", *common, "-o", str(cut), "--epochs", "2"])
    assert res.exit_code == 2 and "--resume" in res.output
    # resume: the run's own config.yaml is used (no --config, no --studies: data.yaml gives them)
    res = _run(["train-denoiser", str(data_dir), "-o", str(cut), "--epochs", "2", "--resume", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    skip = set(TIMING_COLUMNS)
    rows_a = [{k: v for k, v in r.items() if k not in skip} for r in _metrics(full)]
    rows_b = [{k: v for k, v in r.items() if k not in skip} for r in _metrics(cut)]
    assert rows_a == rows_b and len(rows_a) == 2
    # outputs
    row = _metrics(full)[-1]
    for key in ("val_loss", "val_psnr", "val_ssim", "val_psnr_noisy", "val_ssim_noisy", "val_psnr_clean"):
        assert key in row and float(row[key]) == float(row[key])  # present and not NaN
    assert float(row["train_samples_per_s"]) > 0
    for name in ("loss_curve.png", "samples/epoch_000.png", "samples/epoch_001.png", "data.yaml", "config.yaml"):
        assert (full / name).is_file(), name
    data = yaml.safe_load((full / "data.yaml").read_text())
    assert data["mode"] == "slices" and data["train_ids"] == [CONTROL] and data["n_train_slices"] == 24
    md = load_model_dir(full / "model")
    comp = md.config["components"]["denoiser"]
    assert comp["arch"] == "bcdunet" and comp["kwargs"]["features"] == 4
    assert md.config["preprocess"]["size_xy"] == SIZE and md.config["preprocess"]["profile"] == "default"
    best = load_checkpoint(full / "checkpoints" / "best.pt")
    exported = md.state_dict("denoiser")
    assert all(torch.equal(exported[k], best["model"][k]) for k in best["model"])
    card = (full / "model" / "MODEL_CARD.md").read_text()
    best_row = _metrics(full)[best["epoch"]]
    assert CONTROL in card and "Not a medical device" in card and "24 slices" in card
    assert f"{float(best_row['val_psnr']):.2f}" in card and f"{float(best_row['val_psnr_noisy']):.2f}" in card
    # the run folder itself loads as a denoiser (its model/)
    den = load_denoiser(full, "cpu")
    assert den.size_xy == SIZE and den.weights_sha256 == md.weights_sha256("denoiser")


def test_cli_errors_are_one_line(data_dir, tiny_config, tmp_path):
    run = CliRunner().invoke
    res = run(cli, ["train-denoiser", str(data_dir), "-o", str(tmp_path / "r"), "--device", "cpu"])
    assert res.exit_code == 2 and "--labels" in res.output and "Traceback" not in res.output
    res = run(cli, ["train-denoiser", str(tmp_path), "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "preprocess.yaml" in res.output
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump({**TINY, "size_xy": 128}))
    res = run(cli, ["train-denoiser", str(data_dir), "-o", str(tmp_path / "r"), "--config", str(big),
                    "--studies", CONTROL, "--device", "cpu"])
    assert res.exit_code == 2 and "size_xy is 64" in res.output
    res = run(cli, ["train-denoiser", str(data_dir), "-o", str(tmp_path / "r2"), "--resume", "--studies", CONTROL,
                    "--device", "cpu", "--config", str(tiny_config)])
    assert res.exit_code == 2 and "checkpoint not found" in res.output
    assert not (tmp_path / "r" / "model").exists()


def test_ddp_two_processes_gloo(data_dir, tiny_config, tmp_path):
    """torchrun with 2 CPU processes (gloo): rank 0 writes checkpoints and the model directory."""
    script = tmp_path / "covidctnet_entry.py"
    script.write_text("from covidctnet.cli import main\nmain()\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    run = tmp_path / "ddp"
    cmd = [str(torchrun) if torchrun.exists() else shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2",
           str(script), "train-denoiser", str(data_dir), "-o", str(run), "--config", str(tiny_config),
           "--studies", CONTROL, "--device", "cpu", "--epochs", "1"]
    env = {**os.environ, "COVIDCTNET_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert (run / "model" / "denoiser.safetensors").is_file()
    assert load_model_dir(run / "model").config["components"]["denoiser"]["arch"] == "bcdunet"
    assert len(_metrics(run)) == 1
