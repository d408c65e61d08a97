"""Where a model directory's networks run: PyTorch (its safetensors weights) or onnxruntime (an ``export-onnx`` output).

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
from covidctnet.inference.onnx_export import load_onnx_component, load_onnx_denoiser, load_onnx_manifest
from covidctnet.models.registry import Denoiser, load_classifier, load_denoiser, load_slice_model

__all__ = ["BACKENDS", "OpenModel", "check_backend", "open_model"]

BACKENDS = ("torch", "onnx")


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
        md: the model directory (for ``onnx``, the export's copy of ``config.yaml`` and ``SHA256SUMS``).
        backend: ``torch`` or ``onnx``.
        device: where the networks run (always the CPU for ``onnx``).
        manifest: ``onnx.json`` of an ONNX export; ``None`` for ``torch``.
    """
    md: ModelDir
    backend: str
    device: torch.device
    manifest: dict[str, Any] | None = None

    def denoiser(self) -> Denoiser:
        """The ``denoiser`` component, in eval mode."""
        if self.manifest is not None:
            return load_onnx_denoiser(self.md, self.manifest)
        return load_denoiser(self.md.path, device=self.device)

    def classifier(self) -> nn.Module:
        """The ``classifier`` component, in eval mode."""
        if self.manifest is not None:
            return load_onnx_component(self.md, self.manifest, "classifier")
        return load_classifier(self.md, device=self.device)

    def slice_model(self) -> tuple[nn.Module, dict[str, Any]]:
        """The ``model`` component of a slice model directory and its ``config.yaml`` (``threshold`` …)."""
        if self.manifest is not None:
            return load_onnx_component(self.md, self.manifest, "model"), dict(self.md.config)
        return load_slice_model(self.md.path, self.device)


def open_model(model_dir: str | os.PathLike, backend: str = "torch", device: str = "auto") -> OpenModel:
    """Open ``model_dir`` for ``backend``; ``device`` is ignored by ``onnx`` (onnxruntime runs on the CPU).

    Raises:
        ConfigError: unknown backend or device.
        ModelDirError: not a model directory, a hash mismatch, or (``onnx``) not an ``export-onnx`` output.
    """
    if check_backend(backend) == "onnx":
        md, manifest = load_onnx_manifest(model_dir)
        return OpenModel(md, backend, torch.device("cpu"), manifest)
    return OpenModel(load_model_dir(model_dir), backend, resolve_device(device))
