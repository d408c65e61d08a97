"""``covidctnet evaluate``: metrics with confidence intervals from a predictions CSV and a labels CSV.

Inputs are the files other stages write (see ``docs/evaluation.md``):

* ``report.csv`` from ``predict``: ``study_id, p_control, p_covid, p_cap, predicted, status, error, model,
  weights_sha256``. Rows with ``status`` ``error`` (or ``skipped``) are excluded and counted; the others must hold three
  probabilities in [0, 1] that sum to 1 (tolerance ``prob_tolerance``).
* ``preds.csv`` from ``predict-slice``: ``file, p_covid, predicted`` with ``predicted`` in {covid, noncovid}, and
  (since issue 18) ``status, error, model, weights_sha256, threshold``; the file's ``threshold`` is the decision
  threshold unless one is given.
* a labels CSV ``study_id,label``, ``case_id,label`` or ``file,label`` (UCSD-style: image paths or names) with 3-class
  labels (control / covid / cap and their aliases) or 2-class labels (covid / noncovid). File ids are matched to the
  ``file`` column of ``preds.csv`` by path relative to a common folder, then by file name with or without its
  extension (see :func:`match_case_ids`).

Outputs (``report.md``, the same as one self-contained page ``report.html`` with its figures embedded,
``metrics.json``, ``config.yaml`` and PNGs) are written only after every input check passed, each file atomically: bad
input leaves no report at all.

Two views are computed. **2-class**: COVID-19 (positive) against everything else, with accuracy, sensitivity,
specificity, precision, NPV, F1 and the AUC of ``p_covid``. **3-class** (when both predictions and labels are
3-class): accuracy, the confusion matrix, one-vs-rest sensitivity / specificity / precision / F1 / AUC per class and
their macro averages. Intervals: Wilson for proportions, DeLong (or a stratified bootstrap) for AUCs, a stratified
percentile bootstrap for F1 and macro averages; the report states which.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from covidctnet.core.config import config_to_dict, save_config
from covidctnet.core.errors import ConfigError, InputError, LabelError
from covidctnet.core.files import atomic_write_text, sha256_file, to_jsonable
from covidctnet.core.labels import (
    CLASS_NAMES,
    normalize_any_label,
    normalize_binary_label,
    normalize_label,
    read_labels_csv,
)
from covidctnet.evaluation.html_report import write_markdown_html
from covidctnet.evaluation.plots import OperatingPoint, RocCurve, plot_confusion, plot_roc
from covidctnet.evaluation.stats import (
    Estimate,
    WeightedAuc,
    bootstrap_auc_ci,
    bootstrap_ci,
    bootstrap_roc_band,
    delong_auc_ci,
    proportion,
    roc_points,
)

__all__ = [
    "EvaluateConfig",
    "Predictions",
    "read_csv_rows",
    "read_predictions",
    "read_truth",
    "match_case_ids",
    "decide",
    "effective_threshold",
    "binary_metrics",
    "multiclass_metrics",
    "compute_metrics",
    "evaluate",
    "format_estimate",
]

logger = logging.getLogger(__name__)

POSITIVE_CLASS = "covid"
_PROB_COLUMNS = ("p_control", "p_covid", "p_cap")  # CLASS_NAMES order
_ID_COLUMNS = ("study_id", "case_id", "file")
_USED_STATUS = {"ok", ""}
_EXCLUDED_STATUS = {"error", "skipped"}
_MAX_LISTED = 10  # ids quoted in one error message


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of ``covidctnet evaluate`` (defaults = ``configs/evaluate.yaml``).

    Attributes:
        threshold: 2-class decision threshold on ``p_covid`` (COVID-19 when ``p_covid >= threshold``); ``None`` uses
            the argmax of the class probabilities (ties go to the earlier class: control, covid, cap; for 2-class
            ``preds.csv`` COVID-19 when ``p_covid > 0.5``). The 3-class decision is always the argmax.
        ci_level: confidence level of every interval (0.95 = 95%).
        auc_ci: ``delong`` (DeLong's variance, normal interval clipped to [0, 1]) or ``bootstrap`` (stratified
            percentile bootstrap) for AUC intervals.
        n_bootstrap: bootstrap resamples for F1, macro averages, ROC bands (and AUCs with ``auc_ci: bootstrap``).
        seed: seed of the bootstrap's ``numpy.random.default_rng``.
        prob_tolerance: how far ``p_control + p_covid + p_cap`` may be from 1.
        roc_band: draw a pointwise bootstrap band around the 2-class ROC curve.
    """
    threshold: float | None = None
    ci_level: float = 0.95
    auc_ci: Literal["delong", "bootstrap"] = "delong"
    n_bootstrap: int = 2000
    seed: int = 0
    prob_tolerance: float = 1e-3
    roc_band: bool = True

    def __post_init__(self) -> None:
        check_eval_settings(self)


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
    seen: dict[str, int] = {}
    ids: list[str] = []
    probs: list[list[float]] = []
    excluded: dict[str, str] = {}
    n_disagree = 0
    for line, row in rows:
        sid = row[id_column]
        if not sid:
            raise InputError(f"{path}: row {line}: empty {id_column}")
        if sid in seen:
            raise InputError(f"{path}: row {line}: duplicated {id_column} {sid!r} (first on row {seen[sid]})")
        seen[sid] = line
        status = row.get("status", "").lower()
        if status in _EXCLUDED_STATUS:
            excluded[sid] = status
            continue
        if status not in _USED_STATUS:
            raise InputError(f"{path}: row {line}: unknown status {row['status']!r}; expected ok, error or skipped")
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
                    n_disagree += 1
        else:
            p = [_parse_prob(row["p_covid"], path, line, "p_covid")]
            if row.get("predicted"):
                normalize_binary_label(row["predicted"], f"{path}: row {line}: predicted")
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
    first: dict[str, int] = {}
    for line, row in rows:
        name = row["file"]
        if not name:
            raise LabelError(f"{path}: row {line}: empty file")
        if name in labels:
            raise LabelError(f"{path}: row {line}: duplicated file {name!r} (first on row {first[name]})")
        first[name] = line
        labels[name] = normalize_any_label(row["label"], f"{path}: row {line}")
    return labels


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


# ----------------------------------------------------------------------------------------------------------------------
# metrics


def _auc_estimate(y: np.ndarray, score: np.ndarray, cfg: Any) -> Any:
    if y.all() or not y.any():
        return Estimate(None, None, None, "undefined: only one class present", n=int(y.size), level=cfg.ci_level)
    if cfg.auc_ci == "bootstrap":
        return bootstrap_auc_ci(y, score, n_boot=cfg.n_bootstrap, seed=cfg.seed, level=cfg.ci_level)
    return delong_auc_ci(y, score, level=cfg.ci_level)


def _f1(tp: float, fp: float, fn: float) -> float:
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else math.nan


def _boot_method(cfg: Any) -> str:
    return f"stratified bootstrap (percentile, {cfg.n_bootstrap} resamples, seed {cfg.seed})"


def _est(value: float, low: float, high: float, method: str, level: float, n: int | None = None) -> Any:
    def clean(x: float) -> float | None:
        return None if x is None or math.isnan(x) else float(x)

    return Estimate(clean(value), clean(low), clean(high), method, n=n, level=level)


def binary_metrics(y_true: np.ndarray, call: np.ndarray, score: np.ndarray | None, cfg: Any) -> dict[str, Any]:
    """2-class metrics (COVID-19 positive) with confidence intervals.

    Args:
        y_true: (n,) bool, True for COVID-19.
        call: (n,) bool, True where the rater calls COVID-19.
        score: (n,) COVID-19 score for the AUC (higher = more likely COVID-19), or ``None`` for no AUC.
        cfg: an :class:`EvaluateConfig` (or any object with ``ci_level``, ``auc_ci``, ``n_bootstrap``, ``seed``).

    Returns:
        ``{"n", "n_positive", "n_negative", "confusion_matrix": {"labels", "matrix"}, "metrics": {name: Estimate}}``
        where the matrix is ``[[TN, FP], [FN, TP]]`` (rows = truth noncovid / covid).
    """
    y = np.asarray(y_true, dtype=bool)
    c = np.asarray(call, dtype=bool)
    tp, fn = int(np.sum(y & c)), int(np.sum(y & ~c))
    fp, tn = int(np.sum(~y & c)), int(np.sum(~y & ~c))
    level = cfg.ci_level
    metrics: dict[str, Any] = {
        "accuracy": proportion(tp + tn, y.size, level),
        "sensitivity": proportion(tp, tp + fn, level),
        "specificity": proportion(tn, tn + fp, level),
        "precision": proportion(tp, tp + fp, level),
        "npv": proportion(tn, tn + fn, level),
    }

    def stat(idx: np.ndarray) -> list[float]:
        w = np.bincount(idx, minlength=y.size)
        return [_f1(w[y & c].sum(), w[~y & c].sum(), w[y & ~c].sum())]

    low, high = bootstrap_ci(stat, y.size, strata=y, n_boot=cfg.n_bootstrap, seed=cfg.seed, level=level)
    metrics["f1"] = _est(_f1(tp, fp, fn), low[0], high[0], _boot_method(cfg), level, n=int(y.size))
    if score is not None:
        metrics["auc"] = _auc_estimate(y, np.asarray(score, dtype=np.float64), cfg)
    return {
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int((~y).sum()),
        "confusion_matrix": {"labels": ["noncovid", "covid"], "matrix": [[tn, fp], [fn, tp]]},
        "metrics": metrics,
    }


def _per_class_rates(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One-vs-rest sensitivity, specificity, precision, F1 per class from a (C, C) confusion matrix (NaN if 0/0)."""
    total = cm.sum()
    tp = np.diag(cm).astype(np.float64)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = total - tp - fn - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = tp / (tp + fn)
        spec = tn / (tn + fp)
        prec = tp / (tp + fp)
        f1 = 2 * tp / (2 * tp + fp + fn)
    return sens, spec, prec, f1


def multiclass_metrics(truth: np.ndarray, predicted: np.ndarray, probs: np.ndarray, cfg: Any) -> dict[str, Any]:
    """3-class metrics: accuracy, confusion matrix, one-vs-rest per-class metrics and macro averages.

    Args:
        truth: (n,) true class indices (0 control, 1 covid, 2 cap).
        predicted: (n,) predicted class indices.
        probs: (n, 3) class probabilities (scores of the one-vs-rest AUCs).
        cfg: see :func:`binary_metrics`.

    Returns:
        ``{"n", "confusion_matrix", "accuracy", "per_class": {class: {...}}, "macro": {...}, "notes": [...]}``.
        Macro averages are the unweighted means over the three classes (the macro AUC equals scikit-learn's
        ``roc_auc_score(multi_class="ovr", average="macro")``); they are ``None`` when a class is absent from the
        labels or never predicted (a per-class metric is then undefined).
    """
    t = np.asarray(truth, dtype=np.int64)
    p = np.asarray(predicted, dtype=np.int64)
    k = len(CLASS_NAMES)
    level = cfg.ci_level
    cm = np.bincount(k * t + p, minlength=k * k).reshape(k, k)
    sens, spec, prec, f1 = _per_class_rates(cm)
    present = np.bincount(t, minlength=k) > 0
    aucs = [_auc_estimate(t == j, probs[:, j], cfg) for j in range(k)]
    macro_point = {
        "sensitivity": float(np.mean(sens)),
        "specificity": float(np.mean(spec)),
        "precision": float(np.mean(prec)),
        "f1": float(np.mean(f1)),
        "auc": float(np.mean([a.value for a in aucs])) if all(a.value is not None for a in aucs) else math.nan,
    }

    boot_auc = cfg.auc_ci == "bootstrap"
    auc_of = [WeightedAuc(t == j, probs[:, j]) for j in range(k)]
    cells = k * t + p

    def stat(idx: np.ndarray) -> list[float]:
        w = np.bincount(idx, minlength=t.size).astype(np.float64)
        m = np.bincount(cells, weights=w, minlength=k * k).reshape(k, k)
        s_, sp_, pr_, f_ = _per_class_rates(m)
        a = [auc_of[j](w) for j in range(k)]
        out = list(f_) + [np.mean(s_), np.mean(sp_), np.mean(pr_), np.mean(f_), np.mean(a)]
        return out + (a if boot_auc else [])

    low, high = bootstrap_ci(stat, t.size, strata=t, n_boot=cfg.n_bootstrap, seed=cfg.seed, level=level)
    method = _boot_method(cfg)
    per_class: dict[str, Any] = {}
    for j, name in enumerate(CLASS_NAMES):
        tp = int(cm[j, j])
        pos, called = int(cm[j].sum()), int(cm[:, j].sum())
        neg = int(cm.sum() - pos)
        tn = int(cm.sum() - pos - called + tp)
        per_class[name] = {
            "n": pos,
            "sensitivity": proportion(tp, pos, level),
            "specificity": proportion(tn, neg, level),
            "precision": proportion(tp, called, level),
            "f1": _est(f1[j], low[j], high[j], method, level, n=int(t.size)),
            "auc": aucs[j],
        }
    macro = {
        name: _est(macro_point[name], low[k + i], high[k + i], method, level, n=int(t.size))
        for i, name in enumerate(("sensitivity", "specificity", "precision", "f1", "auc"))
    }
    notes = []
    if not present.all():
        notes.append(
            "class(es) " + ", ".join(n for n, ok in zip(CLASS_NAMES, present) if not ok) + " absent from the labels: "
            "their sensitivity and AUC are undefined, and so are the macro averages that need them"
        )
    never = [n for n, c in zip(CLASS_NAMES, cm.sum(axis=0)) if c == 0]
    if never:
        notes.append("class(es) " + ", ".join(never) + " never predicted: precision undefined")
    return {
        "n": int(t.size),
        "confusion_matrix": {"labels": list(CLASS_NAMES), "matrix": cm.tolist()},
        "accuracy": proportion(int(np.trace(cm)), int(t.size), level),
        "per_class": per_class,
        "macro": macro,
        "notes": notes,
    }


def _decision_rule(kind: str, threshold: float | None, source: str = "") -> str:
    if threshold is not None:
        where = f" ({source})" if source else ""
        return f"COVID-19 when p_covid >= {threshold:.6g}{where} (2-class); argmax of the probabilities (3-class)"
    if kind == "3class":
        return "argmax of p_control, p_covid, p_cap (ties: control, covid, cap in that order)"
    return "COVID-19 when p_covid > 0.5 (argmax of the two classes)"


def _methods(cfg: Any) -> dict[str, str]:
    auc = (
        "DeLong variance (DeLong et al. 1988; Sun & Xu 2014), normal interval clipped to [0, 1]"
        if cfg.auc_ci == "delong"
        else _boot_method(cfg)
    )
    return {
        "proportions": "Wilson score interval",
        "auc": auc,
        "f1_and_macro_averages": _boot_method(cfg),
        "level": f"{100 * cfg.ci_level:g}%",
    }


def compute_metrics(
    predictions: Predictions,
    truth_keys: Sequence[str],
    truth: Mapping[str, str],
    cfg: EvaluateConfig,
    threshold_source: str = "",
) -> dict[str, Any]:
    """All metrics of a validated predictions file against its labels (no file is written).

    Args:
        predictions: from :func:`read_predictions`.
        truth_keys: the labels key of each *used* prediction row (from :func:`match_case_ids`).
        truth: the labels.
        cfg: the config; ``cfg.threshold`` is the threshold applied (see :func:`effective_threshold`).
        threshold_source: where that threshold came from, for the report.

    Returns:
        the ``metrics.json`` content except file provenance; ``Estimate`` objects are kept (see ``to_jsonable``).
    """
    labels = np.asarray([truth[k] for k in truth_keys], dtype=object)
    labels3, call = decide(predictions, cfg.threshold)
    y = labels == POSITIVE_CLASS
    result: dict[str, Any] = {
        "decision_rule": _decision_rule(predictions.kind, cfg.threshold, threshold_source),
        "threshold": cfg.threshold,
        "threshold_source": threshold_source or None,
        "methods": _methods(cfg),
        "two_class": binary_metrics(y, call, predictions.p_covid, cfg),
    }
    truth_is_3class = all(v in CLASS_NAMES for v in truth.values())
    if labels3 is not None and truth_is_3class:
        index = {n: i for i, n in enumerate(CLASS_NAMES)}
        assert predictions.probs is not None
        result["three_class"] = multiclass_metrics(
            np.asarray([index[v] for v in labels]), np.asarray([index[v] for v in labels3]), predictions.probs, cfg
        )
    else:
        reason = "the predictions are 2-class (preds.csv)" if labels3 is None else "the labels are 2-class (noncovid)"
        result["three_class"] = None
        result["three_class_skipped"] = f"3-class metrics need 3-class predictions and labels; {reason}"
    return result


# ----------------------------------------------------------------------------------------------------------------------
# report


def format_estimate(est: Any, percent: bool = True) -> tuple[str, str, str]:
    """``(value, "low–high", "k/n")`` strings of an :class:`~covidctnet.evaluation.stats.Estimate` for tables."""
    d = est.to_dict() if hasattr(est, "to_dict") else dict(est)
    if d.get("value") is None:
        return "n/a", "n/a", ""

    def fmt(x: float | None) -> str:
        if x is None:
            return "n/a"
        return f"{100 * x:.1f}%" if percent else f"{x:.3f}"

    ci = f"{fmt(d.get('ci_low'))}–{fmt(d.get('ci_high'))}"
    frac = f"{d['k']}/{d['n']}" if d.get("k") is not None and d.get("n") else ""
    return fmt(d["value"]), ci, frac


def _metric_table(rows: Sequence[tuple[str, Any, bool]], level: float) -> list[str]:
    out = [f"| metric | value | {100 * level:g}% CI | k/n | CI method |", "|---|---|---|---|---|"]
    for name, est, percent in rows:
        value, ci, frac = format_estimate(est, percent)
        out.append(f"| {name} | {value} | {ci} | {frac} | {est.method} |")
    return out


def _matrix_table(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> list[str]:
    out = ["| true \\ predicted | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, row in zip(labels, matrix):
        out.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    return out


def _render_report(
    result: Mapping[str, Any], inputs: Mapping[str, Any], cfg: EvaluateConfig, images: Mapping[str, str]
) -> str:
    level = cfg.ci_level
    lines = ["# Evaluation report", ""]
    lines.append(
        f"- Predictions: `{inputs['predictions']}` ({inputs['predictions_kind']}, "
        f"sha256 `{inputs['predictions_sha256'][:12]}…`)"
    )
    if inputs.get("model"):
        sha = inputs.get("weights_sha256") or ""
        lines.append(f"- Model: `{inputs['model']}`" + (f" (weights_sha256 `{sha[:12]}…`)" if sha else ""))
    lines.append(f"- Labels: `{inputs['labels']}` (sha256 `{inputs['labels_sha256'][:12]}…`)")
    lines.append(f"- Cases evaluated: **{inputs['n_evaluated']}** of {inputs['n_rows']} prediction rows")
    if inputs["excluded"]:
        counts = Counter(inputs["excluded"].values())
        listed = ", ".join(f"`{i}` ({s})" for i, s in list(inputs["excluded"].items())[:20])
        more = " …" if len(inputs["excluded"]) > 20 else ""
        lines.append(
            f"- Excluded: **{len(inputs['excluded'])}** row(s) with status "
            + ", ".join(f"{k} ({v})" for k, v in sorted(counts.items()))
            + f": {listed}{more}"
        )
    lines.append(f"- Decision rule: {result['decision_rule']}")
    m = result["methods"]
    lines += [
        f"- Confidence intervals ({m['level']}): proportions — {m['proportions']}; AUC — {m['auc']}; "
        f"F1 and macro averages — {m['f1_and_macro_averages']}.",
        "",
        "## COVID-19 vs rest (2-class)",
        "",
    ]
    two = result["two_class"]
    lines.append(f"{two['n_positive']} COVID-19 and {two['n_negative']} other cases.")
    lines.append("")
    mt = two["metrics"]
    rows = [
        (n, mt[key], key != "auc")
        for n, key in (
            ("accuracy", "accuracy"),
            ("sensitivity", "sensitivity"),
            ("specificity", "specificity"),
            ("precision (PPV)", "precision"),
            ("NPV", "npv"),
            ("F1", "f1"),
            ("AUC", "auc"),
        )
        if key in mt
    ]
    lines += _metric_table(rows, level) + [""]
    lines += _matrix_table(two["confusion_matrix"]["labels"], two["confusion_matrix"]["matrix"]) + [""]
    for key in ("roc_2class", "confusion_2class"):
        if key in images:
            lines.append(f"![{key}]({images[key]})")
    lines.append("")
    three = result.get("three_class")
    lines += ["## Control / COVID-19 / CAP (3-class)", ""]
    if three is None:
        lines += [f"Not computed: {result.get('three_class_skipped', '')}.", ""]
    else:
        value, ci, frac = format_estimate(three["accuracy"])
        lines += [f"Accuracy **{value}** ({100 * level:g}% CI {ci}, {frac}, Wilson).", ""]
        lines += _matrix_table(three["confusion_matrix"]["labels"], three["confusion_matrix"]["matrix"]) + [""]
        lines += [
            "| class (one vs rest) | n | sensitivity | specificity | precision | F1 | AUC |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, pc in three["per_class"].items():
            cells = []
            for key in ("sensitivity", "specificity", "precision", "f1", "auc"):
                v, c, _ = format_estimate(pc[key], key != "auc")
                cells.append(f"{v} ({c})" if v != "n/a" else "n/a")
            lines.append(f"| {name} | {pc['n']} | " + " | ".join(cells) + " |")
        cells = []
        for key in ("sensitivity", "specificity", "precision", "f1", "auc"):
            v, c, _ = format_estimate(three["macro"][key], key != "auc")
            cells.append(f"{v} ({c})" if v != "n/a" else "n/a")
        lines.append(f"| **macro average** | {three['n']} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            "Per-class sensitivity, specificity and precision: Wilson; F1 and macro averages: bootstrap; "
            f"AUC: {m['auc']}."
        )
        for note in three.get("notes", []):
            lines.append(f"Note: {note}.")
        lines.append("")
        for key in ("roc_3class", "confusion_3class"):
            if key in images:
                lines.append(f"![{key}]({images[key]})")
        lines.append("")
    lines += [
        "---",
        "Generated by `covidctnet evaluate`. Small test sets give wide intervals: read the CI, not only the point "
        "estimate. Research software, not a medical device.",
        "",
    ]
    return "\n".join(lines)


def _write_plots(
    result: Mapping[str, Any],
    predictions: Predictions,
    truth_keys: Sequence[str],
    truth: Mapping[str, str],
    cfg: EvaluateConfig,
    out_dir: Path,
) -> dict[str, str]:

    images: dict[str, str] = {}
    labels = np.asarray([truth[k] for k in truth_keys], dtype=object)
    y = labels == POSITIVE_CLASS
    two = result["two_class"]
    if 0 < y.sum() < y.size:
        fpr, tpr, _ = roc_points(y, predictions.p_covid)
        auc = two["metrics"]["auc"]
        band: dict[str, Any] = {}
        if cfg.roc_band:
            grid = np.linspace(0.0, 1.0, 101)
            low, high = bootstrap_roc_band(
                y, predictions.p_covid, grid, n_boot=cfg.n_bootstrap, seed=cfg.seed, level=cfg.ci_level
            )
            band = {"band_fpr": grid, "band_low": low, "band_high": high}
        curve = RocCurve(fpr, tpr, "model, COVID-19 vs rest", auc=auc.value, auc_ci=(auc.ci_low, auc.ci_high), **band)
        sens, spec = two["metrics"]["sensitivity"].value, two["metrics"]["specificity"].value
        point = OperatingPoint(1.0 - spec, sens, "decision rule", marker="o", color="C0")
        plot_roc(
            out_dir / "roc_2class.png",
            [curve],
            [point],
            title="ROC, COVID-19 vs rest",
            band_label=f"{100 * cfg.ci_level:g}% pointwise CI (bootstrap)" if band else None,
        )
        images["roc_2class"] = "roc_2class.png"
    plot_confusion(
        out_dir / "confusion_2class.png",
        two["confusion_matrix"]["matrix"],
        two["confusion_matrix"]["labels"],
        title="COVID-19 vs rest",
    )
    images["confusion_2class"] = "confusion_2class.png"
    three = result.get("three_class")
    if three is not None and predictions.probs is not None:
        curves = []
        for j, name in enumerate(CLASS_NAMES):
            yj = labels == name
            if 0 < yj.sum() < yj.size:
                fpr, tpr, _ = roc_points(yj, predictions.probs[:, j])
                a = three["per_class"][name]["auc"]
                curves.append(RocCurve(fpr, tpr, f"{name} vs rest", auc=a.value, auc_ci=(a.ci_low, a.ci_high)))
        if curves:
            plot_roc(out_dir / "roc_3class.png", curves, title="ROC, one vs rest (3-class)")
            images["roc_3class"] = "roc_3class.png"
        plot_confusion(
            out_dir / "confusion_3class.png",
            three["confusion_matrix"]["matrix"],
            three["confusion_matrix"]["labels"],
            title="Control / COVID-19 / CAP",
        )
        images["confusion_3class"] = "confusion_3class.png"
    return images


def evaluate(
    predictions_csv: str | os.PathLike,
    labels_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: EvaluateConfig | None = None,
) -> dict[str, Any]:
    """Evaluate a predictions CSV against a labels CSV and write the report folder.

    Every input check runs before anything is written, so bad input leaves no report.

    Args:
        predictions_csv: ``report.csv`` (predict) or ``preds.csv`` (predict-slice).
        labels_csv: ``study_id,label`` (or ``case_id,label``); 3-class or 2-class labels.
        out_dir: report folder; gets ``report.md``, ``report.html`` (the report as one page, figures embedded),
            ``metrics.json``, ``config.yaml``, ``roc_2class.png``,
            ``confusion_2class.png`` and, for 3-class inputs, ``roc_3class.png`` and ``confusion_3class.png``.
        config: options; defaults from :class:`EvaluateConfig`.

    Returns:
        the content of ``metrics.json``.

    Raises:
        InputError / LabelError: bad or inconsistent inputs (one-line message naming the file).
    """
    cfg = config or EvaluateConfig()
    predictions_csv, labels_csv, out_dir = Path(predictions_csv), Path(labels_csv), Path(out_dir)
    predictions = read_predictions(predictions_csv, cfg.prob_tolerance)
    truth = read_truth(labels_csv)
    keys_all = match_case_ids(
        predictions.all_ids, truth, predictions_csv, labels_csv, allow_file_names=predictions.id_column == "file"
    )
    truth_keys = keys_all[: len(predictions.ids)]
    threshold, source = effective_threshold(predictions, cfg.threshold)
    if cfg.threshold is None and threshold is not None:
        logger.info("%s: threshold %.6g from its threshold column (the one predict-slice used)", predictions_csv,
                    threshold)
    result = compute_metrics(predictions, truth_keys, truth, dataclasses.replace(cfg, threshold=threshold), source)
    inputs = {
        "predictions": str(predictions_csv),
        "predictions_kind": "report.csv, 3-class" if predictions.kind == "3class" else "preds.csv, 2-class",
        "predictions_sha256": sha256_file(predictions_csv),
        "labels": str(labels_csv),
        "labels_sha256": sha256_file(labels_csv),
        "n_rows": predictions.n_rows,
        "n_evaluated": len(predictions.ids),
        "model": predictions.model or None,
        "weights_sha256": predictions.weights_sha256 or None,
        "excluded": dict(predictions.excluded),
    }
    if predictions.excluded:
        logger.warning("%s: %d row(s) excluded (status error/skipped)", predictions_csv, len(predictions.excluded))
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _write_plots(result, predictions, truth_keys, truth, cfg, out_dir)
    save_config(cfg, out_dir / "config.yaml")
    payload = {
        "schema": "covidctnet-evaluate/1",
        "inputs": inputs,
        "config": config_to_dict(cfg),
        **to_jsonable(result),
        "files": sorted(["report.md", "report.html", "metrics.json", "config.yaml", *images.values()]),
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
    report_md = _render_report(result, inputs, cfg, images)
    atomic_write_text(out_dir / "report.md", report_md)
    write_markdown_html(out_dir / "report.html", report_md, out_dir, "covidctnet evaluation report")
    two = result["two_class"]["metrics"]
    logger.info(
        "evaluated %d cases: 2-class accuracy %s, AUC %s; report in %s",
        len(predictions.ids),
        format_estimate(two["accuracy"])[0],
        format_estimate(two["auc"], percent=False)[0] if "auc" in two else "n/a",
        out_dir,
    )
    return payload
