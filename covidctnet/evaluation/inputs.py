"""Reading the evaluation inputs and matching their cases: predictions CSVs, labels CSVs and what a file decides.

The files (see ``docs/evaluation.md``):

* ``report.csv`` from ``predict``: ``study_id, p_control, p_covid, p_cap, predicted, status, error, model,
  weights_sha256``. Rows with ``status`` ``error`` (or ``skipped``) are excluded and counted; the others must hold three
  probabilities in [0, 1] that sum to 1 (tolerance ``prob_tolerance``).
* ``preds.csv`` from ``predict-slice``: ``file, p_covid, predicted`` with ``predicted`` in {covid, noncovid}, and
  ``status, error, model, weights_sha256, threshold``; the file's ``threshold`` is the decision threshold unless one is
  given.
* a reader CSV ``case_id,label[,score]`` (reader-study: one per radiologist; ``score`` = the reader's confidence
  that the case is COVID-19, higher = more likely, any scale);
* a labels CSV ``study_id,label``, ``case_id,label`` or ``file,label`` (UCSD-style: image paths or names) with 3-class
  labels (control / covid / cap and their aliases) or 2-class labels (covid / noncovid). File ids are matched to the
  ``file`` column of ``preds.csv`` by path relative to a common folder, then by file name with or without its
  extension (see :func:`match_case_ids`).

``evaluate`` and ``reader-study`` both read their inputs here; every check raises a typed one-line error before either
writes anything.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from covidctnet.core.errors import ConfigError, InputError, LabelError
from covidctnet.core.labels import (
    CLASS_NAMES,
    normalize_any_label,
    normalize_binary_label,
    normalize_label,
    read_labels_csv,
)

__all__ = [
    "POSITIVE_CLASS",
    "Predictions",
    "check_eval_settings",
    "listed",
    "read_csv_rows",
    "read_predictions",
    "read_truth",
    "ReaderReads",
    "read_reader_csv",
    "match_case_ids",
    "effective_threshold",
    "decide",
    "decision_rule",
]

logger = logging.getLogger(__name__)

POSITIVE_CLASS = "covid"
_PROB_COLUMNS = ("p_control", "p_covid", "p_cap")  # CLASS_NAMES order
_ID_COLUMNS = ("study_id", "case_id", "file")
_USED_STATUS = {"ok", ""}
_EXCLUDED_STATUS = {"error", "skipped"}
_MAX_LISTED = 10  # ids quoted in one error message


def check_eval_settings(cfg: Any) -> None:
    """Range checks shared by the evaluate and reader-study configs."""
    if cfg.threshold is not None and not 0.0 <= cfg.threshold <= 1.0:  # False for NaN as well
        raise ConfigError(f"'threshold' (--threshold) must be in [0, 1] or null, not {cfg.threshold!r}")
    if not 0.5 <= cfg.ci_level < 1.0:
        raise ConfigError(f"'ci_level' must be in [0.5, 1), not {cfg.ci_level!r}")
    if cfg.n_bootstrap < 10:
        raise ConfigError(f"'n_bootstrap' must be at least 10, not {cfg.n_bootstrap!r}")
    if cfg.seed < 0:
        raise ConfigError(f"'seed' must be >= 0, not {cfg.seed!r}")
    if not 0.0 < cfg.prob_tolerance < 0.5:
        raise ConfigError(f"'prob_tolerance' must be in (0, 0.5), not {cfg.prob_tolerance!r}")


# ----------------------------------------------------------------------------------------------------------------------
# reading


def listed(items: Iterable[str]) -> str:
    """``['a', 'b', …]``: the first ids of a set, sorted, for a one-line error message."""
    items = sorted(items)
    shown = ", ".join(repr(x) for x in items[:_MAX_LISTED])
    return f"[{shown}{', …' if len(items) > _MAX_LISTED else ''}]"


def _new_case_id(
    case_id: str, first_rows: dict[str, int], path: Path, line: int, column: str, error: type[Exception]
) -> str:
    """``case_id`` of CSV row ``line``, checked to be neither empty nor seen before.

    ``first_rows`` (id → the row it was first on) is updated; ``error`` is the exception raised, naming the file,
    the row and ``column``.
    """
    if not case_id:
        raise error(f"{path}: row {line}: empty {column}")
    if case_id in first_rows:
        raise error(f"{path}: row {line}: duplicated {column} {case_id!r} (first on row {first_rows[case_id]})")
    first_rows[case_id] = line
    return case_id


def read_csv_rows(path: str | os.PathLike, what: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Read a small CSV into its header and ``(line number, row)`` pairs, with one-line errors.

    Header names and cells are stripped of surrounding space; a UTF-8 BOM is ignored.

    Args:
        path: the CSV file.
        what: what the file should be, for messages (e.g. ``"predictions CSV"``).

    Raises:
        InputError: unreadable or empty file, no header, duplicated column, or no data rows.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as err:
        raise InputError(f"{path}: {what} not found") from err
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read {what}: {getattr(err, 'strerror', None) or err}") from err
    if not text.strip():
        raise InputError(f"{path}: empty file; expected a {what} with a header row and at least one row")
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
        raw_rows = [(reader.line_num, r) for r in reader]
    except csv.Error as err:
        raise InputError(f"{path}: not a valid CSV ({err})") from err
    dupes = [h for h, c in Counter(header).items() if c > 1 and h]
    if dupes:
        raise InputError(f"{path}: duplicated column(s) {sorted(dupes)} in the header")
    rows: list[tuple[int, dict[str, str]]] = []
    for line, values in raw_rows:
        if not any(v.strip() for v in values):
            continue  # blank line
        if len(values) > len(header):
            raise InputError(f"{path}: row {line}: {len(values)} fields but the header has {len(header)}")
        cells = [v.strip() for v in values] + [""] * (len(header) - len(values))
        rows.append((line, dict(zip(header, cells))))
    if not rows:
        raise InputError(f"{path}: {what} has a header but no rows")
    return header, rows


@dataclass(frozen=True)
class Predictions:
    """A validated predictions file.

    Attributes:
        path: the file.
        kind: ``"3class"`` (``report.csv``: control / covid / cap probabilities) or ``"2class"`` (``preds.csv``).
        id_column: the column that named the cases (``study_id``, ``case_id`` or ``file``).
        ids: (n,) ids of the usable rows, in file order.
        p_covid: (n,) probability of COVID-19.
        probs: (n, 3) probabilities in ``CLASS_NAMES`` order for ``3class``, else ``None``.
        excluded: ``{id: status}`` of rows left out (``status`` error or skipped), in file order.
        n_rows: data rows in the file.
        threshold: the decision threshold the file records (``threshold`` column of ``preds.csv``), else ``None``.
        model: the ``model`` column's value (one model per file), else ``""``.
        weights_sha256: the ``weights_sha256`` column's value, else ``""``.
    """
    path: Path
    kind: Literal["3class", "2class"]
    id_column: str
    ids: tuple[str, ...]
    p_covid: np.ndarray
    probs: np.ndarray | None
    excluded: dict[str, str] = field(default_factory=dict)
    n_rows: int = 0
    threshold: float | None = None
    model: str = ""
    weights_sha256: str = ""

    @property
    def all_ids(self) -> tuple[str, ...]:
        """Ids of every row, used and excluded."""
        return tuple(self.ids) + tuple(self.excluded)


def _parse_prob(value: str, path: Path, line: int, column: str) -> float:
    try:
        p = float(value)
    except ValueError:
        raise InputError(f"{path}: row {line}: {column} = {value!r} is not a number") from None
    if not math.isfinite(p):
        raise InputError(f"{path}: row {line}: {column} = {value!r} is not a finite number")
    # A hair of slack for values printed from float32 softmax outputs (e.g. 1.0000001); anything more is an error.
    if p < -1e-6 or p > 1.0 + 1e-6:
        raise InputError(f"{path}: row {line}: {column} = {value} is outside [0, 1]")
    return min(max(p, 0.0), 1.0)


def read_predictions(path: str | os.PathLike, prob_tolerance: float = 1e-3) -> Predictions:
    """Read and validate a ``report.csv`` (3-class) or ``preds.csv`` (2-class) predictions file.

    The kind is told from the columns: ``p_control, p_covid, p_cap`` make it 3-class, ``p_covid`` alone 2-class. The
    id column is the first of ``study_id``, ``case_id``, ``file`` present. An optional ``status`` column (``ok`` /
    ``error`` / ``skipped``) marks rows to leave out; an optional ``predicted`` column must hold known class names.

    Raises:
        InputError: empty file, missing columns, empty or duplicated id, unknown status, probability not a number,
            outside [0, 1], or (3-class) not summing to 1 within ``prob_tolerance``; no usable row.
        LabelError: unknown class name in ``predicted``.
    """
    path = Path(path)
    header, rows = read_csv_rows(path, "predictions CSV")
    kind, id_column = _prediction_columns(path, header)
    first_rows: dict[str, int] = {}
    ids: list[str] = []
    probs: list[list[float]] = []
    excluded: dict[str, str] = {}
    n_disagree = 0
    for line, row in rows:
        sid = _new_case_id(row[id_column], first_rows, path, line, id_column, InputError)
        status = row.get("status", "").lower()
        if status in _EXCLUDED_STATUS:
            excluded[sid] = status
            continue
        if status not in _USED_STATUS:
            raise InputError(f"{path}: row {line}: unknown status {row['status']!r}; expected ok, error or skipped")
        p, disagrees = _row_probabilities(row, path, line, kind, prob_tolerance)
        n_disagree += disagrees
        ids.append(sid)
        probs.append(p)
    if not ids:
        counts = Counter(excluded.values())
        raise InputError(
            f"{path}: no usable rows: all {len(rows)} rows have status "
            + ", ".join(f"{k} ({v})" for k, v in sorted(counts.items()))
        )
    if n_disagree:
        logger.warning(
            "%s: %d row(s) whose 'predicted' is not the argmax of the probabilities; the argmax is used",
            path,
            n_disagree,
        )
    arr = np.asarray(probs, dtype=np.float64)
    threshold, model, sha = _provenance(path, rows)
    if kind == "3class":
        return Predictions(path, kind, id_column, tuple(ids), arr[:, 1].copy(), arr, excluded, len(rows),
                           threshold, model, sha)
    return Predictions(path, kind, id_column, tuple(ids), arr[:, 0].copy(), None, excluded, len(rows),
                       threshold, model, sha)


def _prediction_columns(path: Path, header: Sequence[str]) -> tuple[Literal["3class", "2class"], str]:
    """The kind of a predictions file and its id column, told from its header.

    Raises:
        InputError: no id column, or neither the three probabilities nor ``p_covid``.
    """
    columns = set(header)
    id_column = next((c for c in _ID_COLUMNS if c in columns), None)
    if set(_PROB_COLUMNS) <= columns:
        kind: Literal["3class", "2class"] = "3class"
    elif "p_covid" in columns:
        kind = "2class"
    else:
        kind = "3class"
        id_column = id_column or "study_id"
    missing = []
    if id_column is None:
        missing.append("study_id (or case_id / file)")
    if "p_covid" not in columns:
        missing.extend(c for c in _PROB_COLUMNS if c not in columns)
    if missing:
        raise InputError(
            f"{path}: not a predictions CSV: missing column(s) {missing}; expected report.csv "
            "(study_id, p_control, p_covid, p_cap, predicted, status) or preds.csv (file, p_covid, predicted)"
        )
    assert id_column is not None
    return kind, id_column


def _row_probabilities(
    row: Mapping[str, str], path: Path, line: int, kind: str, prob_tolerance: float
) -> tuple[list[float], bool]:
    """One usable row's probabilities (3 in ``CLASS_NAMES`` order, or ``[p_covid]``) and whether its ``predicted``
    disagrees with their argmax.

    Raises:
        InputError: a probability that is not a number in [0, 1], or three that do not sum to 1.
        LabelError: an unknown class name in ``predicted``.
    """
    disagrees = False
    if kind == "3class":
        p = [_parse_prob(row[c], path, line, c) for c in _PROB_COLUMNS]
        total = sum(p)
        if abs(total - 1.0) > prob_tolerance:
            raise InputError(
                f"{path}: row {line}: p_control + p_covid + p_cap = {total:.6g}, expected 1 "
                f"(tolerance {prob_tolerance:g})"
            )
        if row.get("predicted"):
            predicted = normalize_label(row["predicted"], f"{path}: row {line}: predicted")
            if predicted != CLASS_NAMES[int(np.argmax(p))]:
                disagrees = True
    else:
        p = [_parse_prob(row["p_covid"], path, line, "p_covid")]
        if row.get("predicted"):
            normalize_binary_label(row["predicted"], f"{path}: row {line}: predicted")
    return p, disagrees


def _provenance(path: Path, rows: Sequence[tuple[int, dict[str, str]]]) -> tuple[float | None, str, str]:
    """The ``threshold``, ``model`` and ``weights_sha256`` a predictions file records (empty cells ignored).

    Every row of a file comes from one run of one model, so each column must hold one value; a file pasted together
    from two runs would otherwise be judged at one run's threshold.

    Raises:
        InputError: a threshold that is not a number in [0, 1], or two different values in one of the columns.
    """
    values: dict[str, dict[str, int]] = {"threshold": {}, "model": {}, "weights_sha256": {}}
    for line, row in rows:
        for column, seen in values.items():
            cell = row.get(column, "")
            if cell:
                seen.setdefault(cell, line)
    for column, seen in values.items():
        if len(seen) > 1:
            (a, la), (b, lb) = list(seen.items())[:2]
            raise InputError(f"{path}: {column} differs between rows ({a!r} on row {la}, {b!r} on row {lb}); "
                             "a predictions file must come from one model and one threshold")
    threshold = None
    if values["threshold"]:
        cell, line = next(iter(values["threshold"].items()))
        try:
            threshold = float(cell)
        except ValueError:
            raise InputError(f"{path}: row {line}: threshold = {cell!r} is not a number") from None
        if not 0.0 <= threshold <= 1.0:
            raise InputError(f"{path}: row {line}: threshold = {cell} is outside [0, 1]")
    model = next(iter(values["model"]), "")
    sha = next(iter(values["weights_sha256"]), "")
    return threshold, model, sha


def read_truth(path: str | os.PathLike) -> dict[str, str]:
    """Read a labels CSV (``study_id,label``, ``case_id,label`` or ``file,label``) with 3-class or 2-class labels.

    ``file,label`` is the UCSD-style list of images (paths or names, with or without extension) that
    :func:`match_case_ids` matches to ``preds.csv``'s ``file`` column.

    Returns:
        ``{case id: label}`` with labels in {control, covid, cap} or {covid, noncovid}.

    Raises:
        InputError / LabelError: unreadable or empty file, missing columns, empty or duplicated id, unknown class.
    """
    path = Path(path)
    # read_csv_rows first so that an empty or missing file gets the same one-line message as the other inputs
    header, rows = read_csv_rows(path, "labels CSV")
    if "study_id" in header or "case_id" in header or "file" not in header:
        return read_labels_csv(path, normalize=normalize_any_label)
    if "label" not in header:
        raise LabelError(f"{path}: missing column(s) ['label']; found {sorted(h for h in header if h)}")
    labels: dict[str, str] = {}
    first_rows: dict[str, int] = {}
    for line, row in rows:
        name = _new_case_id(row["file"], first_rows, path, line, "file", LabelError)
        labels[name] = normalize_any_label(row["label"], f"{path}: row {line}")
    return labels


@dataclass(frozen=True)
class ReaderReads:
    """One reader's reads.

    Attributes:
        name: display name (the file stem unless given).
        path: the CSV.
        labels: ``{case id: label}``, labels in {control, covid, cap} or {covid, noncovid}.
        scores: ``{case id: COVID-19 confidence}`` when the CSV has a ``score`` column, else ``None``.
    """

    name: str
    path: Path
    labels: dict[str, str]
    scores: dict[str, float] | None


def read_reader_csv(path: str | os.PathLike, name: str | None = None) -> ReaderReads:
    """Read a reader CSV: ``case_id,label[,score]`` (``study_id`` is accepted for ``case_id``).

    Raises:
        InputError: empty file, missing column, empty or non-numeric score.
        LabelError: empty or duplicated case id, unknown class name.
    """
    path = Path(path)
    header, rows = read_csv_rows(path, "reader CSV")
    id_column = "case_id" if "case_id" in header else ("study_id" if "study_id" in header else None)
    missing = [c for c, ok in (("case_id", id_column is not None), ("label", "label" in header)) if not ok]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; a reader CSV has 'case_id,label[,score]'")
    assert id_column is not None
    has_score = "score" in header
    labels: dict[str, str] = {}
    scores: dict[str, float] = {}
    first_rows: dict[str, int] = {}
    for line, row in rows:
        cid = _new_case_id(row[id_column], first_rows, path, line, id_column, LabelError)
        labels[cid] = normalize_any_label(row["label"], f"{path}: row {line}")
        if has_score:
            raw = row["score"]
            try:
                value = float(raw)
            except ValueError:
                raise InputError(
                    f"{path}: row {line}: score {raw!r} is not a number; give a score on every row or drop the column"
                ) from None
            if not math.isfinite(value):
                raise InputError(f"{path}: row {line}: score {raw!r} is not a finite number")
            scores[cid] = value
    return ReaderReads(name or path.stem, path, labels, scores if has_score else None)


# Extensions stripped to match a file name "without extension". Only these: a UCSD name such as
# 2020.02.22.20024927-p17-73%1.png has dots of its own, and Path.suffix/stem would cut it at the first of them.
_FILE_EXTENSIONS = (".nii.gz", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".nii", ".nrrd",
                    ".dcm")


def _path_parts(case_id: str) -> tuple[str, ...]:
    """Components of a file id, ``\\`` read as ``/``, without empty or ``.`` components."""
    return tuple(p for p in case_id.replace("\\", "/").split("/") if p not in ("", "."))


def _strip_extension(name: str) -> str:
    lower = name.lower()
    for ext in _FILE_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def _file_match_rank(pred_parts: tuple[str, ...], label_parts: tuple[str, ...]) -> int:
    """How well a labels id names a predictions file: 0 not at all, 1 same name without extension, 2 same file name,
    2 + k the same last k + 1 path components (the path relative to a common folder), large for the same path."""
    if pred_parts == label_parts:
        return 10_000
    if pred_parts[-1] == label_parts[-1]:
        k = 0
        while k + 1 < min(len(pred_parts), len(label_parts)) and pred_parts[-2 - k] == label_parts[-2 - k]:
            k += 1
        return 2 + k
    return 1 if _strip_extension(pred_parts[-1]) == _strip_extension(label_parts[-1]) else 0


def _match_files(ids: Sequence[str], truth: Mapping[str, str], ids_path: Any, truth_path: Any) -> list[str | None]:
    """The labels key of each predictions file id (``None`` when nothing matches); see :func:`match_case_ids`.

    Raises:
        LabelError: an id matched equally well by two labels, or two ids that match the same label.
    """
    by_stem: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for key in truth:
        parts = _path_parts(key) or (key,)
        by_stem.setdefault(_strip_extension(parts[-1]), []).append((key, parts))
    keys: list[str | None] = []
    claimed: dict[str, str] = {}
    for case_id in ids:
        parts = _path_parts(case_id) or (case_id,)
        candidates = by_stem.get(_strip_extension(parts[-1]), [])
        ranked = sorted(((_file_match_rank(parts, lp), key) for key, lp in candidates), reverse=True)
        ranked = [(r, key) for r, key in ranked if r > 0]
        if not ranked:
            keys.append(None)
            continue
        if len(ranked) > 1 and ranked[0][0] == ranked[1][0]:
            raise LabelError(f"{ids_path}: {case_id!r} matches both {ranked[1][1]!r} and {ranked[0][1]!r} of "
                             f"{truth_path}; name the files by their path below a common folder to tell them apart")
        key = ranked[0][1]
        if key in claimed:
            raise LabelError(f"{ids_path}: several rows name the same case of {truth_path}: {claimed[key]!r} and "
                             f"{case_id!r} both match {key!r}")
        claimed[key] = case_id
        keys.append(key)
    return keys


def match_case_ids(
    ids: Sequence[str],
    truth: Mapping[str, str],
    ids_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    *,
    allow_file_names: bool = False,
    what: str = "predictions",
) -> list[str]:
    """The truth key of each id, checking that the two files hold the same cases.

    Args:
        ids: every id of the predictions (or reader) file, used and excluded rows alike.
        truth: the labels.
        ids_path, truth_path: the two files, for messages.
        allow_file_names: ids are file paths (``preds.csv``), matched to the labels as written elsewhere: a labels id
            names a file when its path components end the file's path (``CT_COVID/a.png`` names
            ``/data/ucsd/CT_COVID/a.png``: the path relative to a common folder, absolute and relative paths alike;
            the most components shared wins), else when it has the same file name, else the same file name without
            extension (``.png``, ``.jpg``, ``.nii.gz`` … only, so ``2020.02.22.20024927-p17-73%1`` names
            ``2020.02.22.20024927-p17-73%1.png``). Otherwise ids must equal the labels' ids.
        what: name of the ids file in messages (``predictions``, ``reader 'r1'`` …).

    Returns:
        truth keys, one per id, in order.

    Raises:
        LabelError: ids unknown to the labels, cases of the labels missing from the file, or (file names) an id
            matched equally well by two labels, or two ids that match the same case (each message names both).
    """
    if allow_file_names:
        found = _match_files(ids, truth, ids_path, truth_path)
    else:
        found = [i if i in truth else None for i in ids]
    unknown = [i for i, key in zip(ids, found) if key is None]
    if unknown:
        raise LabelError(f"{ids_path}: {len(unknown)} case id(s) not in {truth_path}: {listed(unknown)}")
    keys = [key for key in found if key is not None]
    dupes = [key for key, c in Counter(keys).items() if c > 1]
    if dupes:
        raise LabelError(f"{ids_path}: several rows name the same case of {truth_path}: {listed(dupes)}")
    missing = set(truth) - set(keys)
    if missing:
        raise LabelError(f"{truth_path}: {len(missing)} case(s) missing from the {what} {ids_path}: {listed(missing)}")
    return keys


def effective_threshold(predictions: Predictions, threshold: float | None) -> tuple[float | None, str]:
    """The 2-class threshold to apply and where it comes from: ``threshold`` when given (``--threshold`` or the
    config), else the one the predictions file records (``preds.csv``'s ``threshold`` column, so ``evaluate`` decides as
    ``predict-slice`` did), else ``None`` (argmax)."""
    if threshold is not None:
        if predictions.threshold is not None and predictions.threshold != threshold:
            return threshold, f"from --threshold / the config, not the file's {predictions.threshold:.6g}"
        return threshold, "from --threshold / the config"
    if predictions.threshold is not None:
        return predictions.threshold, f"the threshold column of {predictions.path.name}"
    return None, ""


def decide(predictions: Predictions, threshold: float | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """The decisions of a predictions file.

    Returns:
        ``(labels3, covid_call)``: (n,) 3-class names by argmax (``None`` for 2-class files) and (n,) bools, True where
        the case is called COVID-19 (``p_covid >= threshold`` when a threshold is given, else the argmax).
    """
    labels3 = None
    if predictions.probs is not None:
        labels3 = np.asarray(CLASS_NAMES, dtype=object)[np.argmax(predictions.probs, axis=1)]
    if threshold is not None:
        call = predictions.p_covid >= threshold
    elif labels3 is not None:
        call = labels3 == POSITIVE_CLASS
    else:
        call = predictions.p_covid > 0.5
    return labels3, np.asarray(call, dtype=bool)


def decision_rule(kind: str, threshold: float | None, source: str = "", *, brief: bool = False) -> str:
    """The decision rule of :func:`decide`, in words, for reports and ``metrics.json``.

    Args:
        kind: ``"3class"`` or ``"2class"`` (:attr:`Predictions.kind`).
        threshold: the 2-class threshold applied, or ``None`` (argmax).
        source: where the threshold came from (see :func:`effective_threshold`); said in brackets when given.
        brief: the short wording of the reader-study table (``evaluate`` writes the long one).
    """
    if threshold is not None:
        if brief:
            return f"COVID-19 when p_covid >= {threshold:g}; 3-class argmax"
        where = f" ({source})" if source else ""
        return f"COVID-19 when p_covid >= {threshold:.6g}{where} (2-class); argmax of the probabilities (3-class)"
    if kind == "3class":
        return "argmax of the probabilities" if brief else (
            "argmax of p_control, p_covid, p_cap (ties: control, covid, cap in that order)")
    return "COVID-19 when p_covid > 0.5" + ("" if brief else " (argmax of the two classes)")
