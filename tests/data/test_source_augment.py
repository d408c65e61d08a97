"""Tests of the source-mimicking augmentation (covidctnet.data.ucsd.source_augment) and its use in SliceDataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from covidctnet.data.ucsd import SliceDataset, SliceRecord, source_augment


def _slice(size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 / (0.4 * size) ** 2 + (xx - size / 2) ** 2 / (0.45 * size) ** 2) < 1
    return np.where(body, 0.7, 0.0).astype(np.float32) + 0.1 * np.sin(xx / 3.0).astype(np.float32) * body


def test_source_augment_is_seeded_in_range_and_changes_the_image():
    img = _slice()
    outs = [source_augment(img, np.random.default_rng(s)) for s in range(20)]
    assert all(o.shape == img.shape and o.dtype == np.float32 for o in outs)
    assert all(o.min() >= 0.0 and o.max() <= 1.0 for o in outs)
    assert np.array_equal(outs[3], source_augment(img, np.random.default_rng(3)))
    changed = [float(np.abs(o - img).mean()) for o in outs]
    assert sum(c > 0.01 for c in changed) >= 15  # 4 steps at p = 0.5: nothing fires 1 time in 16
    assert len({round(c, 6) for c in changed}) > 10  # different draws, different images


def test_slice_dataset_source_aug_only_when_asked():
    records = [SliceRecord(path=Path(f"x{i}.png"), label=i % 2) for i in range(4)]
    cache = [np.stack([_slice(), np.zeros((64, 64), np.float32)]) for _ in range(4)]
    plain = SliceDataset(records, 64, lung_mask=True, cache=cache)
    aug = SliceDataset(records, 64, lung_mask=True, cache=cache, source_aug=True)
    a, b = plain[0]["image"], aug[0]["image"]
    assert a.shape == b.shape == (2, 64, 64)
    assert not torch.equal(a[0], b[0]) or not torch.equal(plain[1]["image"][0], aug[1]["image"][0])
    assert torch.equal(a[1], b[1])  # the lung-mask channel is left as it is
    assert torch.equal(aug[2]["image"], aug[2]["image"])  # seeded by (seed, epoch, index)
