"""Progress of long work: live bars on a terminal, the same figures as log lines when stderr is not a terminal.

On an interactive stderr, a loop shows a rich progress bar (on stderr, so stdout stays clean for reports) with its
count, elapsed time and ETA. A loop started inside another one (a study's slices inside a batch of studies) adds its own
bar under the outer one and removes it when it ends, so a 300-slice study no longer sits on one item for a minute.

When stderr is not a terminal (redirected to a file, a batch scheduler's log, a CI job), the same figures go to the
``covidctnet.progress`` logger at INFO, e.g. ``predict: 3/10 studies (30%), 1 min 12 s elapsed, ETA 2 min 48 s``.
Lines are spaced so that a log file shows where a long run is without flooding: the outermost loop logs at each 10%
step, but not within :data:`LOG_MIN_GAP_S` seconds of its previous line, and its last step once it logged anything;
any loop logs a step that comes :data:`LOG_MAX_GAP_S` seconds or more after its previous line, the only rule for a
nested loop (its 10% steps would flood the log). ``COVIDCTNET_NO_PROGRESS=1`` turns bars and lines off.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

__all__ = ["LOG_MAX_GAP_S", "LOG_MIN_GAP_S", "ProgressTask", "format_duration", "progress", "progress_task"]

T = TypeVar("T")

logger = logging.getLogger("covidctnet.progress")

LOG_STEPS = 10
"""The outermost loop logs a line at each ``1 / LOG_STEPS`` of its work (when at least :data:`LOG_MIN_GAP_S` apart)."""
LOG_MIN_GAP_S = 5.0
"""Shortest time between two log lines of the outermost loop (a fast loop logs few lines, none under 5 s)."""
LOG_MAX_GAP_S = 30.0
"""Longest time without a line while a loop runs (the only rule for nested loops, which would flood the log)."""

_clock = time.monotonic
_open: list[ProgressTask] = []  # the loops running now, outermost first
_display: Progress | None = None  # the one live display on the terminal, shared by nested bars
_swapped: list[tuple[logging.StreamHandler, Any]] = []  # log handlers writing through the display while it is on


def _mode(enabled: bool | None) -> str | None:
    """``"bar"``, ``"log"`` or ``None`` (no progress)."""
    if enabled is not None:
        return "bar" if enabled else None
    if os.environ.get("COVIDCTNET_NO_PROGRESS") == "1":
        return None
    return "bar" if sys.stderr.isatty() else "log"


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _eta(done: float, total: float | None, elapsed: float) -> str:
    """``"ETA 1 min 30 s"`` from the mean pace so far (known after the first unit, unlike a windowed speed), or ``""``."""
    if not total or not 0 < done < total:
        return ""
    return f"ETA {format_duration(elapsed / done * (total - done))}"


class _CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        total = "?" if task.total is None else f"{task.total:.0f}"
        return Text(f"{task.completed:.0f}/{total} {task.fields['unit']}")


class _EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(_eta(task.completed, task.total, task.elapsed or 0.0))


class ProgressTask:
    """Progress of one loop of ``total`` units; use through :func:`progress_task` or :func:`progress`.

    Args:
        total: units of work (``None``: unknown, no percentage or ETA).
        desc: what is running (``"predict"``, ``"denoise study_0001"``); no patient identifier.
        unit: what is counted (``"studies"``, ``"slices"``).
        mode: ``"bar"`` (rich bar on stderr), ``"log"`` (INFO lines) or ``None`` (nothing).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "items", mode: str | None = "log") -> None:
        self.total, self.desc, self.unit, self.mode = total, desc, unit, mode
        self.done = 0
        self.nested = False
        self._start = self._last_log = _clock()
        self._last_logged_done = 0
        self._task: Any = None

    def __enter__(self) -> ProgressTask:
        global _display
        self.nested = bool(_open)
        self._start = self._last_log = _clock()
        if self.mode == "bar":
            if _display is None:
                _display = Progress(TextColumn("{task.description}"), BarColumn(), _CountColumn(),
                                    TimeElapsedColumn(), _EtaColumn(), console=Console(stderr=True))
                stderr = sys.stderr
                _display.start()  # replaces sys.stderr by a proxy that prints above the bars
                _route_logs(stderr, sys.stderr)
            self._task = _display.add_task(self.desc, total=self.total, unit=self.unit)
        if self.mode is not None:
            _open.append(self)
        return self

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units done (and update the bar or log a line when it is time)."""
        self.done += n
        if self.mode == "bar" and _display is not None:
            _display.advance(self._task, n)
        elif self.mode == "log":
            now = _clock()
            gap = now - self._last_log
            # the outermost loop's last line always comes once a line was logged: the log shows the end of the run
            finished = not self.nested and self._last_logged_done > 0 and self.done == self.total
            if (not self.nested and self._step_crossed() and gap >= LOG_MIN_GAP_S) or gap >= LOG_MAX_GAP_S or finished:
                logger.info("%s", self.line(now))
                self._last_log, self._last_logged_done = now, self.done

    def _step_crossed(self) -> bool:
        """Whether a 10% step (or the end) was passed since the last line."""
        if not self.total:
            return False
        if self.done >= self.total:
            return True
        return self.done * LOG_STEPS // self.total > self._last_logged_done * LOG_STEPS // self.total

    def line(self, now: float | None = None) -> str:
        """The progress as one line: count, percentage, elapsed time and ETA."""
        elapsed = (_clock() if now is None else now) - self._start
        if not self.total:
            return f"{self.desc}: {self.done} {self.unit}, {format_duration(elapsed)} elapsed"
        text = (f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{format_duration(elapsed)} elapsed")
        eta = _eta(self.done, self.total, elapsed)
        return f"{text}, {eta}" if eta else text

    def __exit__(self, *exc: object) -> None:
        global _display
        if self.mode is None:
            return
        _open.remove(self)
        if self.mode == "bar" and _display is not None:
            if _open:  # an inner bar goes when its loop ends; the outer one stays on screen
                _display.remove_task(self._task)
            else:
                _route_logs(None, None)
                _display.stop()
                _display = None


def _route_logs(stderr: Any, proxy: Any) -> None:
    """Point the root logger's stderr handlers at the display's ``proxy`` (a log line written past it would land
    inside the bars), or back to their own stream when ``proxy`` is None."""
    if proxy is None:
        for handler, stream in _swapped:
            handler.setStream(stream)
        _swapped.clear()
    elif proxy is not stderr:
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler and handler.stream is stderr:
                _swapped.append((handler, handler.setStream(proxy)))


def progress_task(total: int | None, desc: str, unit: str = "items", enabled: bool | None = None) -> ProgressTask:
    """A context manager counting work done with :meth:`ProgressTask.advance`, for loops whose steps are uneven.

    Example: ``with progress_task(n_slices, "denoise s1", "slices") as bar: ... bar.advance(len(batch))``.

    Args:
        enabled: ``None``: a bar on an interactive stderr, log lines otherwise (unless ``COVIDCTNET_NO_PROGRESS=1``);
            ``True``: a bar; ``False``: nothing.
    """
    return ProgressTask(total, desc, unit, _mode(enabled))


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool | None = None,
             unit: str = "items") -> Iterable[T]:
    """Iterate over ``items``, showing progress as :func:`progress_task` says (``enabled``, ``unit``: the same)."""
    mode = _mode(enabled)
    if mode is None:
        return items
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    return _iterate(items, ProgressTask(total, desc, unit, mode))


def _iterate(items: Iterable[T], task: ProgressTask) -> Iterator[T]:
    with task:
        for item in items:
            yield item
            task.advance()
