"""Progress bars for long work, shown only on an interactive terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from rich.progress import track

__all__ = ["progress"]

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool | None = None) -> Iterable[T]:
    """Wrap ``items`` in a rich progress bar on an interactive stderr (or when ``enabled`` is True)."""
    if enabled is None:
        enabled = sys.stderr.isatty() and os.environ.get("COVIDCTNET_NO_PROGRESS") != "1"
    if not enabled:
        return items

    return track(items, total=total, description=desc, transient=False)
