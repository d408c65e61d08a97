"""The OpenVINO backend of ``predict``: an ``export-onnx`` model directory run by OpenVINO's CPU plugin.

OpenVINO reads the ONNX files of :mod:`covidctnet.inference.onnx_export` as they are (no second export) and compiles
them into its own fused CPU kernels. With ``precision: bf16`` the denoiser runs in bfloat16 on CPUs with AVX512-BF16
or AMX (``INFERENCE_PRECISION_HINT``; a CPU with neither runs it in fp32); the classifier always runs in fp32, as
with the torch backend's ``--precision bf16``. On the shared series fp32 matches PyTorch's fp32 to about 1e-7 and
bf16 moves the probabilities by less than 1e-3, for about half the CPU time of PyTorch's kernels at the same
precision (``docs/benchmarks.md``, issue 15).

Install with ``pip install 'covidctnet[openvino]'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from covidctnet.core.errors import ConfigError

__all__ = ["OPENVINO_PRECISIONS", "OpenVinoModule"]

OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
"""``--precision`` → OpenVINO's ``INFERENCE_PRECISION_HINT``. The hint is always set: OpenVINO's own default on a
CPU with bfloat16 is bf16, not fp32."""


class OpenVinoModule(nn.Module):
    """An ONNX graph compiled by OpenVINO for the CPU, behind the ``torch.nn.Module`` call interface.

    The batch axis stays dynamic (a scan's last, shorter batch runs as it is; measured 2% slower than a graph compiled
    for one batch size). OpenVINO gets ``torch.get_num_threads()`` threads, so ``predict --workers N`` splits the cores
    as it does for PyTorch. It has no parameters: it always runs on the CPU.

    Args:
        path: the ``.onnx`` file.
        precision: ``fp32`` or ``bf16`` (:data:`OPENVINO_PRECISIONS`).

    Raises:
        ConfigError: unknown precision, or OpenVINO is not installed.
    """
    def __init__(self, path: str | os.PathLike, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in OPENVINO_PRECISIONS:
            raise ConfigError(f"'precision' must be one of {list(OPENVINO_PRECISIONS)}, not {precision!r}")
        try:
            import openvino as ov
        except ImportError as err:
            raise ConfigError("--backend openvino needs OpenVINO: pip install 'covidctnet[openvino]'") from err
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
            "PERFORMANCE_HINT": "LATENCY",  # one request at a time, with every thread on it
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        })
        self.request = compiled.create_infer_request()
        self.precision = precision
        self.path = Path(path)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a float32 batch (e.g. ``(B, 1, S, S)``); returns the first output as a new float32 array (the request
        reuses its output buffer on the next call)."""
        out = self.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return np.array(out, dtype=np.float32)

    def forward(self, x: Any) -> Any:
        """``x``: CPU tensor of the graph's input shape; returns a CPU float32 tensor."""
        return torch.from_numpy(self.run(x.detach().cpu().numpy()))
