"""Where a model directory's networks run: PyTorch (its safetensors weights), or onnxruntime or OpenVINO (both on an
ONNX export: an ``export-onnx`` output, or the export cache's copy of a PyTorch model directory).

``predict``, ``slice-scores``, ``residuals`` and ``predict-slice`` all go through :func:`open_model`, so the backend
switch is written once. ``auto``, the default, picks (:func:`resolve_backend`):

=========================  ==========================================================================================
where                      ``auto`` runs
=========================  ==========================================================================================
CUDA (``--device auto``    PyTorch: the GPU is faster than either CPU runtime
with a GPU, or ``cuda``)
CPU, OpenVINO installed    OpenVINO fp32: its fused kernels run the denoiser at the machine's fp32 matrix-product
                           ceiling, about 1.5x PyTorch's speed, with PyTorch's results within 1e-4
CPU, onnxruntime only      onnxruntime fp32: as fast as OpenVINO in fp32 here (``docs/benchmarks.md``)
CPU, neither               PyTorch
=========================  ==========================================================================================

On the CPU runtimes a PyTorch model directory is exported to ONNX once, into a cache
(:func:`covidctnet.inference.onnx_export.cached_export`: ``$XDG_CACHE_HOME/covidctnet``, else
``~/.cache/covidctnet``; delete it to clear the cache), and later runs reuse the export. ``--precision bf16`` makes
``auto`` pick OpenVINO bf16 on the CPU when installed (else PyTorch bf16), ``int8`` the int8 denoiser of an
``export-onnx --int8-calibration`` folder; both stay opt-in. Grad-CAM (``predict-slice --cam``) needs PyTorch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidctnet.core.device import resolve_device
from covidctnet.core.errors import ConfigError, ModelDirError
from covidctnet.core.model_dir import ModelDir, load_model_dir
from covidctnet.inference.onnx_export import (
    INT8_COMPONENT,
    cached_export,
    is_onnx_export,
    load_onnx_component,
    load_onnx_denoiser,
    load_onnx_manifest,
    onnx_component_path,
)
from covidctnet.inference.openvino_backend import OpenVinoModule
from covidctnet.models.registry import Denoiser, load_classifier, load_denoiser, load_slice_model

__all__ = ["BACKENDS", "BACKEND_PRECISIONS", "OpenModel", "check_backend", "check_precision", "installed_runtimes",
           "open_model", "resolve_backend"]

BACKENDS = ("auto", "torch", "onnx", "openvino")
"""``auto`` resolves to one of the others (:func:`resolve_backend`)."""
BACKEND_PRECISIONS = {"auto": ("fp32", "bf16", "int8"), "torch": ("fp32", "bf16"), "onnx": ("fp32", "int8"),
                      "openvino": ("fp32", "bf16", "int8")}
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
        source: the model directory asked for (``md.path`` unless ``md`` is its cached export).
    """
    md: ModelDir
    backend: str
    device: torch.device
    manifest: dict[str, Any] | None = None
    precision: str = "fp32"
    source: Path | None = None

    @property
    def name(self) -> str:
        """The model's name (``config.yaml``'s ``name``, else the folder name of the directory asked for)."""
        return str(self.md.config.get("name", (self.source or self.md.path).name))

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
            den = load_onnx_denoiser(self.md, self.manifest, self._component("denoiser", self.precision))
        elif INT8_COMPONENT not in (self.manifest.get("components") or {}):
            if self.source not in (None, self.md.path):  # the cache's export of a PyTorch model directory
                raise ModelDirError(f"{self.source}: int8 runs the int8 denoiser of an export-onnx folder; export one "
                                    f"with `covidctnet export-onnx {self.source} -o ONNX_DIR --int8-calibration "
                                    "CONTROL_SCANS` and pass --model ONNX_DIR")
            raise ModelDirError(f"{self.md.path}: no int8 denoiser; export one with `covidctnet export-onnx SOURCE "
                                f"-o {self.md.path} --int8-calibration CONTROL_SCANS`")
        else:
            # int8 convolutions; OpenVINO's remaining (ConvLSTM gate) arithmetic in fp32: bf16 there was not faster
            den = load_onnx_denoiser(self.md, self.manifest, self._component(INT8_COMPONENT))
        # the directory asked for, not the cache entry, names it in manifests and messages
        return dataclasses.replace(den, path=self.source) if self.source is not None else den

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


def installed_runtimes() -> set[str]:
    """The CPU runtimes ``auto`` may pick: ``openvino`` and ``onnx`` (onnxruntime), each when its packages are
    installed (both need ``onnx`` and ``onnxruntime`` to build and check the export). Nothing is imported."""
    def found(name: str) -> bool:
        if name in sys.modules:  # None there means "not importable" (as tests fake a missing package)
            return sys.modules[name] is not None
        return importlib.util.find_spec(name) is not None

    exportable = found("onnx") and found("onnxruntime")
    return {r for r, ok in (("openvino", exportable and found("openvino")), ("onnx", exportable)) if ok}


def resolve_backend(backend: str = "auto", device: str = "auto", precision: str = "fp32",
                    model_dir: str | os.PathLike | None = None) -> str:
    """The backend ``backend`` means: itself, or for ``auto`` (module docstring table) PyTorch on CUDA, else
    OpenVINO, onnxruntime or PyTorch, the first installed that offers ``precision``. An ``export-onnx`` folder and
    ``int8`` run on the CPU runtimes whatever the device.

    Raises:
        ConfigError: unknown backend or device, a precision the backend does not offer, or (``auto``) an ONNX model
            directory or ``int8`` without onnxruntime or OpenVINO installed.
    """
    check_precision(backend, precision)
    if backend != "auto":
        return backend
    onnx_only = (model_dir is not None and is_onnx_export(model_dir)) or precision == "int8"
    if not onnx_only and resolve_device(device).type == "cuda":
        return "torch"
    runtimes = installed_runtimes()
    for candidate in ("openvino", "onnx"):
        if candidate in runtimes and precision in BACKEND_PRECISIONS[candidate]:
            return candidate
    if onnx_only:
        raise ConfigError("an ONNX model directory or int8 needs onnxruntime or OpenVINO: pip install "
                          "'covidctnet[onnx]' (or 'covidctnet[onnx,openvino]')")
    return "torch"


def open_model(model_dir: str | os.PathLike, backend: str = "auto", device: str = "auto",
               precision: str = "fp32") -> OpenModel:
    """Open ``model_dir`` for ``backend`` (``auto``: :func:`resolve_backend`); ``device`` is ignored by ``onnx`` and
    ``openvino`` (CPU only), and ``precision`` only checked for ``torch``, which takes it per call (see
    :class:`OpenModel`).

    ``onnx`` and ``openvino`` run an ``export-onnx`` folder as it is, and a PyTorch model directory through its
    cached export (:func:`covidctnet.inference.onnx_export.cached_export`, built on first use).

    Raises:
        ConfigError: unknown backend or device, or a precision the backend does not offer.
        ModelDirError: not a model directory, a hash mismatch, or an export that fails its checks against PyTorch.
    """
    backend = resolve_backend(backend, device, precision, model_dir)
    check_precision(backend, precision)
    if backend == "torch":
        return OpenModel(load_model_dir(model_dir), backend, resolve_device(device), precision=precision)
    onnx_dir = model_dir if is_onnx_export(model_dir) else cached_export(model_dir)
    md, manifest = load_onnx_manifest(onnx_dir)
    return OpenModel(md, backend, torch.device("cpu"), manifest, precision, source=Path(model_dir))
