"""Synthetic lesions in control lungs: the training data of the label-free lesion model (``train-lesion-model``).

NormNet (Yao et al., "Label-Free Segmentation of COVID-19 Lesions in Lung CT", IEEE TMI 2021) learns what normal
lung looks like from normal scans only: lesions are synthesised inside normal lungs and a network learns to tell the
inserted tissue from the normal one. Here, per axial slice of a control scan (preprocessed intensity: HU window
[-1000, 400] scaled to [0, 1]):

* **shapes**: axial cross-sections of the connected components of real lesion masks (the MosMed masks) and random
  smooth blobs (thresholded smoothed noise), scaled to an equivalent diameter in ``size_mm``;
* **placement**: inside the lung mask, drawn with more weight near the pleura (``peripheral_mm``) and towards the
  posterior side, where COVID-19 lesions mostly lie;
* **intensity**: ground glass (``ggo_hu``) or consolidation (``consolidation_hu``); the tissue keeps its own texture
  (its deviation from the lung median, fully for ground glass, a fifth of it for consolidation) and vessels denser
  than the target stay as they are; the lesion edge is blended over about a pixel;
* **augmentation** of the whole slice, so the model does not learn one scanner: left-right flip, HU offset and gain,
  Gaussian noise.

Functions work on NumPy arrays; :class:`SyntheticLesionSlices` is the ``torch`` dataset the trainer reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from covidctnet.core.errors import ConfigError, InputError
from covidctnet.data.control_slices import evenly_spread
from covidctnet.preprocessing.preprocess import PreprocessConfig

__all__ = [
    "LesionSynthesis",
    "LesionShape",
    "mosmed_shapes",
    "random_blob",
    "insert_lesions",
    "SyntheticLesionSlices",
]

logger = logging.getLogger(__name__)

HU_LOW, HU_HIGH = PreprocessConfig.hu_min, PreprocessConfig.hu_max
"""The window of the lesion model's preprocessing (:class:`PreprocessConfig`'s default): intensity 0 is ``HU_LOW``, 1
is ``HU_HIGH``."""


@dataclass(frozen=True)
class LesionSynthesis:
    """How lesions are synthesised.

    Attributes:
        ggo_hu: (low, high) HU of ground-glass lesions.
        consolidation_hu: (low, high) HU of consolidations.
        consolidation_fraction: share of lesions that are consolidations.
        max_lesions: at most this many lesions per slice (1..max drawn uniformly).
        empty_fraction: share of slices left without a lesion (the model must also learn that normal lung stays 0).
        mosmed_fraction: share of shapes taken from real lesion masks (the rest are random blobs).
        size_mm: (low, high) equivalent diameter of a lesion's cross-section, drawn log-uniformly.
        peripheral_mm: placement weight ``exp(-d / peripheral_mm)``, ``d`` the distance (mm) to the lung border.
        posterior_weight: placement weight grows linearly from 1 (most anterior row) to this (most posterior).
        offset_hu, gain, noise_hu: augmentation: HU offset drawn in ±offset_hu, gain in [gain[0], gain[1]], Gaussian
            noise of standard deviation up to noise_hu.
    """

    ggo_hu: tuple[float, float] = (-750.0, -300.0)
    consolidation_hu: tuple[float, float] = (-100.0, 100.0)
    consolidation_fraction: float = 0.35
    max_lesions: int = 4
    empty_fraction: float = 0.25
    mosmed_fraction: float = 0.5
    size_mm: tuple[float, float] = (6.0, 70.0)
    peripheral_mm: float = 15.0
    posterior_weight: float = 3.0
    offset_hu: float = 30.0
    gain: tuple[float, float] = (0.95, 1.05)
    noise_hu: float = 15.0

    def __post_init__(self) -> None:
        for name in ("ggo_hu", "consolidation_hu", "size_mm", "gain"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ConfigError(f"'{name}' must be (low, high) with low <= high, not {getattr(self, name)}")
        for name in ("consolidation_fraction", "empty_fraction", "mosmed_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"'{name}' must be in [0, 1], not {getattr(self, name)}")
        if self.max_lesions < 1:
            raise ConfigError(f"'max_lesions' must be >= 1, not {self.max_lesions}")
        if self.size_mm[0] <= 0 or self.peripheral_mm <= 0 or self.posterior_weight < 1:
            raise ConfigError("'size_mm' and 'peripheral_mm' must be > 0 and 'posterior_weight' >= 1")


@dataclass(frozen=True)
class LesionShape:
    """A lesion cross-section: ``mask`` (h, w) bool with pixels of ``pixel_mm``."""

    mask: np.ndarray
    pixel_mm: float


def mosmed_shapes(folder: str | os.PathLike, min_area_mm2: float = 20.0, max_shapes: int = 2000) -> list[LesionShape]:
    """Axial cross-sections of every connected lesion component in a folder of MosMed masks.

    Args:
        folder: ``study_*_mask.nii.gz`` files (int {0, 1}, axial slices along axis 2).
        min_area_mm2: smaller components are left out.
        max_shapes: keep at most this many (evenly spread over the list).

    Returns:
        The cropped component masks with their in-plane pixel size.

    Raises:
        InputError: the folder holds no mask or no component.
    """
    paths = sorted(Path(folder).glob("*_mask.nii.gz"))
    if not paths:
        raise InputError(f"{folder}: no *_mask.nii.gz lesion masks")
    shapes: list[LesionShape] = []
    for path in paths:
        img = nib.load(str(path))
        mask = np.asarray(img.dataobj) > 0
        pixel = float(img.header.get_zooms()[0])
        for k in np.flatnonzero(mask.any(axis=(0, 1))):
            labels, n = ndimage.label(mask[:, :, k])
            for box, idx in zip(ndimage.find_objects(labels), range(1, n + 1)):
                part = labels[box] == idx
                if part.sum() * pixel * pixel >= min_area_mm2:
                    shapes.append(LesionShape(part, pixel))
    if not shapes:
        raise InputError(f"{folder}: no lesion component of at least {min_area_mm2} mm²")
    return evenly_spread(shapes, max_shapes)


def random_blob(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A random smooth blob: smoothed white noise inside a soft disc, thresholded, its largest component.

    Returns:
        (size, size) bool, not empty.
    """
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=size / rng.uniform(5.0, 10.0))
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    field = noise / (noise.std() + 1e-8) - (np.hypot(yy, xx) / (size / 2)) ** 2 * 2.0
    blob = field > np.quantile(field, rng.uniform(0.6, 0.85))
    labels, n = ndimage.label(blob)
    if n == 0:
        blob[size // 2 - 2: size // 2 + 2, size // 2 - 2: size // 2 + 2] = True
        return blob
    sizes = ndimage.sum(blob, labels, range(1, n + 1))
    return labels == int(np.argmax(sizes)) + 1


def _scaled_shape(shape: np.ndarray, shape_mm: float, pixel_mm: float, diameter_mm: float,
                  rng: np.random.Generator) -> np.ndarray:
    """``shape`` resampled to ``pixel_mm`` pixels with the given equivalent diameter, randomly flipped/transposed."""
    area_mm2 = shape.sum() * shape_mm * shape_mm
    zoom = diameter_mm / (2.0 * np.sqrt(area_mm2 / np.pi)) * shape_mm / pixel_mm
    out = ndimage.zoom(shape.astype(np.float32), max(zoom, 1e-3), order=1) >= 0.5
    if not out.any():
        out = np.ones((1, 1), bool)
    if rng.random() < 0.5:
        out = out.T
    if rng.random() < 0.5:
        out = out[::-1]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def _placement_weights(lung: np.ndarray, pixel_mm: float, cfg: LesionSynthesis) -> np.ndarray:
    """Weights of lesion centres over ``lung``: high near the pleura and posteriorly (axis 1 = anterior, RAS)."""
    depth_mm = ndimage.distance_transform_edt(lung) * pixel_mm
    w = np.exp(-depth_mm / cfg.peripheral_mm)
    rows = np.linspace(cfg.posterior_weight, 1.0, lung.shape[1], dtype=np.float64)  # index 0 = posterior in RAS
    w = w * rows[None, :]
    return np.where(lung, w, 0.0)


def insert_lesions(image: np.ndarray, lung: np.ndarray, pixel_mm: float, rng: np.random.Generator,
                   shapes: Sequence[LesionShape] = (), cfg: LesionSynthesis = LesionSynthesis(),
                   n_lesions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Insert lesions into one axial slice.

    Args:
        image: (X, Y) preprocessed intensity in [0, 1] (RAS: axis 0 = right→left... as the preprocessed volume,
            axis 1 = posterior→anterior).
        lung: (X, Y) bool lung mask of the slice.
        pixel_mm: in-plane pixel size (mm).
        rng: the random generator.
        shapes: real lesion cross-sections (:func:`mosmed_shapes`); without them only random blobs are used.
        cfg: the synthesis settings.
        n_lesions: number of lesions (``None``: drawn from 1..``cfg.max_lesions``).

    Returns:
        ``(image, lesion)``: the new (X, Y) float32 slice in [0, 1] and the (X, Y) bool lesion mask (inside the lung).
    """
    out = np.asarray(image, dtype=np.float32).copy()
    lesion = np.zeros(lung.shape, bool)
    if not lung.any():
        return out, lesion
    hu = out * (HU_HIGH - HU_LOW) + HU_LOW
    lung_median = float(np.median(hu[lung]))
    weights = _placement_weights(lung, pixel_mm, cfg).ravel()
    weights = weights / weights.sum()
    count = int(rng.integers(1, cfg.max_lesions + 1)) if n_lesions is None else n_lesions
    for _ in range(count):
        if shapes and rng.random() < cfg.mosmed_fraction:
            src = shapes[int(rng.integers(len(shapes)))]
            base, base_mm = src.mask, src.pixel_mm
        else:
            base, base_mm = random_blob(rng), 1.0
        diameter = float(np.exp(rng.uniform(np.log(cfg.size_mm[0]), np.log(cfg.size_mm[1]))))
        shape = _scaled_shape(base, base_mm, pixel_mm, diameter, rng)
        centre = np.unravel_index(int(rng.choice(weights.size, p=weights)), lung.shape)
        region = np.zeros(lung.shape, bool)
        x0, y0 = centre[0] - shape.shape[0] // 2, centre[1] - shape.shape[1] // 2
        xs, ys = slice(max(x0, 0), min(x0 + shape.shape[0], lung.shape[0])), slice(max(y0, 0),
                                                                                   min(y0 + shape.shape[1],
                                                                                       lung.shape[1]))
        region[xs, ys] = shape[xs.start - x0: xs.stop - x0, ys.start - y0: ys.stop - y0]
        region &= lung
        if not region.any():
            continue
        consolidation = rng.random() < cfg.consolidation_fraction
        lo, hi = cfg.consolidation_hu if consolidation else cfg.ggo_hu
        target = rng.uniform(lo, hi)
        texture = (hu - lung_median) * (0.2 if consolidation else 1.0)
        texture = texture + ndimage.gaussian_filter(rng.standard_normal(hu.shape), 1.0) * 25.0
        new_hu = np.maximum(hu, target + texture)  # vessels denser than the lesion stay as they are
        alpha = np.clip(ndimage.gaussian_filter(region.astype(np.float32), 0.7, truncate=3.0), 0.0, 1.0) * lung
        hu = hu + alpha * (new_hu - hu)
        lesion |= region
    out = np.clip((hu - HU_LOW) / (HU_HIGH - HU_LOW), 0.0, 1.0).astype(np.float32)
    return out, lesion


def _augment(image: np.ndarray, rng: np.random.Generator, cfg: LesionSynthesis) -> np.ndarray:
    """Scanner-like changes of a whole slice: HU offset and gain, Gaussian noise (intensity units)."""
    scale = HU_HIGH - HU_LOW
    hu = image * scale + HU_LOW
    hu = (hu - HU_LOW) * rng.uniform(*cfg.gain) + HU_LOW + rng.uniform(-cfg.offset_hu, cfg.offset_hu)
    hu = hu + rng.standard_normal(hu.shape) * rng.uniform(0.0, cfg.noise_hu)
    return np.clip((hu - HU_LOW) / scale, 0.0, 1.0).astype(np.float32)


class SyntheticLesionSlices(Dataset):
    """Control slices with freshly synthesised lesions on every read.

    Item ``i`` is ``{"image": (2, S, S) float32 (slice, lung mask), "target": (1, S, S) float32 lesion mask,
    "lung": (1, S, S) float32}``. With ``fixed=True`` item ``i`` is the same on every read (a validation set);
    otherwise its randomness comes from torch's global generator, which the trainer seeds.

    Args:
        images: (N, S, S) float32 slices in [0, 1].
        lungs: (N, S, S) bool lung masks.
        pixel_mm: (N,) in-plane pixel size of each slice.
        shapes: real lesion cross-sections.
        cfg: the synthesis settings.
        seed: base seed of a fixed set.
        fixed: the same lesions on every read.
        augment: apply the whole-slice augmentation (flip, intensity, noise).
    """

    def __init__(self, images: np.ndarray, lungs: np.ndarray, pixel_mm: Sequence[float],
                 shapes: Sequence[LesionShape] = (), cfg: LesionSynthesis = LesionSynthesis(), seed: int = 0,
                 fixed: bool = False, augment: bool = True) -> None:
        if images.shape != lungs.shape or images.ndim != 3 or len(pixel_mm) != len(images):
            raise ConfigError(f"images {images.shape}, lungs {lungs.shape} and {len(pixel_mm)} pixel sizes differ")
        self.images, self.lungs = images, lungs
        self.pixel_mm = np.asarray(pixel_mm, dtype=np.float64)
        self.shapes, self.cfg, self.seed, self.fixed, self.augment = list(shapes), cfg, seed, fixed, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seed = (self.seed, i) if self.fixed else int(torch.randint(0, 2**31 - 1, ()).item())
        rng = np.random.default_rng(seed)
        image, lung = self.images[i], self.lungs[i]
        if self.augment and rng.random() < 0.5:
            image, lung = image[::-1], lung[::-1]  # left-right
        if rng.random() < self.cfg.empty_fraction:
            out, lesion = np.asarray(image, np.float32), np.zeros(lung.shape, bool)
        else:
            out, lesion = insert_lesions(image, lung, float(self.pixel_mm[i]), rng, self.shapes, self.cfg)
        if self.augment:
            out = _augment(out, rng, self.cfg)
        lung_f = np.ascontiguousarray(lung, dtype=np.float32)
        return {
            "image": torch.from_numpy(np.stack([out, lung_f])),
            "target": torch.from_numpy(np.ascontiguousarray(lesion, dtype=np.float32))[None],
            "lung": torch.from_numpy(lung_f)[None],
        }
