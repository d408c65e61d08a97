"""Third-party notices raised while one scan is read, gathered into one log line with counts per kind.

Reading a badly anonymised DICOM series makes pydicom warn once per file (``Invalid value for VR UI: '…'``, sent both
as a Python warning and on the ``pydicom`` logger), and ITK/GDCM may print its own messages to stderr: hundreds of
lines for one scan, burying the one that matters. Inside :func:`collect_notices` every Python warning, every
``pydicom`` log record at WARNING or above and every ITK message (SimpleITK's global ITK logger) is kept instead of
shown; :meth:`Notices.report` then logs one WARNING line with the counts per kind, and each notice on its own at DEBUG
(``covidctnet -v`` shows them). Quoted values are masked in both (``'…'``): a pydicom VR message quotes the element's
value, which may be a patient's name.

The capture is process-wide while it lasts (Python's warning filters, the ``pydicom`` logger and ITK's logger are
process globals): readers running at once in threads of one process share it, each counting every notice raised
meanwhile. It is restored when the last capture ends.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Notices", "collect_notices", "notice_kind"]

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_SEE_ALSO = re.compile(r"\s*Please see <[^>]*>.*$", re.S)  # pydicom's pointer to the standard's VR table
_ITK_WHERE = re.compile(r"^\s*(WARNING|ERROR): In [^\n]*, line \d+\s*\n", re.S)
_ITK_OBJECT = re.compile(r"\s*\(0x[0-9a-fA-F]+\)")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(\.\d+)?(?![\w.])")


def _masked(text: str) -> str:
    """The notice without quoted values (they may hold identifiers), ITK's source location, object addresses and
    pydicom's link, on one line."""
    text = _ITK_OBJECT.sub("", _ITK_WHERE.sub("", _SEE_ALSO.sub("", str(text))))
    return " ".join(_QUOTED.sub("'…'", text).split())


def notice_kind(text: str) -> str:
    """What a notice is, for counting: the masked text with numbers as ``N``, at most 160 characters
    (``Invalid value for VR UI: '…'.``; ``The value length (N) exceeds …``)."""
    kind = _NUMBER.sub("N", _masked(text))
    return kind if len(kind) <= 160 else kind[:159] + "…"


class Notices:
    """The notices of one capture: ``(source, masked text)`` in the order raised."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, source: str, text: str) -> None:
        self.items.append((source, _masked(text)))

    def counts(self) -> Counter[str]:
        """``"source: kind"`` → how many."""
        return Counter(f"{source}: {notice_kind(text)}" for source, text in self.items)

    def report(self, log: logging.Logger, where: Any, summary: bool = True) -> None:
        """Each notice at DEBUG, then (``summary``) one WARNING line with the counts per kind, if there was any."""
        for source, text in self.items:
            log.debug("%s: %s: %s", where, source, text)
        if not self.items or not summary:
            return
        counts = self.counts()
        parts = "; ".join(f"{n} × {kind}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        log.warning("%s: %d notices from the DICOM/image libraries while reading, by kind: %s (-v lists each)", where,
                    len(self.items), parts)


class _PydicomFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        _HUB.deliver("pydicom", record.getMessage(), logged=True)
        return False


def _itk_logger_class() -> Any:
    """A SimpleITK logger that hands ITK's messages (any thread) to the hub; None without SimpleITK."""
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - SimpleITK is a core dependency
        return None

    class _ITKLogger(sitk.LoggerBase):  # type: ignore[misc, name-defined]
        def DisplayText(self, text: str) -> None:  # noqa: N802 - ITK's names
            _HUB.deliver("ITK/GDCM", text)

        DisplayErrorText = DisplayWarningText = DisplayGenericOutputText = DisplayDebugText = DisplayText

    return _ITKLogger


class _Hub:
    """The process-wide capture: installed by the first :func:`collect_notices`, restored by the last."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.active: list[Notices] = []
        self.logged: Counter[str] = Counter()  # pydicom texts logged and not yet seen again as a Python warning
        self._saved: dict[str, Any] = {}

    def deliver(self, source: str, text: str, logged: bool = False) -> None:
        with self.lock:
            if logged:
                self.logged[text] += 1
            for notices in self.active:
                notices.add(source, text)

    def _showwarning(self, message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                     line: Any = None) -> None:
        text = str(message)
        with self.lock:
            if self.logged[text] > 0:  # pydicom's warn_and_log: the same notice, already counted from its log record
                self.logged[text] -= 1
                return
        source = "pydicom" if "pydicom" in filename else ("SimpleITK" if "SimpleITK" in filename else "Python")
        self.deliver(source, f"{category.__name__}: {text}")

    def enter(self, notices: Notices) -> None:
        with self.lock:
            if not self.active:
                self._install()
            self.active.append(notices)

    def exit(self, notices: Notices) -> None:
        with self.lock:
            self.active.remove(notices)
            if not self.active:
                self._uninstall()

    def _install(self) -> None:
        catcher = warnings.catch_warnings()  # saves the filters and showwarning; restored in _uninstall
        catcher.__enter__()
        warnings.simplefilter("always")  # every occurrence counted, not the first per place
        warnings.showwarning = self._showwarning
        pydicom_filter = _PydicomFilter()
        logging.getLogger("pydicom").addFilter(pydicom_filter)
        self._saved = {"catcher": catcher, "pydicom_filter": pydicom_filter}
        cls = _itk_logger_class()
        if cls is not None:
            itk_logger = cls()
            self._saved["itk"] = (itk_logger, itk_logger.SetAsGlobalITKLogger())

    def _uninstall(self) -> None:
        saved, self._saved = self._saved, {}
        if "itk" in saved:
            saved["itk"][1].SetAsGlobalITKLogger()
        logging.getLogger("pydicom").removeFilter(saved["pydicom_filter"])
        saved["catcher"].__exit__(None, None, None)
        self.logged.clear()


_HUB = _Hub()


@contextmanager
def collect_notices(log: logging.Logger, where: Any) -> Iterator[Notices]:
    """Keep third-party notices from the screen while the block runs; then report them on ``log`` in one line.

    Args:
        log: the logger of the one WARNING line (and the DEBUG line of each notice).
        where: what is being read (the folder), first in each line.

    Yields:
        The :class:`Notices` gathered so far. The report is logged when the block ends; when it raises, only the
        DEBUG lines: the error is then the one line that matters.
    """
    notices = Notices()
    _HUB.enter(notices)
    try:
        yield notices
    except BaseException:
        _HUB.exit(notices)
        notices.report(log, where, summary=False)
        raise
    _HUB.exit(notices)
    notices.report(log, where)
