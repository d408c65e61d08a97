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
from covidctnet.core.errors import ConfigError
from covidctnet.core.model_dir import ModelDir, load_model_dir
from covidctnet.inference.onnx_export import (
    load_onnx_component,
    load_onnx_denoiser,
    load_onnx_manifest,
    onnx_component_path,
)
from covidctnet.inference.openvino_backend import OpenVinoModule
from covidctnet.models.registry import Denoiser, load_classifier, load_denoiser, load_slice_model

__all__ = ["BACKENDS", "OpenModel", "check_backend", "open_model"]

BACKENDS = ("torch", "onnx", "openvino")


def check_backend(backend: str) -> str:
    """Validate a ``--backend`` value.

    Raises:
        ConfigError: not one of :data:`BACKENDS`.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"'backend' must be one of {list(BACKENDS)}, not {backend!r}")
    return backend


@dataclass(frozen=True)
class OpenModel:
    """A hash-checked model directory and the backend its components run on.

    Attributes:
        md: the model directory (for ``onnx`` and ``openvino``, the export's copy of ``config.yaml`` and
            ``SHA256SUMS``).
        backend: one of :data:`BACKENDS`.
        device: where the networks run (always the CPU for ``onnx`` and ``openvino``).
        manifest: ``onnx.json`` of an ONNX export; ``None`` for ``torch``.
        precision: the denoiser's arithmetic with ``openvino`` (``fp32`` or ``bf16``), fixed when it is compiled;
            the torch backend takes its precision per call (``compute_residual``), ``onnx`` runs in fp32.
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
        """The ``denoiser`` component, in eval mode."""
        if self.manifest is not None:
            return load_onnx_denoiser(self.md, self.manifest, self._component("denoiser", self.precision))
        return load_denoiser(self.md.path, device=self.device)

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
    ``precision`` is used by ``openvino`` only (see :class:`OpenModel`).

    Raises:
        ConfigError: unknown backend or device.
        ModelDirError: not a model directory, a hash mismatch, or (``onnx``, ``openvino``) not an ``export-onnx``
            output.
    """
    if check_backend(backend) != "torch":
        md, manifest = load_onnx_manifest(model_dir)
        return OpenModel(md, backend, torch.device("cpu"), manifest, precision)
    return OpenModel(load_model_dir(model_dir), backend, resolve_device(device))
