"""Lesion probability maps of the label-free lesion model (``train-lesion-model``), slice by slice.

The model sees each axial slice of the preprocessed volume with its lung mask and gives a lesion probability per
pixel; outside the lungs the map is 0. ``slice-scores`` pools it per original slice into ``lesion_score`` (the mean
probability over the slice's lung voxels, i.e. the expected fraction of the lung that is lesion).
"""

from __future__ import annotations

import numpy as np
import torch

from covidctnet.core.errors import ModelDirError
from covidctnet.core.model_dir import cached_by_model_dir
from covidctnet.models.registry import LesionModel, load_lesion_model, resolve_denoiser_dir
from covidctnet.preprocessing.lungmask3d import lung_mask_3d
from covidctnet.preprocessing.preprocess import PreprocessConfig, preprocess_record

__all__ = ["lesion_probability", "lesion_evidence", "lesion_preprocess", "cached_lesion_model"]


def lesion_probability(array: np.ndarray, lung: np.ndarray, model: LesionModel, batch_size: int = 16) -> np.ndarray:
    """Lesion probability of every voxel of a preprocessed volume.

    Args:
        array: (S, S, Z) preprocessed volume in [0, 1] (``S`` = ``model.size_xy``).
        lung: (S, S, Z) bool lung mask on the same grid.
        model: the loaded lesion model.
        batch_size: slices per forward pass.

    Returns:
        (S, S, Z) float32 in [0, 1], 0 outside the lungs.

    Raises:
        ValueError: ``array`` and ``lung`` differ in shape, or the in-plane size is not the model's.
    """
    if array.shape != lung.shape or array.shape[0] != model.size_xy or array.shape[1] != model.size_xy:
        raise ValueError(f"volume {array.shape} and lung mask {lung.shape} must both be "
                         f"({model.size_xy}, {model.size_xy}, Z) for this lesion model")
    out = np.zeros(array.shape, np.float32)
    todo = np.flatnonzero(lung.any(axis=(0, 1)))  # slices without lung stay 0
    with torch.inference_mode():
        for start in range(0, todo.size, batch_size):
            ks = todo[start: start + batch_size]
            x = np.stack([np.stack([array[:, :, k], lung[:, :, k]]) for k in ks]).astype(np.float32)
            prob = torch.sigmoid(model.model(torch.from_numpy(x).to(model.device))).float().cpu().numpy()[:, 0]
            out[:, :, ks] = np.moveaxis(prob, 0, 2)
    return out * lung


def lesion_evidence(array: np.ndarray, affine: np.ndarray, model: LesionModel, batch_size: int = 16) -> np.ndarray:
    """The lesion map of a preprocessed volume with the lung mask computed from that volume itself: what
    ``residuals --evidence lesion`` writes for the classifier and what ``predict`` computes for it, so both see the
    same input.

    Args:
        array: (S, S, Z) preprocessed volume in [0, 1] (RAS; the model's HU window).
        affine: its (4, 4) affine (the voxel sizes the lung mask needs).
        model, batch_size: see :func:`lesion_probability`.

    Returns:
        (S, S, Z) float32 lesion probability, 0 outside the lungs.
    """
    pre = lesion_preprocess(model)
    hu = np.asarray(array, dtype=np.float32) * (pre.hu_max - pre.hu_min) + pre.hu_min
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    lung = lung_mask_3d(hu, spacing).mask > 0  # type: ignore[arg-type]
    return lesion_probability(array, lung, model, batch_size)


def lesion_preprocess(model: LesionModel) -> PreprocessConfig:
    """The preprocessing the lesion model was trained with (as its directory recorded it when it was loaded).

    Raises:
        ModelDirError: recorded settings that are not a valid preprocessing or another in-plane size.
    """
    pre = preprocess_record(model.preprocess, model.path)
    if pre.size_xy != model.size_xy:
        raise ModelDirError(f"{model.path}: preprocess size_xy {pre.size_xy} differs from the lesion model's input "
                            f"{model.size_xy}")
    return pre


_cached_load = cached_by_model_dir(maxsize=4)(load_lesion_model)


def cached_lesion_model(path: str, device: str = "auto") -> LesionModel:
    """The lesion model of a model directory, loaded once per process (again when the directory is rewritten)."""
    return _cached_load(resolve_denoiser_dir(path).resolve(), device)
