"""Arrays decoded once into uncompressed ``.npy`` files, then read back a row at a time.

Training reads the same volumes many times. A ``.nii.gz`` must be decompressed whole to reach one slice, and keeping
every decoded volume in memory grows with the dataset (254 MosMed control studies of 300 slices at 240×240 float32 are
17.5 GB, per process). So the first reader decodes each volume once into a C-ordered ``.npy`` file in a cache folder
(as nnU-Net unpacks its ``.npz`` files into ``.npy`` beside them), and afterwards an item is one ``os.pread`` of its
rows. The reads are deliberately not memory-mapped: the pages of a memory map that an epoch touches count in the
process's resident set, so RSS would again grow with the data; pages read with ``pread`` stay in the kernel's page
cache, which the kernel frees under pressure.

A cache file is reused while its source file keeps the size and modification time recorded beside it
(``<name>.npy.json``); otherwise it is decoded again. Writes are atomic (temporary file, then rename), so processes that
decode the same volume at the same time (DDP ranks, loader workers) each write the same bytes and never leave a torn
file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from covidctnet.core.errors import InputError
from covidctnet.core.files import atomic_path

__all__ = ["cached_npy", "NpyRows"]


def _stamp(source: Path) -> dict[str, Any]:
    st = source.stat()
    return {"source": source.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached_npy(source: str | os.PathLike, cache_dir: str | os.PathLike, decode: Callable[[Path], np.ndarray],
               name: str | None = None) -> Path:
    """The ``.npy`` cache of ``decode(source)``, written on first use and reused while ``source`` is unchanged.

    Args:
        source: the slow-to-read file (e.g. a ``.nii.gz``).
        cache_dir: folder of the cache files (created if needed).
        decode: ``source path -> array``; its checks (value range, shape) run only when the cache is (re)built.
        name: cache file stem (default: ``source``'s name without ``.nii.gz`` / ``.nii``).

    Returns:
        Path of the C-ordered ``.npy`` file.
    """
    source, cache_dir = Path(source), Path(cache_dir)
    stem = name or source.name.removesuffix(".gz").removesuffix(".nii")
    target = cache_dir / f"{stem}.npy"
    stamp_file = cache_dir / f"{stem}.npy.json"
    stamp = _stamp(source)
    try:
        if target.is_file() and json.loads(stamp_file.read_text()) == stamp:
            return target
    except (OSError, ValueError):
        pass  # no or damaged stamp: decode again
    array = np.ascontiguousarray(decode(source))
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, suffix=".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)
    with atomic_path(stamp_file) as tmp:
        tmp.write_text(json.dumps(stamp))
    return target


class NpyRows:
    """Rows (items along axis 0) of a C-ordered ``.npy`` file, read with ``os.pread`` instead of loading the file.

    Args:
        path: the ``.npy`` file.

    ``rows[k]`` is row ``k`` (shape ``shape[1:]``) and ``rows.read(a, b)`` rows ``a`` to ``b - 1``, both fresh
    arrays. The file descriptor is opened lazily in each process and not pickled, so the object can be handed to
    DataLoader workers.

    Raises:
        InputError: not a ``.npy`` file, or a Fortran-ordered / object array.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"format version {version} (np.save writes 1.0 or 2.0)")
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = reader(fh)
                self.offset = fh.tell()
        except (OSError, ValueError) as err:
            raise InputError(f"{self.path}: not a readable .npy file ({err})") from err
        if fortran or dtype.hasobject:
            raise InputError(f"{self.path}: expected a C-ordered numeric array")
        self.shape: tuple[int, ...] = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker must not share the parent's offset/fd
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop - 1`` as a new ``(stop - start, *shape[1:])`` array."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"rows {start}:{stop} out of range for {self.shape[0]} rows of {self.path}")
        n = (stop - start) * self.row_bytes
        data = os.pread(self._descriptor(), n, self.offset + start * self.row_bytes)
        if len(data) != n:
            raise InputError(f"{self.path}: truncated ({len(data)} of {n} bytes at row {start}); delete it to rebuild")
        return np.frombuffer(bytearray(data), dtype=self.dtype).reshape((stop - start, *self.shape[1:]))

    def __getitem__(self, k: int) -> np.ndarray:
        k = int(k)
        if k < 0:
            k += self.shape[0]
        return self.read(k, k + 1)[0]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, -1
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
