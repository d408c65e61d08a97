"""The torch device a command runs on."""

from __future__ import annotations

from typing import Any

from covidctnet.core.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(device: Any = "auto") -> Any:
    """Turn ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` (or a ``torch.device``) into a ``torch.device``; ``auto``
    takes CUDA when present.

    Raises:
        ConfigError: CUDA was asked for but is not available, or the name is unknown.
    """
    import torch  # not at module top: `covidctnet --help` and preprocessing stay torch-free

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {device}: not a device name; use auto, cpu, cuda or cuda:N") from err
