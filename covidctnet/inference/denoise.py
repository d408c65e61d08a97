"""One preprocessed volume through the denoiser: the residual ``input - denoised``, resampled to the classifier's grid.

:func:`compute_residual` is what ``predict``, ``slice-scores``, ``residuals`` and the int8 gate call; it takes any
network with the ``torch.nn.Module`` call interface (PyTorch, or the onnxruntime and OpenVINO modules of
:mod:`covidctnet.inference.backends`). It sits below :mod:`covidctnet.inference.residuals` (the batch command) so that
the export and backend modules, which import it, can be imported by that command without an import cycle.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.transform import resize

from covidctnet.core.device import resolve_device
from covidctnet.core.errors import ConfigError, InputError, ShapeError
from covidctnet.core.progress import progress_task
from covidctnet.models.registry import Denoiser

__all__ = ["PRECISIONS", "check_torch_precision", "compute_residual", "resample_stack"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
"""Denoiser arithmetic of a PyTorch denoiser: ``fp32`` (exact, the default) or ``bf16`` (autocast + channels-last;
several times faster on CPUs with AMX/AVX512-BF16 and on recent GPUs, denoised values within about 3e-3 of fp32)."""
_RANGE_TOLERANCE = 1e-3


def _check_volume(volume: np.ndarray, expected: int | None, source: str) -> None:
    if volume.ndim != 3:
        raise ShapeError(f"{source}: expected a 3-D preprocessed volume (X, Y, Z), not shape {tuple(volume.shape)}")
    if expected is not None and volume.shape[:2] != (expected, expected):
        raise ShapeError(f"{source}: in-plane size {volume.shape[0]}x{volume.shape[1]}, the denoiser expects "
                         f"{expected}x{expected}; preprocess with --size {expected}")
    if not np.isfinite(volume).all():
        raise InputError(f"{source}: the volume holds NaN or infinite values")
    lo, hi = float(volume.min()), float(volume.max())
    if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        raise InputError(f"{source}: intensities span {lo:.4g}..{hi:.4g}, expected a preprocessed volume in [0, 1]; "
                         "run `covidctnet preprocess` first")


def check_torch_precision(precision: str, device: Any) -> None:
    """Refuse an unknown precision; warn when bf16 would be emulated (slower than fp32) on ``device``.

    Raises:
        ConfigError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"'precision' must be one of {list(PRECISIONS)}, not {precision!r}")
    if precision != "bf16":
        return
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not native:
        logger.warning("bf16: %s has no native bfloat16 support; the denoiser will be slower than in fp32", device)


def _autocast(precision: str, device: Any) -> Any:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_residual(
    volume_array: np.ndarray,
    model: Any,
    depth: int = 50,
    size: int = 240,
    batch_size: int = 8,
    device: str | Any | None = None,
    source: str = "volume",
    precision: str = "fp32",
) -> np.ndarray:
    """Residual ``input - denoised`` of a preprocessed volume, resampled to ``(size, size, depth)``.

    Args:
        volume_array: ``(X, Y, Z)`` float32 in [0, 1], axis 2 = axial slices (a ``covidctnet preprocess`` output,
            e.g. ``nib.load(p).get_fdata(dtype=np.float32)``); ``X == Y`` must be the denoiser's input size.
        model: a :class:`Denoiser` from :func:`load_denoiser` (its input size is checked), or a bare BCDU-Net.
        depth: slices of the output (official 50).
        size: in-plane size of the output.
        batch_size: slices per forward pass (memory: one batch of activations).
        device: where to run; ``None``: the model's device (a :class:`Denoiser` knows it).
        source: name for error messages (file or study id).
        precision: ``fp32`` or ``bf16`` (see :data:`PRECISIONS`) of a PyTorch network; a network without
            parameters (the onnxruntime and OpenVINO modules of :mod:`covidctnet.inference.backends`) has its
            arithmetic fixed when it was compiled, and ``precision`` is then only checked.

    Returns:
        ``(size, size, depth)`` float32, signed (positive where the slice is brighter than its denoised version).
        Its affine: :func:`covidctnet.preprocessing.preprocess.resize_affine`.

    Raises:
        ShapeError: not 3-D, or the in-plane size is not the denoiser's.
        InputError: non-finite values or values outside [0, 1] (not preprocessed).
    """
    expected = model.size_xy if isinstance(model, Denoiser) else None
    net = model.model if isinstance(model, Denoiser) else model
    first = next(iter(net.parameters()), None)  # None: compiled elsewhere (onnxruntime, OpenVINO), on the CPU
    if device is None:
        dev = model.device if isinstance(model, Denoiser) else torch.device("cpu") if first is None else first.device
    else:
        dev = device if isinstance(device, torch.device) else resolve_device(device)
    if batch_size < 1 or depth < 1 or size < 1:
        raise ConfigError(f"batch_size, depth and size must be >= 1, not {batch_size}, {depth}, {size}")
    if first is None:  # its arithmetic was fixed when it was compiled: no autocast, no layout change
        if precision not in PRECISIONS:
            raise ConfigError(f"'precision' must be one of {list(PRECISIONS)}, not {precision!r}")
        precision = "fp32"
    check_torch_precision(precision, dev)
    volume = np.asarray(volume_array, dtype=np.float32)
    _check_volume(volume, expected, source)
    was_training = net.training
    # oneDNN's bf16 convolutions are fast in NHWC; fp32 keeps the default layout so that its results do not move
    layout = torch.channels_last if precision == "bf16" else torch.contiguous_format
    net.eval()
    net.to(dev, memory_format=layout)
    residual = np.empty(volume.shape, dtype=np.float32)
    # per-slice progress: on a CPU a 300-slice study takes about a minute, one item of the batch's progress
    bar = progress_task(volume.shape[2], f"denoise {Path(source).name}", "slices")
    try:
        with torch.inference_mode(), _autocast(precision, dev), bar:
            for k in range(0, volume.shape[2], batch_size):
                chunk = np.ascontiguousarray(np.moveaxis(volume[:, :, k : k + batch_size], 2, 0))  # (b, X, Y)
                x = torch.from_numpy(chunk)[:, None].to(dev, memory_format=layout)
                denoised = net(x).float()
                residual[:, :, k : k + batch_size] = np.moveaxis((x - denoised)[:, 0].cpu().numpy(), 0, 2)
                bar.advance(chunk.shape[0])
    finally:
        net.train(was_training)
        if precision == "bf16":
            net.to(memory_format=torch.contiguous_format)
    return resample_stack(residual, (size, size, depth))


def resample_stack(array: np.ndarray, out_shape: tuple[int, int, int]) -> np.ndarray:
    """Resize a ``(X, Y, Z)`` array to ``out_shape`` over the same field of view (affine:
    :func:`covidctnet.preprocessing.preprocess.resize_affine`).

    As the official code: ``skimage.transform.resize``, linear, reflect mode, Gaussian anti-aliasing along the
    shrunk axes; values are not clipped or rescaled (signed residuals stay signed).

    Returns:
        ``out_shape`` float32 (the input itself when the shape already matches).
    """
    if tuple(array.shape) == tuple(out_shape):
        return np.asarray(array, dtype=np.float32)
    return resize(array, out_shape, order=1, mode="reflect", anti_aliasing=True, preserve_range=True).astype(
        np.float32)


