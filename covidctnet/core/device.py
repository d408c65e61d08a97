"""The torch device a command runs on."""

from __future__ import annotations

from typing import Any

from covidctnet.core.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(device: Any = "auto") -> Any:
    """Turn ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` (or a ``torch.device``) into a ``torch.device``; ``auto``
    takes CUDA when present, and ``gpu`` / ``gpu:N`` are aliases of ``cuda`` / ``cuda:N``.

    Raises:
        ConfigError: CUDA was asked for but is not available, or the name is unknown.
    """
    import torch  # not at module top: `covidctnet --help` and preprocessing stay torch-free

    if isinstance(device, torch.device):
        return device
    given = device
    if device == "gpu" or device.startswith("gpu:"):  # what users of other tools type for CUDA
        device = "cuda" + device[3:]
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {given}: CUDA is not available on this machine; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {given}: not a device name; use auto, cpu, cuda, cuda:N or gpu") from err
