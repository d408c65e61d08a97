"""Tests of the shared training loop (covidctnet.training.trainer) on a tiny synthetic task.

The point here is the loop's machinery (resume, checkpoints, DDP), so a tiny model on synthetic data is enough; the
models' own tests train on the real data.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from covidctnet.core.checkpoint import load_checkpoint
from covidctnet.core.errors import CheckpointError, ConfigError
from covidctnet.core.model_dir import load_model_dir
from covidctnet.core.seeding import derive_seed, seed_everything
from covidctnet.training.trainer import TIMING_COLUMNS, EpochSampler, LoopConfig, ModelExport, Trainer

REPO_ROOT = Path(__file__).resolve().parents[2]


class _ToyData(torch.utils.data.Dataset):
    """Two Gaussian blobs in 8-D with per-(epoch, index) seeded noise: exercises ``set_epoch`` and augmentation."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = (torch.arange(n) % 2).long()
        self.x = torch.randn(n, 8, generator=g) + 1.5 * (2 * self.y[:, None].float() - 1)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, i))
        return self.x[i] + 0.1 * torch.randn(8, generator=g), self.y[i]


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))  # dropout uses global RNG


def _step(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _make(run_dir: Path, max_epochs: int, step=_step, data=None, max_steps=None, checkpoint_every=None,
          **kw) -> Trainer:
    seed_everything(0)
    data = data or _ToyData()
    val = _ToyData(32, seed=1)

    def validate(model, device):
        assert device == torch.device("cpu") and next(model.parameters()).device == device  # the Trainer's device
        logits = model(val.x)
        return {"val_loss": float(nn.functional.cross_entropy(logits, val.y)),
                "val_acc": float((logits.argmax(1) == val.y).float().mean())}

    return Trainer(
        _model(), run_dir, train_data=data, training_step=step, validate=validate,
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-2),
        scheduler_factory=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
        monitor="val_loss", mode="min", config={"lr": 1e-2}, **kw,
        loop=LoopConfig(epochs=max_epochs, batch_size=8, max_steps=max_steps, checkpoint_every=checkpoint_every,
                        device="cpu", seed=3),
    )


def test_loss_decreases_and_outputs(tmp_path):
    trainer = _make(tmp_path / "run", max_epochs=4, sample_weights=[1.0] * 64)
    result = trainer.fit()
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert list(rows[0]) == ["epoch", "train_loss", "data_wait_frac", "step", "train_samples_per_s", "val_acc",
                             "val_loss", "lr", "seconds"]
    assert [int(r["step"]) for r in rows] == [8, 16, 24, 32] and all(0 <= float(r["data_wait_frac"]) < 1 for r in rows)
    # throughput is measured by the Trainer: 64 samples per epoch over a positive time
    assert all(float(r["train_samples_per_s"]) > 0 for r in rows)
    assert float(rows[0]["train_samples_per_s"]) == pytest.approx(64 / float(rows[0]["seconds"]), rel=0.9)
    assert float(rows[0]["lr"]) == pytest.approx(1e-2) and float(rows[1]["lr"]) < 1e-2  # cosine schedule stepped
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "loss_curve.png", "config.yaml"):
        assert (tmp_path / "run" / name).is_file(), name
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["epoch"] == result.best_epoch
    assert best["best_metric"] == pytest.approx(min(r["val_loss"] for r in result.history))
    md = trainer.export(tmp_path / "model",
                        lambda: ModelExport({"name": "toy", "components": {"model": {"arch": "mlp"}}}, "# toy\n"))
    exported = load_model_dir(md.path).state_dict("model")
    assert all(torch.equal(exported[k], best["model"][k]) for k in best["model"])


@pytest.mark.parametrize("how,ema", [("max_epochs", None), ("crash", None), ("crash", 0.9), ("step_checkpoint", None)])
def test_resume_is_bit_identical(tmp_path, how, ema):
    # step checkpoints every 3 steps (8 steps per epoch) in both runs: writing them must not change the training
    every = 3 if how == "step_checkpoint" else None
    full = _make(tmp_path / "full", max_epochs=3, ema_decay=ema, checkpoint_every=every)
    full.fit()
    run = tmp_path / "cut"
    if how == "max_epochs":
        _make(run, max_epochs=1, ema_decay=ema).fit()
    else:  # the process "dies" at the 3rd step of epoch 2 (8 steps per epoch)
        calls = {"n": 0}

        def dying_step(model, batch):
            calls["n"] += 1
            if calls["n"] == 8 * 2 + 3:
                raise KeyboardInterrupt
            return _step(model, batch)

        with pytest.raises(KeyboardInterrupt):
            _make(run, max_epochs=3, step=dying_step, ema_decay=ema, checkpoint_every=every).fit()
        ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
        if every:  # last.pt is the step checkpoint after step 18, inside epoch 2
            assert (ckpt["epoch"], ckpt["global_step"], ckpt["partial_epoch"]["step"]) == (1, 18, 2)
        else:  # last.pt is from the end of epoch 1
            assert (ckpt["epoch"], ckpt["partial_epoch"]) == (1, None)
    with pytest.raises(CheckpointError, match="--resume"):
        _make(run, max_epochs=3, ema_decay=ema).fit(resume=False)  # never overwrite a run by accident
    result = _make(run, max_epochs=3, ema_decay=ema, checkpoint_every=every).fit(resume=True)
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(run / "checkpoints" / "last.pt")
    for key in ("model",) + (("ema",) if ema else ()):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    timing = TIMING_COLUMNS  # wall-clock columns differ between runs, nothing else may

    def rows(path: Path) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader(path.open())]

    assert rows(tmp_path / "full" / "metrics.csv") == rows(run / "metrics.csv")


def test_max_steps_ends_inside_an_epoch_and_a_resume_goes_on(tmp_path):
    """8 steps per epoch: max_steps 10 ends in epoch 1 after 2 of its steps; that partial epoch is validated."""
    result = _make(tmp_path / "run", max_epochs=5, max_steps=10).fit()
    assert [(r["epoch"], r["step"]) for r in result.history] == [(0, 8), (1, 10)]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["global_step"] == 10
    again = _make(tmp_path / "run", max_epochs=5, max_steps=10).fit(resume=True)  # nothing left to do
    assert len(again.history) == 2
    more = _make(tmp_path / "run", max_epochs=5, max_steps=20).fit(resume=True)  # goes on with the next epoch
    assert [(r["epoch"], r["step"]) for r in more.history] == [(0, 8), (1, 10), (2, 18), (3, 20)]
    with pytest.raises(ConfigError, match="max_steps"):
        _make(tmp_path / "bad", max_epochs=1, max_steps=0)


def test_weight_average_is_validated_and_exported(tmp_path):
    """With ema_decay the loop keeps e <- d*e + (1-d)*w after every step, and validates, selects and exports e."""
    decay, seen = 0.8, []

    def recording_step(model, batch):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})  # weights before this step
        return _step(model, batch)

    trainer = _make(tmp_path / "run", max_epochs=2, step=recording_step, ema_decay=decay)
    result = trainer.fit()
    steps = seen[1:] + [trainer.model.state_dict()]  # the weights after each optimiser step
    expected = {k: v.clone() for k, v in steps[0].items()}  # the first update copies the weights
    for w in steps[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * w[k] for k in expected}
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    averaged = {k[len("module."):]: v for k, v in last["ema"].items() if k.startswith("module.")}
    for k, v in expected.items():
        torch.testing.assert_close(averaged[k], v)
        assert not torch.allclose(averaged[k], last["model"][k])  # it is not the raw weights
    val = _ToyData(32, seed=1)
    net = _model()
    net.load_state_dict(averaged)
    with torch.no_grad():
        logits = net.eval()(val.x)
    assert result.history[-1]["val_loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, val.y)))
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["ema"]
    exported = trainer.best_state_dict()
    assert exported.keys() == averaged.keys()
    assert all(torch.equal(exported[k], best["module." + k]) for k in exported)


def test_resume_refuses_another_weight_average_setting(tmp_path):
    _make(tmp_path / "run", max_epochs=1, ema_decay=0.9).fit()
    with pytest.raises(CheckpointError, match="ema_decay"):
        _make(tmp_path / "run", max_epochs=2).fit(resume=True)
    with pytest.raises(ConfigError, match="ema_decay"):
        _make(tmp_path / "other", max_epochs=1, ema_decay=1.0)


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        _make(tmp_path / "empty", max_epochs=1).fit(resume=True)


def test_truncated_checkpoint_is_refused(tmp_path):
    _make(tmp_path / "run", max_epochs=1).fit()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(last)
    with pytest.raises(CheckpointError):
        _make(tmp_path / "run", max_epochs=2).fit(resume=True)


class _Evil:
    """Unpickling this creates a file: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "epoch": 0, "model": _Evil(str(marker)), "optimizer": {}, "best_metric": 0.0,
                "history": [], "rng": []}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a covidctnet training checkpoint"):
        load_checkpoint(path)


def test_wrong_architecture_is_refused(tmp_path):
    _make(tmp_path / "run", max_epochs=1).fit()
    seed_everything(0)
    other = Trainer(nn.Linear(8, 2), tmp_path / "run", train_data=_ToyData(), training_step=_step,
                    loop=LoopConfig(device="cpu"))
    with pytest.raises(CheckpointError, match="do not fit this model"):
        other.fit(resume=True)


def test_bad_monitor():
    with pytest.raises(ConfigError):
        Trainer(nn.Linear(8, 2), "x", train_data=_ToyData(), training_step=_step, monitor="val_auc",
                loop=LoopConfig(device="cpu"))


def test_epoch_sampler_shards_and_balances():
    shards = [list(EpochSampler(10, seed=1, world_size=3, rank=r)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    assert set(sum(shards, [])) == set(range(10))  # every sample seen, 2 repeated as padding
    s = EpochSampler(10, seed=1)
    first = list(s)
    assert list(s) == first  # a pure function of (seed, epoch)
    s.set_epoch(1)
    assert list(s) != first
    weights = [1.0 / 90] * 90 + [1.0 / 10] * 10  # a 90/10 imbalance, weighted by 1 / class frequency
    drawn = np.array(list(EpochSampler(100, seed=0, weights=weights, num_samples=4000)))
    assert 0.45 < (drawn >= 90).mean() < 0.55


_DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from pathlib import Path
    from torch import nn
    sys.path.insert(0, {tests!r})
    from test_trainer import _ToyData, _model, _step
    from covidctnet.core.seeding import seed_everything
    from covidctnet.training.trainer import LoopConfig, ModelExport, Trainer
    torch.set_num_threads(1)
    run = Path(sys.argv[1])
    seed_everything(0)
    val = _ToyData(16, seed=1)
    trainer = Trainer(_model(), run, train_data=_ToyData(), training_step=_step,
                      validate=lambda m, d: {{"val_acc": float((m(val.x).argmax(1) == val.y).float().mean())}},
                      monitor="val_acc", mode="max", loop=LoopConfig(epochs=2, batch_size=8, device="auto", seed=0))
    assert trainer.ctx.world_size == 2 and torch.distributed.get_backend() == "gloo"
    assert len(trainer._loader(0)) == 4  # 64 samples / 2 ranks / batch 8
    result = trainer.fit()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.save(flat, run.parent / f"weights_rank{{trainer.ctx.rank}}.pt")
    trainer.export(run.parent / "model",
                   lambda: ModelExport({{"name": "toy", "components": {{"model": {{"arch": "mlp"}}}}}}, "# toy"))
    trainer.close()
    """
)


def test_ddp_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp_script.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).resolve().parent)))
    env = {**os.environ, "COVIDCTNET_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun) if torchrun.exists() else shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 3
    w0, w1 = torch.load(tmp_path / "weights_rank0.pt"), torch.load(tmp_path / "weights_rank1.pt")
    assert torch.equal(w0, w1)  # DDP kept the replicas in sync
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp*"))  # no stray temp files


def test_loop_config_of_a_training_config():
    from covidctnet.training.classifier import ClassifierConfig
    from covidctnet.training.denoiser import DenoiserConfig
    from covidctnet.training.simclr import PretrainSliceConfig

    loop = LoopConfig.of(ClassifierConfig(epochs=3, batch_size=2, workers=1, patience=None, device="cpu", seed=7,
                                          max_steps=5, checkpoint_every=2, steps_per_epoch=4))
    assert loop == LoopConfig(epochs=3, patience=None, batch_size=2, steps_per_epoch=4, max_steps=5,
                              checkpoint_every=2, num_workers=1, device="cpu", seed=7)  # `workers` is num_workers
    assert LoopConfig.of(DenoiserConfig(num_workers=2)).num_workers == 2
    assert LoopConfig.of(PretrainSliceConfig()).patience is None  # a field the config lacks keeps the default
    with pytest.raises(ConfigError, match="checkpoint_every"):
        LoopConfig(checkpoint_every=0)
    with pytest.raises(ConfigError, match="epochs and batch_size"):
        LoopConfig(batch_size=0)


def test_epoch_callback_runs_in_eval_mode_and_never_stops_training(tmp_path, caplog):
    """The sample-picture callback sees the model in eval mode without gradients; training goes on in train mode
    after it, and a failing callback is one warning, not a stopped run."""
    seen = []

    def write(epoch, net, out_dir):
        seen.append((epoch, net.training, torch.is_grad_enabled(), out_dir))
        if epoch == 1:
            raise ValueError("no display")

    def step(model, batch):
        assert model.training and torch.is_grad_enabled()
        return _step(model, batch)

    with caplog.at_level("WARNING", logger="covidctnet.training.trainer"):
        result = _make(tmp_path / "run", max_epochs=3, step=step, epoch_callback=write).fit()
    assert result.epochs_run == 3
    assert seen == [(e, False, False, tmp_path / "run") for e in range(3)]
    assert "sample PNG for epoch 1 not written: no display" in caplog.text
