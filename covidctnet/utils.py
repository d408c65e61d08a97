"""Small shared helpers: atomic file writes, hashing, device choice and progress bars."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_dir",
    "remove_stale_temps",
    "sha256_file",
    "resolve_device",
    "progress",
]

T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on failure removed.

    A run killed at any moment therefore leaves either the old file or the complete new one, never a partial file.
    ``suffix`` keeps the extension a writer needs to pick the format (e.g. ``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; outputs are meant to be shared like any other file
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (0755 folder, 0644 files), on
    failure it is removed. The ``.tmp`` suffix lets :func:`remove_stale_temps` clean up after a killed run."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        # mkdtemp makes the folder 0700 and safetensors writes 0600: give the usual permissions so the folder can
        # be shared between users like any other output.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete what writes killed half-way left in ``folder`` (not below it): the hidden ``.NAME.*.tmp*`` files of
    :func:`atomic_path` and the folders of :func:`atomic_dir`.

    Call it only when no other process is writing into ``folder`` (at the start of a run or a resume).

    Returns:
        The paths removed.
    """
    import shutil

    stale = sorted(Path(folder).glob(".*.tmp*")) if Path(folder).is_dir() else []
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_device(device: str = "auto") -> Any:
    """Turn ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` into a ``torch.device``; ``auto`` takes CUDA when present.

    Raises:
        ConfigError: CUDA was asked for but is not available, or the name is unknown.
    """
    import torch

    from covidctnet.errors import ConfigError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {device}: not a device name; use auto, cpu, cuda or cuda:N") from err


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool | None = None) -> Iterable[T]:
    """Wrap ``items`` in a rich progress bar on an interactive stderr (or when ``enabled`` is True)."""
    if enabled is None:
        enabled = sys.stderr.isatty() and os.environ.get("COVIDCTNET_NO_PROGRESS") != "1"
    if not enabled:
        return items
    from rich.progress import track

    return track(items, total=total, description=desc, transient=False)
