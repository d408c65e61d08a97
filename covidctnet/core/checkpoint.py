"""The training checkpoint file: written atomically, read back with ``torch.load(weights_only=True)`` so that a
checkpoint can never run code.

A checkpoint is a dict of tensors and plain values holding at least :data:`REQUIRED_KEYS`;
:class:`~covidctnet.training.trainer.Trainer` writes it every epoch, and the Keras import reads the model weights of a
training run from it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from covidctnet.core.errors import CheckpointError
from covidctnet.core.files import atomic_path

__all__ = ["CHECKPOINT_FORMAT", "REQUIRED_KEYS", "load_checkpoint", "save_checkpoint"]


CHECKPOINT_FORMAT = 1


REQUIRED_KEYS = ("format", "epoch", "model", "optimizer", "best_metric", "history", "rng")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a trainer checkpoint safely: ``torch.load(weights_only=True)``, so a pickle can never run code.

    Raises:
        CheckpointError: missing, truncated or corrupt file; a pickle with non-tensor objects (possible code
            execution, refused); or a file that is not a covidctnet checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: refused, the file holds Python objects other than tensors and plain values "
                f"(unpickling could run code); only covidctnet checkpoints are loaded ({first[:200]})"
            ) from err
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): {first[:200]}") from err
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not a covidctnet training checkpoint (keys {found}; need {list(REQUIRED_KEYS)})"
        )
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']}, this version reads {CHECKPOINT_FORMAT}")
    return ckpt


def save_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """Write ``ckpt`` to ``path`` atomically and fsync it: a crash leaves the previous checkpoint whole."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
