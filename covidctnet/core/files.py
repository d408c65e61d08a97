"""File helpers: atomic writes (a file is either complete or absent), CSV and JSON-plain values, sha256 hashes."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


__all__ = [
    "atomic_path",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_dir",
    "remove_stale_temps",
    "sha256_file",
    "read_csv_dicts",
    "write_csv",
    "to_jsonable",
]


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


def read_csv_dicts(path: str | os.PathLike, error: type[Exception], what: str, header: str) -> list[dict[str, str]]:
    """The rows of a small CSV as dicts keyed by its header (a UTF-8 BOM ignored), with one-line errors.

    Args:
        path: the CSV file.
        error: the exception class raised (the caller's typed error, e.g. ``LabelError``).
        what: what the file should be, for messages (``"labels CSV"``).
        header: the header the file should have, for the message about an empty file (``"study_id,label"``).

    Raises:
        error: the file cannot be read, or it has no data row.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise error(f"{path}: cannot read {what}: {err.strerror or err}") from err
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise error(f"{path}: {what} is empty; expected a header '{header}' and rows")
    return rows


def write_csv(path: str | os.PathLike, header: Sequence[str],
              rows: Iterable[Sequence[Any]] | Iterable[Mapping[str, Any]]) -> None:
    """Write a CSV (``\\n`` line ends, UTF-8) atomically: readers never see half a file.

    ``rows`` are sequences in ``header`` order, or mappings whose ``header`` keys are written (other keys ignored).
    """
    buf = io.StringIO()
    rows = list(rows)
    if rows and isinstance(rows[0], Mapping):
        writer: Any = csv.DictWriter(buf, fieldnames=list(header), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
    else:
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json``/``yaml`` write as plain values.

    numpy scalars and arrays become Python numbers and lists, tuples become lists, objects with ``to_dict()`` their
    dict, and NaN or infinities ``None`` (JSON has neither).
    """
    import numpy as np  # here: the labels and CSV helpers of this module are imported by the light command line

    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj
