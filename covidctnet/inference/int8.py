"""An int8 denoiser for CPU inference: static quantisation of an export's ``denoiser.onnx``, and the accuracy gate
it must pass before it is written.

``covidctnet export-onnx MODEL -o OUT --int8-calibration CONTROL_SCANS…`` adds ``denoiser_int8.onnx`` to the ONNX
model directory, and ``predict --backend openvino|onnx --precision int8`` runs it. The quantisation is onnxruntime's
``quantize_static`` (QDQ format, per-channel int8 weights, uint8 activations, MinMax ranges) over
``calibration_slices`` slices spread evenly through the given scans, preprocessed as the model's ``config.yaml``
says. Only the convolutions are quantised: the ConvLSTM gates' element-wise products stay float (quantised, they
made a graph OpenVINO could not compile), and they cost little.

**Gate.** Each calibration scan is then predicted whole with the fp32 and the int8 denoiser (the same fp32
classifier): the residual maps must correlate ≥ :data:`GATE_MIN_CORRELATION` and no class probability may move by
more than :data:`GATE_MAX_PROBABILITY_CHANGE`, or the export is refused and nothing is written. The figures go into
``onnx.json``. They are measured on the calibration scans (whole volumes; the calibration used a few slices of
them); ``tests/inference/test_int8.py`` checks the gate on other scans than the calibration one. Its speed against
bf16 and fp32: ``docs/benchmarks.md`` and ``docs/implementation-notes.md``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidctnet.core.errors import ConfigError, ModelDirError
from covidctnet.inference.denoise import compute_residual
from covidctnet.io.batch import discover_studies
from covidctnet.io.checks import check_volume
from covidctnet.io.volume import read_volume
from covidctnet.models.cnn3d import predict_proba, residual_to_network_input
from covidctnet.preprocessing.preprocess import PreprocessConfig, preprocess_volume

__all__ = [
    "GATE_MAX_PROBABILITY_CHANGE",
    "GATE_MIN_CORRELATION",
    "calibration_volumes",
    "gate_int8",
    "quantize_denoiser",
]

logger = logging.getLogger(__name__)

GATE_MIN_CORRELATION = 0.99
"""Smallest accepted Pearson correlation of the int8 and fp32 residual maps of a scan (issue 15's gate)."""
GATE_MAX_PROBABILITY_CHANGE = 0.01
"""Largest accepted change of a class probability between the int8 and fp32 denoisers (issue 15's gate)."""


def calibration_volumes(inputs: Sequence[str | os.PathLike], cfg: PreprocessConfig) -> list[tuple[str, np.ndarray]]:
    """Read, check and preprocess the calibration scans (control CTs, as the denoiser was trained on).

    Returns:
        ``[(study_id, (X, Y, Z) float32 in [0, 1])]``.

    Raises:
        InputError: a path does not exist or a scan is unreadable or fails the input checks (one line, naming it).
    """
    out = []
    for study in discover_studies(inputs):
        volume = read_volume(study.path)
        check_volume(volume, cfg.limits)
        out.append((study.study_id, preprocess_volume(volume, cfg)[0]))
    return out


def quantize_denoiser(fp32_path: Path, volumes: list[tuple[str, np.ndarray]], out_path: Path,
                      slices: int = 32, batch: int = 4) -> dict[str, Any]:
    """Write the int8 ``out_path`` from ``fp32_path`` (see the module docstring); returns what was done.

    Args:
        fp32_path: the exported ``denoiser.onnx`` ((B, 1, S, S) input named ``input``).
        volumes: the calibration scans from :func:`calibration_volumes`.
        out_path: the int8 ``.onnx`` to write.
        slices: calibration slices in all, spread over the scans in proportion to their length.
        batch: slices per calibration batch.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if slices < 1:
        raise ConfigError(f"calibration_slices must be >= 1, not {slices}")
    starts = np.cumsum([0] + [v.shape[2] for _, v in volumes])  # slice k of all scans is in scan searchsorted(k)
    chosen = np.unique(np.linspace(0, starts[-1] - 1, min(slices, starts[-1])).round().astype(int))
    scan = np.searchsorted(starts, chosen, side="right") - 1
    picked = np.stack([volumes[v][1][:, :, k - starts[v]] for v, k in zip(scan, chosen)])[:, None]  # (N, 1, X, Y)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": np.ascontiguousarray(picked[i : i + batch])}
                                 for i in range(0, len(picked), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    # onnxruntime's quantiser logs a line per copied bias through the root logger (logging.info): not for users
    quiet = logging.Filter("covidctnet")  # a filter on the root logger sees only records logged on root itself
    logging.getLogger().addFilter(quiet)
    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)  # shape inference and graph clean-up
        quantize_static(str(pre), str(out_path), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "ConvTranspose"])
    finally:
        logging.getLogger().removeFilter(quiet)
        pre.unlink(missing_ok=True)
    return {
        "method": "onnxruntime quantize_static: QDQ, per-channel int8 weights, uint8 activations, MinMax; "
                  "Conv and ConvTranspose only",
        "calibration_studies": [sid for sid, _ in volumes],
        "calibration_slices": len(picked),
        "slices_available": int(starts[-1]),
    }


def gate_int8(volumes: list[tuple[str, np.ndarray]], fp32_denoiser: torch.nn.Module, int8_denoiser: torch.nn.Module,
              classifier: torch.nn.Module, depth: int, size: int, batch_size: int = 8) -> list[dict[str, Any]]:
    """Predict each scan with both denoisers and check :data:`GATE_MIN_CORRELATION` and
    :data:`GATE_MAX_PROBABILITY_CHANGE`.

    Args:
        volumes: preprocessed scans (:func:`calibration_volumes`).
        fp32_denoiser, int8_denoiser: (B, 1, S, S) → denoised, on the CPU.
        classifier: (B, 1, D, H, W) residual → logits.
        depth, size: the classifier's residual grid.

    Returns:
        One row per scan: ``study``, ``residual_correlation``, ``max_probability_change``.

    Raises:
        ModelDirError: a scan fails the gate (the message gives both figures).
    """
    rows = []
    for sid, volume in volumes:
        residuals, probs = [], []
        for net in (fp32_denoiser, int8_denoiser):
            residual = compute_residual(volume, net, depth, size, batch_size, device="cpu", source=sid)
            residuals.append(residual.ravel())
            probs.append(predict_proba(classifier, residual_to_network_input(residual)[None])[0].numpy())
        corr = float(np.corrcoef(residuals[0], residuals[1])[0, 1])
        change = float(np.abs(probs[1] - probs[0]).max())
        rows.append({"study": sid, "residual_correlation": round(corr, 6), "max_probability_change": round(change, 6)})
        logger.info("int8 gate, %s: residual correlation %.6f, largest probability change %.4f", sid, corr, change)
        if not (corr >= GATE_MIN_CORRELATION and change <= GATE_MAX_PROBABILITY_CHANGE):  # `not >=` catches NaN
            raise ModelDirError(
                f"{sid}: the int8 denoiser fails the accuracy gate (residual correlation {corr:.4f}, needs >= "
                f"{GATE_MIN_CORRELATION}; largest probability change {change:.4f}, needs <= "
                f"{GATE_MAX_PROBABILITY_CHANGE}); export refused, nothing written"
            )
    return rows
