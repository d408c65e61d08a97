"""Seeds: every random choice of a run is a pure function of its seed."""

from __future__ import annotations

import random

import numpy as np

__all__ = ["derive_seed", "seed_everything"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. ``(seed, epoch)`` or ``(seed, epoch, index)``)."""
    words = [int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA). Call once at the start of a run, before building the model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    import torch  # lazy: data modules use derive_seed without torch

    torch.manual_seed(seed)
