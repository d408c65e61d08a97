"""Tests of covidctnet.core.checkpoint: what load_checkpoint refuses, and that save_checkpoint round-trips."""

from __future__ import annotations

import pytest
import torch

from covidctnet.core.checkpoint import CHECKPOINT_FORMAT, REQUIRED_KEYS, load_checkpoint, save_checkpoint
from covidctnet.core.errors import CheckpointError


def _ckpt(**extra):
    return {"format": CHECKPOINT_FORMAT, "epoch": 2, "model": {"w": torch.arange(3.0)}, "optimizer": {},
            "best_metric": 0.5, "history": [{"epoch": 0, "train_loss": 1.0}], "rng": {"torch": torch.tensor([1])},
            **extra}


def test_round_trip(tmp_path):
    save_checkpoint(_ckpt(), tmp_path / "c" / "last.pt")
    back = load_checkpoint(tmp_path / "c" / "last.pt")
    assert back["epoch"] == 2 and torch.equal(back["model"]["w"], torch.arange(3.0))
    assert set(REQUIRED_KEYS) <= set(back)


def test_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    save_checkpoint(_ckpt(), tmp_path / "a.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a covidctnet training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    save_checkpoint(_ckpt(format=CHECKPOINT_FORMAT + 1), tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path / "new.pt")


class _Payload:
    """An arbitrary Python object: unpickling one could run code, so weights_only loading must refuse it."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save(_ckpt(extra=_Payload()), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
