"""Axial control slices for training the BCDU-Net denoiser, with the official half-noised batches.

CovidCTNet trains its denoiser on slices of control (healthy) CT scans: the input is the slice with Perlin noise added
(for half of the slices) and the target is always the clean slice (official notebook ``Training-CovidCTNet.ipynb``:
``noisy_output[int(N / 2):] = output[int(N / 2):]``, then ``model.fit(noisy_output, output, batch_size=5,
shuffle=True)``). Here the rule is applied to every batch: the first ``int(B * noise_fraction)`` slices of a
shuffled batch are noised, the others stay clean.

Pieces:

* :func:`select_control_studies`: the ``ok`` studies of a preprocessed folder (``manifest.csv``) whose label is
  ``control`` — from the manifest, a labels CSV, or an explicit list of study ids (the shared DICOM folders carry no
  label in the manifest);
* :func:`load_slices`: the preprocessed volumes (``<study_id>.nii.gz``, float32 in [0, 1], ``array[:, :, k]`` is
  axial slice ``k``), opened as slice readers: decoded once into ``.npy`` caches and read a slice at a time, so
  memory does not grow with the number of studies;
* :func:`split_control_slices`: a held-out validation set. With two or more studies whole *studies* are held out
  (slices of one patient are strongly correlated, so holding out slices would leak). With a single study that is
  impossible, so a contiguous block of slices at the superior end is held out, separated from the training slices
  by a gap of ``val_gap_slices`` (the 1 mm slices are interpolated from thicker source slices; the gap keeps a
  source slice from feeding both sets);
* :class:`ControlSliceDataset`: training slices plus a ``collate`` that noises part of each batch, the noise of
  slice ``i`` in epoch ``e`` drawn from ``derive_seed(seed, e, i)`` only, so batches do not depend on worker count,
  process count or on whether the run was resumed;
* :class:`NoisedSlices`: every held-out slice with a fixed noise draw (same every epoch), read when needed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from covidctnet.core.errors import ConfigError, InputError, LabelError, ShapeError, SplitError
from covidctnet.core.labels import normalize_label, read_labels_csv
from covidctnet.core.progress import progress
from covidctnet.core.seeding import derive_seed
from covidctnet.io.array_cache import NpyRows, cached_npy
from covidctnet.io.batch import read_manifest
from covidctnet.io.volume import read_nifti
from covidctnet.preprocessing.perlin import RandPerlinNoise

__all__ = [
    "ControlSplit",
    "ControlSliceDataset",
    "noise_transform_kwargs",
    "select_control_studies",
    "load_slices",
    "split_control_slices",
    "noised_validation_set",
    "NoisedSlices",
    "VAL_NOISE_STREAM",
    "evenly_spread",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

VAL_NOISE_STREAM = 0x76616C
"""Second part of the validation noise seed, ``derive_seed(seed, VAL_NOISE_STREAM, index)``; no training epoch
reaches this number, so validation noise never equals a training draw."""

# Preprocessed volumes are float32 in [0, 1]; allow interpolation overshoot, refuse HU or other scales.
_RANGE_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------------------------------
# which studies


def select_control_studies(
    data_dir: str | os.PathLike,
    labels: str | os.PathLike | Mapping[str, str] | None = None,
    studies: Sequence[str] | None = None,
) -> list[str]:
    """Control study ids of a preprocessed folder.

    Args:
        data_dir: output folder of ``covidctnet preprocess`` (``manifest.csv`` + ``<study_id>.nii.gz``).
        labels: a labels CSV (``study_id,label``; aliases such as ``normal`` accepted) or a ``{study_id: label}``
            mapping; its ``control`` studies are used, whatever the manifest says.
        studies: explicit study ids to use (all taken as control); overrides ``labels`` and the manifest labels.

    Returns:
        Sorted study ids, each ``ok`` in the manifest.

    Raises:
        InputError: no ``manifest.csv``; a requested study is missing or not ``ok`` in it.
        LabelError: no control study found (the message says how to pick them).
    """
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.csv"
    rows = read_manifest(manifest)
    if not rows:
        raise InputError(f"{manifest}: missing or empty; DATA must be an output folder of `covidctnet preprocess`")
    ok = {r["study_id"]: r for r in rows if r.get("status") == "ok" and r.get("output")}
    if studies:
        wanted = [s.strip() for s in studies if s.strip()]
        missing = [s for s in wanted if s not in ok]
        if missing:
            raise InputError(f"{manifest}: studies {missing} are not 'ok' in this manifest; available: {sorted(ok)}")
        return sorted(set(wanted))
    if labels is not None:
        table = read_labels_csv(labels) if isinstance(labels, (str, os.PathLike)) else dict(labels)
        chosen = sorted(s for s, lab in table.items() if normalize_label(lab) == "control" and s in ok)
        source = str(labels) if isinstance(labels, (str, os.PathLike)) else "labels"
        if not chosen:
            raise LabelError(f"{source}: no study labelled control is 'ok' in {manifest} (ok: {sorted(ok)})")
        not_found = sorted(s for s, lab in table.items() if normalize_label(lab) == "control" and s not in ok)
        if not_found:
            logger.warning("%s: control studies %s are not 'ok' in %s and are skipped", source, not_found, manifest)
        return chosen
    chosen = []
    for sid, row in ok.items():
        raw = (row.get("label") or "").strip()
        if raw:
            try:
                if normalize_label(raw) == "control":
                    chosen.append(sid)
            except LabelError:
                continue
    if not chosen:
        raise LabelError(
            f"{manifest}: no study is labelled control; pass --labels labels.csv or --studies id1,id2 "
            f"(ok studies: {sorted(ok)})"
        )
    return sorted(chosen)


def _read_preprocessed(path: Path) -> np.ndarray:
    """A preprocessed volume as slice-first ``(Z, H, W)`` float32 (``[k] == array[:, :, k]``), range checked."""
    array = read_nifti(path).array
    lo, hi = float(array.min()), float(array.max())
    if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        raise InputError(
            f"{path}: intensities span {lo:.4g}..{hi:.4g}, expected a preprocessed volume in [0, 1]; "
            "run `covidctnet preprocess` first"
        )
    # slice-first and contiguous: one slice is then one contiguous (H, W) block of the cache file
    return np.ascontiguousarray(np.moveaxis(array, 2, 0), dtype=np.float32)


def load_slices(
    data_dir: str | os.PathLike, study_ids: Sequence[str], size_xy: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, NpyRows]:
    """Open preprocessed volumes as slice readers ``{study_id: rows}``, ``rows[k] == array[:, :, k]`` ((H, W) float32).

    Nothing is kept in memory: each ``.nii.gz`` is decoded once into a slice-first ``.npy`` in ``cache_dir`` (reused
    while the volume is unchanged, see :mod:`covidctnet.io.array_cache`) and a slice is read from it when needed, so
    memory does not grow with the number of studies. ``rows.shape`` is ``(Z, H, W)``.

    Args:
        data_dir: preprocessed folder.
        study_ids: studies to read (``<data_dir>/<output of the manifest row>``).
        size_xy: expected in-plane size; ``None`` takes the first volume's.
        cache_dir: folder of the ``.npy`` files (default ``<data_dir>/cache``; 4 bytes per voxel, 69 MB for 300
            slices at 240×240).

    Raises:
        InputError: unreadable file or values outside [0, 1].
        ShapeError: a volume is not ``size_xy`` × ``size_xy`` in-plane.
    """
    data_dir = Path(data_dir)
    cache = Path(cache_dir) if cache_dir is not None else data_dir / "cache"
    rows = read_manifest(data_dir / "manifest.csv")
    outputs = {r["study_id"]: r.get("output") or f"{r['study_id']}.nii.gz" for r in rows}
    stacks: dict[str, NpyRows] = {}
    # Under torchrun every rank opens every study; starting each rank at its own share of the list means a cache one
    # rank has just written is found ready by the others, so the first run decodes each volume about once, not once
    # per rank (ranks that meet on a study still write the same bytes, atomically).
    rank, world = int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))
    start = rank * len(study_ids) // world
    order = [*study_ids[start:], *study_ids[:start]]
    for sid in progress(order, desc="control slices", unit="study"):
        path = data_dir / outputs.get(sid, f"{sid}.nii.gz")
        reader = NpyRows(cached_npy(path, cache, _read_preprocessed, name=sid))
        depth, height, width = reader.shape
        if size_xy is None:
            size_xy = int(height)
        if (height, width) != (size_xy, size_xy):
            raise ShapeError(
                f"{path}: in-plane size {height}x{width}, expected {size_xy}x{size_xy} like the "
                "other studies and the model; preprocess all studies with the same --size"
            )
        stacks[sid] = reader
        logger.debug("%s: %d slices of %dx%d", sid, depth, size_xy, size_xy)
    return {sid: stacks[sid] for sid in study_ids}


# --------------------------------------------------------------------------------------------------------------------
# split


@dataclass(frozen=True)
class ControlSplit:
    """Training and validation slices, as ``(study_id, k)`` pairs with ``k`` the index along axis 2.

    Attributes:
        mode: ``"studies"`` (whole studies held out) or ``"slices"`` (one study: a block of slices held out).
        train_ids, val_ids: studies contributing training / validation slices (the same single id in mode slices).
        train, val: the slices.
    """
    mode: Literal["studies", "slices"]
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    val: tuple[tuple[str, int], ...]

    def to_dict(self) -> dict[str, Any]:
        """A YAML-friendly summary (ids, and slice indices per study)."""
        def per_study(pairs: Sequence[tuple[str, int]]) -> dict[str, list[int]]:
            out: dict[str, list[int]] = {}
            for sid, k in pairs:
                out.setdefault(sid, []).append(int(k))
            return out

        return {
            "mode": self.mode,
            "train_ids": list(self.train_ids),
            "val_ids": list(self.val_ids),
            "n_train_slices": len(self.train),
            "n_val_slices": len(self.val),
            "train_slices": per_study(self.train),
            "val_slices": per_study(self.val),
        }


def evenly_spread(items: Sequence[T], n: int | None) -> list[T]:
    """At most ``n`` of ``items``, evenly spread over them, in order (all when ``n`` is None or larger)."""
    idx = list(items)
    if n is None or n >= len(idx):
        return idx
    picks = np.unique(np.round(np.linspace(0, len(idx) - 1, n)).astype(int))
    return [idx[i] for i in picks]


def split_control_slices(
    depths: Mapping[str, int],
    val_fraction: float = 0.2,
    seed: int = 0,
    slices_per_study: int | None = None,
    val_gap_slices: int = 2,
    val_max_slices: int | None = None,
) -> ControlSplit:
    """Hold out validation data: whole studies when there are several, else a block of slices.

    Args:
        depths: ``{study_id: number of slices}``.
        val_fraction: share of studies (or, with one study, of its slices) held out, in (0, 0.9].
        seed: chooses the held-out studies (``numpy.random.default_rng(seed)``).
        slices_per_study: keep at most this many slices per study, evenly spread across z (``None``: all).
        val_gap_slices: with one study, slices dropped between the training and the validation block.
        val_max_slices: keep at most this many validation slices, evenly spread over them (``None``: all); every
            epoch is validated on them, so at MosMed scale (~15,000 held-out slices) this bounds validation time.

    Raises:
        ConfigError: ``val_fraction`` out of range.
        SplitError: no study, or too few slices to hold any out.
    """
    if not 0.0 < val_fraction <= 0.9:
        raise ConfigError(f"'val_fraction' must be in (0, 0.9], not {val_fraction}")
    if slices_per_study is not None and slices_per_study < 1:
        raise ConfigError(f"'slices_per_study' must be >= 1 or null, not {slices_per_study}")
    if val_gap_slices < 0:
        raise ConfigError(f"'val_gap_slices' must be >= 0, not {val_gap_slices}")
    if val_max_slices is not None and val_max_slices < 1:
        raise ConfigError(f"'val_max_slices' must be >= 1 or null, not {val_max_slices}")
    ids = sorted(depths)
    if not ids:
        raise SplitError("no control study to train on")
    if len(ids) >= 2:
        n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
        order = np.random.default_rng(seed).permutation(len(ids))
        val_ids = tuple(sorted(ids[i] for i in order[:n_val]))
        train_ids = tuple(s for s in ids if s not in val_ids)
        train = tuple((s, k) for s in train_ids for k in evenly_spread(range(depths[s]), slices_per_study))
        val = tuple((s, k) for s in val_ids for k in evenly_spread(range(depths[s]), slices_per_study))
        return ControlSplit("studies", train_ids, val_ids, train, tuple(evenly_spread(val, val_max_slices)))
    (sid,) = ids
    z = int(depths[sid])
    n_val = max(1, round(val_fraction * z))
    n_train = z - n_val - val_gap_slices
    if n_train < 1:
        raise SplitError(
            f"{sid}: {z} slices are too few to hold out {n_val} (+{val_gap_slices} gap); lower val_fraction"
        )
    logger.warning(
        "only one control study (%s): holding out its %d most superior slices (gap %d) for validation; "
        "validation on slices of a training patient is optimistic, add studies for a study-level split",
        sid, n_val, val_gap_slices,
    )
    train = tuple((sid, k) for k in evenly_spread(range(n_train), slices_per_study))
    val = tuple((sid, k) for k in evenly_spread(range(z - n_val, z), val_max_slices))
    return ControlSplit("slices", (sid,), (sid,), train, val)


# --------------------------------------------------------------------------------------------------------------------
# noise


def noise_transform_kwargs(
    size_xy: int,
    scale_range: Sequence[int] = (10, 30),
    reference_size: int | None = 128,
    persistence_range: Sequence[float] = (-0.5, 0.5),
    octaves: int = 10,
    amplitude: float = 1.0,
) -> dict[str, Any]:
    """Arguments of :class:`covidctnet.preprocessing.perlin.RandPerlinNoise` for slices of ``size_xy`` pixels.

    The official ``scale`` (pixels per lattice cell, ``randint(10, 30)``) was meant for 128×128 slices; with
    ``reference_size`` set, the range is multiplied by ``size_xy / reference_size`` so the noise keeps the same size
    relative to the anatomy (19..56 at 240, 5..15 at 64).
    """
    lo, hi = int(scale_range[0]), int(scale_range[1])
    if reference_size:
        factor = size_xy / float(reference_size)
        lo, hi = max(1, round(lo * factor)), max(1, round(hi * factor))
        hi = max(hi, lo + 1)
    return {
        "scale_range": (lo, hi),
        "persistence_range": tuple(float(p) for p in persistence_range),
        "octaves": int(octaves),
        "amplitude": float(amplitude),
    }


def _noised(clean: torch.Tensor, noiser: Any, seed: int) -> torch.Tensor:
    noiser.set_random_state(seed=seed % 2**32)
    out = noiser(clean)
    return out.as_tensor() if hasattr(out, "as_tensor") else out  # a plain tensor, not a MONAI MetaTensor


# --------------------------------------------------------------------------------------------------------------------
# dataset


class ControlSliceDataset(torch.utils.data.Dataset):
    """Training slices; batches (made by :meth:`collate`) have part of their slices noised, targets always clean.

    Args:
        stacks: ``{study_id: slices}`` from :func:`load_slices` (or ``(Z, H, W)`` arrays); slices are read from it when
            an item is asked for, so nothing is held in memory.
        slices: the ``(study_id, k)`` pairs to serve (e.g. ``ControlSplit.train``).
        seed: run seed; the noise of item ``i`` in epoch ``e`` comes from ``derive_seed(seed, e, i)``.
        noise_fraction: share of each batch to noise, ``int(B * noise_fraction)`` slices (official 0.5).
        noise_kwargs: :class:`~covidctnet.preprocessing.perlin.RandPerlinNoise` arguments (see
        :func:`noise_transform_kwargs`).

    ``dataset[i]`` is ``(i, clean)`` with ``clean`` a ``(1, H, W)`` float32 tensor in [0, 1];
    ``collate(items)`` returns ``{"image": (B, 1, H, W) input, "target": (B, 1, H, W) clean,
    "noised": (B,) bool}``. Use it as the DataLoader's ``collate_fn``.

    Example:
        >>> ds = ControlSliceDataset(stacks, split.train, seed=0, noise_kwargs=noise_transform_kwargs(64))
        >>> ds.set_epoch(0)
        >>> batch = ds.collate([ds[i] for i in range(5)])  # batch["noised"] == [True, True, False, False, False]
    """
    def __init__(
        self,
        stacks: Mapping[str, Any],
        slices: Sequence[tuple[str, int]],
        seed: int = 0,
        noise_fraction: float = 0.5,
        noise_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not slices:
            raise SplitError("no training slice selected")
        if not 0.0 <= noise_fraction <= 1.0:
            raise ConfigError(f"'noise_fraction' must be in [0, 1], not {noise_fraction}")
        self.slices = tuple((str(s), int(k)) for s, k in slices)
        self.stacks = {s: stacks[s] for s in {s for s, _ in self.slices}}
        self.seed = int(seed)
        self.noise_fraction = float(noise_fraction)
        self.noise_kwargs = dict(noise_kwargs or {})
        self.epoch = 0
        self._noiser: Any = None

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return int(index), _slice_tensor(self.stacks, *self.slices[index])

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer before each epoch: the noise draws depend on it."""
        self.epoch = int(epoch)

    @property
    def noiser(self) -> Any:
        if self._noiser is None:  # built lazily: DataLoader workers unpickle the dataset and build their own
            self._noiser = RandPerlinNoise(prob=1.0, **self.noise_kwargs)
        return self._noiser

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_noiser"] = None
        return state

    def collate(self, items: Sequence[tuple[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack items and noise the first ``int(B * noise_fraction)`` of them (official half-noised batches)."""
        clean = torch.stack([img for _, img in items])
        image = clean.clone()
        n_noisy = int(len(items) * self.noise_fraction)
        for j in range(n_noisy):
            image[j] = _noised(clean[j], self.noiser, derive_seed(self.seed, self.epoch, items[j][0]))
        noised = torch.zeros(len(items), dtype=torch.bool)
        noised[:n_noisy] = True
        return {"image": image, "target": clean, "noised": noised}


class NoisedSlices(torch.utils.data.Dataset):
    """Held-out slices, each with one fixed noise draw: item ``i`` is ``(noisy, clean)``, each ``(1, H, W)`` float32.

    The noise of item ``i`` comes from ``derive_seed(seed, VAL_NOISE_STREAM, i)``, so it is the same every epoch and
    never equals a training draw. Slices are read and noised when asked for (nothing held in memory); ``noisy`` is
    not clipped (as in training).

    Args:
        stacks, slices, seed, noise_kwargs: as :class:`ControlSliceDataset`.
    """

    def __init__(self, stacks: Mapping[str, Any], slices: Sequence[tuple[str, int]], seed: int = 0,
                 noise_kwargs: Mapping[str, Any] | None = None) -> None:
        if not slices:
            raise SplitError("no validation slice selected")
        self.slices = tuple((str(s), int(k)) for s, k in slices)
        self.stacks = {s: stacks[s] for s in {s for s, _ in self.slices}}
        self.seed = int(seed)
        self.noiser = RandPerlinNoise(prob=1.0, **dict(noise_kwargs or {}))

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        clean = _slice_tensor(self.stacks, *self.slices[index])
        return _noised(clean, self.noiser, derive_seed(self.seed, VAL_NOISE_STREAM, index)), clean

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``start`` to ``stop - 1`` stacked: ``(noisy, clean)``, each ``(n, 1, H, W)``."""
        noisy, clean = zip(*(self[i] for i in range(start, min(stop, len(self)))))
        return torch.stack(noisy), torch.stack(clean)


def noised_validation_set(
    stacks: Mapping[str, Any],
    slices: Sequence[tuple[str, int]],
    seed: int = 0,
    noise_kwargs: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of :class:`NoisedSlices` at once (for small sets and tests).

    Returns:
        ``(noisy, clean)``, each ``(N, 1, H, W)`` float32.
    """
    return NoisedSlices(stacks, slices, seed, noise_kwargs).batch(0, len(slices))


def _slice_tensor(stacks: Mapping[str, Any], study_id: str, k: int) -> torch.Tensor:
    return torch.from_numpy(np.array(stacks[study_id][k], dtype=np.float32)[None])  # (1, H, W), a fresh copy
