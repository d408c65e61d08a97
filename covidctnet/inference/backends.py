"""Where a model directory's networks run: PyTorch (its safetensors weights), or onnxruntime or OpenVINO (both on an
``export-onnx`` output).

``predict`` and ``predict-slice`` both go through :func:`open_model`, so the backend switch is written once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from covidctnet.core.device import resolve_device
from covidctnet.core.errors import ConfigError, ModelDirError
from covidctnet.core.model_dir import ModelDir, load_model_dir
from covidctnet.inference.onnx_export import (
    INT8_COMPONENT,
    load_onnx_component,
    load_onnx_denoiser,
    load_onnx_manifest,
    onnx_component_path,
)
from covidctnet.inference.openvino_backend import OpenVinoModule
from covidctnet.models.registry import Denoiser, load_classifier, load_denoiser, load_slice_model

__all__ = ["BACKENDS", "BACKEND_PRECISIONS", "OpenModel", "check_backend", "check_precision", "open_model"]

BACKENDS = ("torch", "onnx", "openvino")
BACKEND_PRECISIONS = {"torch": ("fp32", "bf16"), "onnx": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}
"""The denoiser's arithmetic each backend offers; ``int8`` runs the ``denoiser_int8.onnx`` of an export made with
``--int8-calibration`` (:mod:`covidctnet.inference.int8`)."""


def check_backend(backend: str) -> str:
    """Validate a ``--backend`` value.

    Raises:
        ConfigError: not one of :data:`BACKENDS`.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"'backend' must be one of {list(BACKENDS)}, not {backend!r}")
    return backend


def check_precision(backend: str, precision: str) -> str:
    """Validate a ``--precision`` value for ``backend`` (see :data:`BACKEND_PRECISIONS`).

    Raises:
        ConfigError: unknown backend, or a precision the backend does not offer.
    """
    offered = BACKEND_PRECISIONS[check_backend(backend)]
    if precision not in offered:
        hint = {"int8": "; int8 runs the int8 denoiser of an `export-onnx --int8-calibration` folder with --backend "
                        "onnx or openvino", "bf16": "; bf16 is for the torch and openvino backends"}.get(precision, "")
        raise ConfigError(f"'precision' of the {backend} backend must be one of {list(offered)}, not {precision!r}"
                          + hint)
    return precision


@dataclass(frozen=True)
class OpenModel:
    """A hash-checked model directory and the backend its components run on.

    Attributes:
        md: the model directory (for ``onnx`` and ``openvino``, the export's copy of ``config.yaml`` and
            ``SHA256SUMS``).
        backend: one of :data:`BACKENDS`.
        device: where the networks run (always the CPU for ``onnx`` and ``openvino``).
        manifest: ``onnx.json`` of an ONNX export; ``None`` for ``torch``.
        precision: the denoiser's arithmetic with ``onnx`` and ``openvino`` (:data:`BACKEND_PRECISIONS`), fixed
            when it is loaded; the torch backend takes its precision per call (``compute_residual``).
    """
    md: ModelDir
    backend: str
    device: torch.device
    manifest: dict[str, Any] | None = None
    precision: str = "fp32"

    def _component(self, name: str, precision: str = "fp32") -> nn.Module:
        if self.backend == "openvino":
            return OpenVinoModule(onnx_component_path(self.md, self.manifest, name), precision)
        return load_onnx_component(self.md, self.manifest, name)

    def denoiser(self) -> Denoiser:
        """The ``denoiser`` component (``denoiser_int8`` in int8), in eval mode.

        Raises:
            ModelDirError: int8 asked of an export without an int8 denoiser.
        """
        if self.manifest is None:
            return load_denoiser(self.md.path, device=self.device)
        if self.precision != "int8":
            return load_onnx_denoiser(self.md, self.manifest, self._component("denoiser", self.precision))
        if INT8_COMPONENT not in (self.manifest.get("components") or {}):
            raise ModelDirError(f"{self.md.path}: no int8 denoiser; export one with `covidctnet export-onnx SOURCE "
                                f"-o {self.md.path} --int8-calibration CONTROL_SCANS`")
        # int8 convolutions; OpenVINO's remaining (ConvLSTM gate) arithmetic in fp32: bf16 there was not faster
        return load_onnx_denoiser(self.md, self.manifest, self._component(INT8_COMPONENT))

    def classifier(self) -> nn.Module:
        """The ``classifier`` component, in eval mode (fp32 on every backend)."""
        if self.manifest is not None:
            return self._component("classifier")
        return load_classifier(self.md, device=self.device)

    def slice_model(self) -> tuple[nn.Module, dict[str, Any]]:
        """The ``model`` component of a slice model directory and its ``config.yaml`` (``threshold`` …)."""
        if self.manifest is not None:
            return self._component("model"), dict(self.md.config)
        return load_slice_model(self.md.path, self.device)


def open_model(model_dir: str | os.PathLike, backend: str = "torch", device: str = "auto",
               precision: str = "fp32") -> OpenModel:
    """Open ``model_dir`` for ``backend``; ``device`` is ignored by ``onnx`` and ``openvino`` (CPU only), and
    ``precision`` only checked for ``torch``, which takes it per call (see :class:`OpenModel`).

    Raises:
        ConfigError: unknown backend or device, or a precision the backend does not offer.
        ModelDirError: not a model directory, a hash mismatch, or (``onnx``, ``openvino``) not an ``export-onnx``
            output.
    """
    check_precision(backend, precision)
    if backend == "torch":
        return OpenModel(load_model_dir(model_dir), backend, resolve_device(device))
    md, manifest = load_onnx_manifest(model_dir)
    return OpenModel(md, backend, torch.device("cpu"), manifest, precision)
