"""``covidctnet validate-residuals``: do the residual maps find infected slices, better than density does?

Input: a ``covidctnet slice-scores`` folder (``<study_id>_slices.csv``) and slice labels in one of two forms:

* a CSV in the shape of the shared ``slice_labels.csv`` (``study_id, z_mm, infected``, optionally the lobe columns
  ``LLL, LUL, RLL, RML, RUL``; other columns are ignored). A slice is matched to the label row of its study whose
  ``z_mm`` is within half the slice spacing; unmatched slices are left out and counted.
* COVID-CT-MD's own files, as published (:func:`read_covid_ct_md_labels`): ``Slice-level-labels(-updated-1).npy``
  (cases × 200, 1 = infected, padded with 0), ``Index.csv`` (``Label Index, Diagnosis, Relative Path, Folder/ID``)
  and optionally ``Lobe-level-labels-updated-1.npy`` (cases × 200 × 5 lobes). A study is the case whose Folder/ID is
  its id or ends it after a ``-`` (``covid-P001`` is ``P001``). The dataset orders a case's labels by Slice Location
  (0020,1041), label 0 being the **most superior** slice; for its axial series SliceLocation is ImagePositionPatient
  z, which is the slice table's ``z_mm``, so the k-th label belongs to the slice with the k-th largest ``z_mm``. The
  dataset's normal patients have no row in ``Index.csv``: a study without a case whose id ends in ``normal<digits>``
  (its naming of normal patients) or whose patient label in the slice-scores ``manifest.csv`` is ``control`` is a
  normal subject, every slice 0.

Slice position confounds these labels: infection is marked mostly in mid-lung slices with large lung cross-sections,
while partial volume raises density near the apex and the base. So the evaluation keeps **lung slices** only:
``lung_ml >= lung_fraction ×`` that scan's largest ``lung_ml`` (0.25 by default), and always reports three scores
side by side: ``residual_score``, ``hu_score`` (density baseline) and ``lung_ml`` itself (position proxy).

* per study with infected and clean lung slices: within-patient AUC (infected vs not) with a DeLong 95% CI for each
  score, and DeLong's paired test of ``residual_score`` against ``hu_score`` and against ``lung_ml``;
* pooled: the infected lung slices of the studies with any infection (COVID-19 / CAP patients) against the lung
  slices of the studies without any (normal subjects), same AUCs and tests;
* any other ``residual_*`` column of the CSVs (the candidate statistics) gets its AUCs too, under ``candidates``.

With lobe labels, each study's lung slices infected in a lobe are compared with its slices without infection, per
lobe (``per_study.<id>.lobes``, a table in the report).

Outputs: ``metrics.json``, ``report.md``, ``matched_labels.csv`` (the label each slice was given: ``study_id, slice,
z_mm, infected`` and the lobe columns, empty where no label matched; the same file from either label form) and
``<study_id>_scores.png`` (the three scores along z, each scaled to [0, 1] over the scan, infected slices shaded,
lung slices marked).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covidctnet.core.errors import ConfigError, InputError, LabelError
from covidctnet.core.files import atomic_write_text, to_jsonable, write_csv
from covidctnet.core.slice_table import SLICES_SUFFIX, read_slices_csv
from covidctnet.evaluation.plots import plot_slice_scores
from covidctnet.evaluation.report_md import render_residual_validation_report
from covidctnet.evaluation.stats import auc_score, delong_auc_ci, delong_test

__all__ = ["ValidateResidualsConfig", "SliceLabels", "read_slice_labels", "read_labels", "read_covid_ct_md_labels",
           "validate_residuals", "SCORES", "LOBES"]

logger = logging.getLogger(__name__)

SCORES = ("residual_score", "hu_score", "lung_ml")
"""The scores always reported side by side; ``residual_score`` is compared with the other two."""
LOBES = ("LLL", "LUL", "RLL", "RML", "RUL")
"""Lobe columns, in the order of COVID-CT-MD's lobe labels (left lower, left upper, right lower, middle, upper)."""
INDEX_COLUMNS = ("Label Index", "Diagnosis", "Relative Path", "Folder/ID")
"""Columns of COVID-CT-MD's ``Index.csv``."""
_NORMAL_ID = re.compile(r"(^|-)normal\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class ValidateResidualsConfig:
    """Settings of ``covidctnet validate-residuals`` (defaults = ``configs/validate_residuals.yaml``).

    Attributes:
        lung_fraction: a slice is a lung slice when its ``lung_ml`` is at least this fraction of the scan's largest.
        level: confidence level of the DeLong intervals.
    """

    lung_fraction: float = 0.25
    level: float = 0.95

    def __post_init__(self) -> None:
        if not 0.0 <= self.lung_fraction < 1.0:
            raise ConfigError(f"'lung_fraction' must be in [0, 1), not {self.lung_fraction}")
        if not 0.5 <= self.level < 1.0:
            raise ConfigError(f"'level' must be in [0.5, 1), not {self.level}")


@dataclass
class SliceLabels:
    """Slice labels of the studies, from a labels CSV or from COVID-CT-MD's label files; :meth:`assign` gives each
    slice of a slice table its label.

    Attributes:
        source: the label file(s), for the report.
        by_z: CSV form: study id → ``(z_mm (M,), infected (M,), lobes (M, 5) or None)``.
        cases: COVID-CT-MD form: Folder/ID → ``(infected (S,), lobes (S, 5) or None)``, label k for the slice with the
            k-th largest z (the most superior first).
        has_lobes: lobe labels were read.
    """

    source: str
    by_z: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    cases: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    has_lobes: bool = False

    def assign(self, rows_by_study: dict[str, list[dict[str, Any]]], patient_labels: dict[str, str] | None = None
               ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Labels of each slice of the studies that have labels.

        Args:
            rows_by_study: study id → its ``<id>_slices.csv`` rows (any order of ``z_mm``).
            patient_labels: study id → patient label (``control``, ``covid``, ``cap``) from the slice-scores
                manifest, to recognise normal subjects (COVID-CT-MD form only).

        Returns:
            study id → ``(infected (N,), lobes (N, 5) or None)`` in the order of its rows: 0, 1, or -1 (no label).
            Studies without labels are left out (named in one log line for the COVID-CT-MD form).

        Raises:
            LabelError: a study matches several cases, or a case several studies (named in one line).
        """
        if not self.cases:
            out = {}
            for sid, rows in rows_by_study.items():
                if sid in self.by_z:
                    z, flags, lobes = self.by_z[sid]
                    idx = _nearest(rows, z)
                    out[sid] = (np.where(idx >= 0, flags[idx], -1),
                                None if lobes is None else np.where(idx[:, None] >= 0, lobes[idx], -1))
            return out
        return self._assign_cases(rows_by_study, patient_labels or {})

    def match_cases(self, study_ids: Sequence[str]) -> dict[str, str]:
        """Study id → Folder/ID: the case whose Folder/ID is the id, or else the one that ends it after a ``-``.

        Raises:
            LabelError: ambiguous matches, all named in one line.
        """
        matched: dict[str, str] = {}
        problems = []
        for sid in study_ids:
            found = [c for c in self.cases if c == sid] or [c for c in self.cases if sid.endswith("-" + c)]
            if len(found) > 1:
                problems.append(f"study {sid} matches cases {', '.join(sorted(found))}")
            elif found:
                matched[sid] = found[0]
        by_case: dict[str, list[str]] = {}
        for sid, case in matched.items():
            by_case.setdefault(case, []).append(sid)
        problems += [f"case {case} matches studies {', '.join(sorted(sids))}"
                     for case, sids in sorted(by_case.items()) if len(sids) > 1]
        if problems:
            raise LabelError(f"{self.source}: ambiguous matches of studies to Folder/ID: {'; '.join(problems)}; "
                             "give each study one case")
        return matched

    def _assign_cases(self, rows_by_study: dict[str, list[dict[str, Any]]], patient_labels: dict[str, str]
                      ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        matched = self.match_cases(list(rows_by_study))
        out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        missing = []
        for sid, rows in rows_by_study.items():
            n = len(rows)
            if sid not in matched:
                if _NORMAL_ID.search(sid) or patient_labels.get(sid) == "control":
                    out[sid] = (np.zeros(n, np.int64), np.zeros((n, len(LOBES)), np.int64) if self.has_lobes else None)
                else:
                    missing.append(sid)
                continue
            flags, lobes = self.cases[matched[sid]]
            z = np.array([r["z_mm"] for r in rows], dtype=np.float64)
            order = np.argsort(-z, kind="stable")  # label k: the slice with the k-th largest z (most superior first)
            k = min(n, flags.size)
            y = np.full(n, -1, np.int64)
            y[order[:k]] = flags[:k]
            lobe_y = None
            if lobes is not None:
                lobe_y = np.full((n, len(LOBES)), -1, np.int64)
                lobe_y[order[:k]] = lobes[:k]
            if n > flags.size or flags[k:].any():
                logger.warning("%s (case %s): the scan has %d slices but the labels %s; the labels may belong to "
                               "another series of the patient", sid, matched[sid], n,
                               f"stop at {flags.size}" if n > flags.size else
                               f"mark infection up to slice {int(np.flatnonzero(flags).max()) + 1}")
            out[sid] = (y, lobe_y)
        if missing:
            shown = ", ".join(sorted(missing)[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            logger.warning("%d studies have no case in %s (Folder/ID) and are left out: %s", len(missing),
                           self.source, shown)
        return out


def _nearest(rows: Sequence[dict[str, Any]], label_z: np.ndarray) -> np.ndarray:
    """Index into ``label_z`` of each row's label: the nearest z, if within half the slice spacing; else -1."""
    z = np.array([r["z_mm"] for r in rows], dtype=np.float64)
    if label_z.size == 0:
        return np.full(z.size, -1, np.int64)
    half = 0.5 * float(np.median(np.abs(np.diff(np.sort(z))))) if z.size > 1 else 0.5
    nearest = np.abs(z[:, None] - label_z[None, :]).argmin(axis=1)
    return np.where(np.abs(z - label_z[nearest]) <= half + 1e-6, nearest, -1)


def read_slice_labels(path: str | os.PathLike) -> SliceLabels:
    """Slice labels from a CSV with ``study_id, z_mm, infected`` columns, and the lobe columns :data:`LOBES` when all
    are there (0/1 each).

    Raises:
        LabelError: missing file or column, or a value that is not a number / 0-1 flag (the message names the row).
    """
    path = Path(path)
    rows: dict[str, list[tuple[float, int, list[int]]]] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            missing = [c for c in ("study_id", "z_mm", "infected") if c not in fields]
            if missing:
                raise LabelError(f"{path}: column(s) {missing} missing; expected study_id, z_mm, infected")
            lobes = all(c in fields for c in LOBES)
            for i, row in enumerate(reader, start=2):
                try:
                    z = float(row["z_mm"])
                    flags = [int(row["infected"])] + ([int(float(row[c])) for c in LOBES] if lobes else [])
                except (TypeError, ValueError) as err:
                    raise LabelError(f"{path}, line {i}: z_mm must be a number and infected (and the lobe columns) "
                                     "0 or 1") from err
                if any(f not in (0, 1) for f in flags):
                    raise LabelError(f"{path}, line {i}: infected and the lobe columns must be 0 or 1, not {flags}")
                rows.setdefault(row["study_id"], []).append((z, flags[0], flags[1:]))
    except OSError as err:
        raise LabelError(f"{path}: cannot read labels: {err.strerror or err}") from err
    if not rows:
        raise LabelError(f"{path}: no label rows")
    by_z = {sid: (np.array([r[0] for r in items]), np.array([r[1] for r in items], np.int64),
                  np.array([r[2] for r in items], np.int64) if lobes else None) for sid, items in rows.items()}
    return SliceLabels(source=str(path), by_z=by_z, has_lobes=lobes)


def _load_npy(path: Path, ndim: int, what: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise LabelError(f"{path}: cannot read {what} ({err})") from err
    if array.ndim != ndim or not np.isin(array, (0, 1)).all():
        raise LabelError(f"{path}: {what} of shape {array.shape} and values {np.unique(array)[:5].tolist()}; expected "
                         f"{ndim} dimensions of 0/1 (COVID-CT-MD's format)")
    return array.astype(np.int64)


def read_covid_ct_md_labels(labels_path: str | os.PathLike, index_path: str | os.PathLike | None = None,
                            lobes_path: str | os.PathLike | None = None) -> SliceLabels:
    """COVID-CT-MD's label files as published.

    Args:
        labels_path: ``Slice-level-labels(-updated-1).npy``: (cases, slices) 0/1, padded with 0.
        index_path: ``Index.csv`` (:data:`INDEX_COLUMNS`); default the one beside ``labels_path``. Label Index is
            the case's row; where its values skip a number (the published file goes from 42 to 44 for 79 rows) and
            there is one Index row per array row, the rows are taken in Label Index order, with one log line.
        lobes_path: ``Lobe-level-labels-updated-1.npy``: (cases, slices, 5) 0/1, lobes :data:`LOBES`.

    Returns:
        :class:`SliceLabels` with ``cases`` keyed by Folder/ID.

    Raises:
        LabelError: a file missing or not in this format, shapes that disagree, a Label Index out of range.
    """
    labels_path = Path(labels_path)
    index_path = Path(index_path) if index_path is not None else labels_path.parent / "Index.csv"
    flags = _load_npy(labels_path, 2, "slice labels")
    lobes = _load_npy(Path(lobes_path), 3, "lobe labels") if lobes_path is not None else None
    if lobes is not None and (lobes.shape[:2] != flags.shape or lobes.shape[2] != len(LOBES)):
        raise LabelError(f"{lobes_path}: lobe labels of shape {lobes.shape}; expected {flags.shape + (len(LOBES),)} "
                         f"to go with {labels_path.name}")
    try:
        with index_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in reader.fieldnames or []]
            if "Label Index" not in fields or "Folder/ID" not in fields:
                raise LabelError(f"{index_path}: columns {fields}; expected COVID-CT-MD's {list(INDEX_COLUMNS)} "
                                 "(pass --label-index when Index.csv is elsewhere)")
            entries = [(int(row["Label Index"]), row["Folder/ID"].strip())
                       for row in ({k.strip(): (v or "") for k, v in r.items()} for r in reader)]
    except FileNotFoundError as err:
        raise LabelError(f"{index_path}: not found; COVID-CT-MD's Index.csv is needed beside {labels_path.name} "
                         "(or pass --label-index)") from err
    except (OSError, ValueError) as err:
        raise LabelError(f"{index_path}: cannot read COVID-CT-MD's Index.csv ({err})") from err
    indices = [i for i, _ in entries]
    ids = [c for _, c in entries]
    if len(set(ids)) != len(ids) or len(set(indices)) != len(indices):
        raise LabelError(f"{index_path}: a Folder/ID or Label Index appears twice")
    if indices and min(indices) >= 0 and max(indices) < flags.shape[0]:
        rows = dict(zip(ids, indices))
    elif len(entries) == flags.shape[0]:
        ranked = sorted(entries)
        rows = {case: k for k, (_, case) in enumerate(ranked)}
        logger.warning("%s: Label Index runs to %d for %d label rows; rows taken in Label Index order", index_path,
                       max(indices), flags.shape[0])
    else:
        raise LabelError(f"{index_path}: Label Index {min(indices)}..{max(indices)} for {len(entries)} cases, but "
                         f"{labels_path.name} has {flags.shape[0]} rows")
    cases = {case: (flags[r], lobes[r] if lobes is not None else None) for case, r in rows.items()}
    source = f"{labels_path} ({index_path.name}{', ' + Path(lobes_path).name if lobes_path else ''})"
    return SliceLabels(source=source, cases=cases, has_lobes=lobes is not None)


def read_labels(labels_path: str | os.PathLike, index_path: str | os.PathLike | None = None,
                lobes_path: str | os.PathLike | None = None) -> SliceLabels:
    """A labels CSV, or COVID-CT-MD's ``.npy`` label files (see :func:`read_covid_ct_md_labels`), by file ending.

    Raises:
        LabelError: unreadable labels, or ``index_path``/``lobes_path`` given with a CSV.
    """
    if str(labels_path).lower().endswith(".npy"):
        return read_covid_ct_md_labels(labels_path, index_path, lobes_path)
    if index_path is not None or lobes_path is not None:
        raise LabelError(f"{labels_path}: --label-index and --lobe-labels go with COVID-CT-MD's .npy label files; a "
                         "CSV carries its lobe columns itself")
    return read_slice_labels(labels_path)


def _auc_block(y: np.ndarray, scores: dict[str, np.ndarray], level: float) -> dict[str, Any]:
    out: dict[str, Any] = {"n_slices": int(y.size), "n_infected": int(y.sum()), "auc": {}, "tests": {}}
    for name, s in scores.items():
        out["auc"][name] = delong_auc_ci(y, s, level).to_dict()
    for other in ("hu_score", "lung_ml"):
        if "residual_score" in scores and other in scores:
            out["tests"][f"residual_score_vs_{other}"] = delong_test(y, scores["residual_score"],
                                                                     scores[other]).to_dict()
    return out


def _lobe_block(lobes: np.ndarray, y: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per lobe: the lung slices infected in that lobe against the lung slices without any infection (AUC of each of
    :data:`SCORES`; ``None`` without both classes)."""
    out: dict[str, Any] = {}
    for j, lobe in enumerate(LOBES):
        pick = (lobes[:, j] == 1) | (y == 0)
        target = (lobes[pick, j] == 1).astype(np.int64)
        both = 0 < target.sum() < target.size
        out[lobe] = {"n_infected": int(target.sum()),
                     "auc": {s: auc_score(target, scores[s][pick]) if both else None for s in SCORES}}
    return out


def _patient_labels(slices_dir: Path) -> dict[str, str]:
    """Study id → patient label from the slice-scores ``manifest.csv`` (empty when it is absent or unlabelled)."""
    path = slices_dir / "manifest.csv"
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return {r["study_id"]: r.get("label") or "" for r in csv.DictReader(fh) if r.get("study_id")}
    except (OSError, ValueError, KeyError):
        return {}


def validate_residuals(slices_dir: str | os.PathLike, labels_path: str | os.PathLike, out_dir: str | os.PathLike,
                       cfg: ValidateResidualsConfig = ValidateResidualsConfig(),
                       label_index: str | os.PathLike | None = None,
                       lobe_labels: str | os.PathLike | None = None) -> dict[str, Any]:
    """Slice-level AUCs of the residual score against the HU and lung-area baselines (see the module docstring).

    Args:
        slices_dir: folder of ``<study_id>_slices.csv`` files (``covidctnet slice-scores`` output).
        labels_path: slice labels: a CSV (``study_id, z_mm, infected[, LLL…RUL]``) or COVID-CT-MD's
            ``Slice-level-labels(-updated-1).npy``.
        out_dir: where ``metrics.json``, ``report.md``, ``matched_labels.csv`` and the PNGs go (written only once
            everything is computed).
        cfg: lung-slice fraction and CI level.
        label_index: COVID-CT-MD's ``Index.csv`` when it is not beside ``labels_path``.
        lobe_labels: COVID-CT-MD's ``Lobe-level-labels-updated-1.npy``, for the per-lobe analysis.

    Returns:
        The metrics (as written to ``metrics.json``).

    Raises:
        InputError: no slice CSV, no study with labels, or no analysis possible (message says why).
        LabelError: unreadable labels.
    """
    slices_dir, out_dir = Path(slices_dir), Path(out_dir)
    files = sorted(slices_dir.glob(f"*{SLICES_SUFFIX}")) if slices_dir.is_dir() else []
    if not files:
        raise InputError(f"{slices_dir}: no *{SLICES_SUFFIX} files (run `covidctnet slice-scores` first)")
    labels = read_labels(labels_path, label_index, lobe_labels)
    tables, skipped = _read_slice_tables(files)
    assigned = labels.assign(tables, _patient_labels(slices_dir))
    per_study: dict[str, Any] = {}
    positives: list[dict[str, np.ndarray]] = []
    negatives: list[dict[str, np.ndarray]] = []
    plots: list[tuple[str, list[dict[str, Any]], np.ndarray, np.ndarray]] = []
    extra: list[str] = []
    matched_rows: list[list[Any]] = []
    for sid, rows in tables.items():
        if sid not in assigned:
            skipped[sid] = "no labels"
            continue
        y, lobe_y = assigned[sid]
        matched_rows += _matched_label_rows(sid, rows, y, lobe_y)
        lung = _lung_slices(rows, y, cfg.lung_fraction)
        # the candidate columns are those of the first labelled table that has any
        extra = extra or [k for k in rows[0] if k.startswith("residual_") and k != "residual_score"]
        info, lung_scores, y_lung = _study_block(rows, y, lobe_y, lung, extra, cfg.level)
        plots.append((sid, rows, y, lung))
        if (y == 1).any():
            positives.append({c: v[y_lung == 1] for c, v in lung_scores.items()})
            if "auc" not in info:
                skipped[sid] = "lung slices hold only one class"
        else:
            negatives.append(lung_scores)
        per_study[sid] = info
    if not per_study:
        raise InputError(f"{slices_dir}: none of the studies {[p.name for p in files]} has labels in {labels.source}")
    metrics: dict[str, Any] = {"slices_dir": str(slices_dir), "labels": labels.source,
                               "config": {"lung_fraction": cfg.lung_fraction, "level": cfg.level},
                               "per_study": per_study, "skipped": skipped}
    metrics.update(_summary_blocks(per_study, extra, positives, negatives, cfg.level))
    metrics = to_jsonable(metrics)
    _write_validation(out_dir, metrics, plots, matched_rows, labels.has_lobes)
    return metrics


def _read_slice_tables(files: Sequence[Path]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Read the ``<study_id>_slices.csv`` tables.

    Returns:
        study id → its rows, and file name → ``"empty"`` for the tables without a row.
    """
    tables: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    for path in files:
        rows = read_slices_csv(path)
        if not rows:
            skipped[path.name] = "empty"
            continue
        tables[rows[0]["study_id"]] = rows
    return tables, skipped


def _matched_label_rows(sid: str, rows: Sequence[dict[str, Any]], y: np.ndarray, lobe_y: np.ndarray | None
                        ) -> list[list[Any]]:
    """The ``matched_labels.csv`` rows of one study: ``study_id, slice, z_mm, infected`` and the lobe labels of each
    of its N slices (``y`` (N,), ``lobe_y`` (N, 5) or ``None``), empty where no label matched (-1)."""
    return [[sid, r["slice"], f"{r['z_mm']:.3f}", *("" if v < 0 else int(v) for v in
                                                    [y[k], *(lobe_y[k] if lobe_y is not None else [])])]
            for k, r in enumerate(rows)]


def _lung_slices(rows: Sequence[dict[str, Any]], y: np.ndarray, lung_fraction: float) -> np.ndarray:
    """(N,) bool: the slices whose ``lung_ml`` is at least ``lung_fraction`` of the scan's largest (none when the scan
    has no lung)."""
    lung_ml = np.array([r["lung_ml"] for r in rows], dtype=np.float64)
    return lung_ml >= lung_fraction * float(lung_ml.max()) if lung_ml.max() > 0 else np.zeros_like(y, bool)


def _study_block(rows: Sequence[dict[str, Any]], y: np.ndarray, lobe_y: np.ndarray | None, lung: np.ndarray,
                 extra: Sequence[str], level: float) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    """One study's analysis of its labelled lung slices with every score finite.

    Args:
        rows: the study's N slice rows.
        y: (N,) slice labels: 0, 1, or -1 (no label).
        lobe_y: (N, 5) lobe labels, or ``None``.
        lung: (N,) bool lung slices.
        extra: the candidate ``residual_*`` columns.
        level: confidence level of the DeLong intervals.

    Returns:
        the study's ``per_study`` block (counts; AUCs and tests of :data:`SCORES` and the candidates' AUCs when both
        classes are present; per-lobe AUCs with lobe labels), the K kept slices' scores (column → (K,)) and their
        (K,) labels.
    """
    cols = list(SCORES) + list(extra)
    values = {c: np.array([r.get(c, np.nan) for r in rows], dtype=np.float64) for c in cols}
    keep = lung & (y >= 0) & np.all([np.isfinite(values[c]) for c in cols], axis=0)
    info: dict[str, Any] = {"n_rows": len(rows), "n_unmatched": int((y < 0).sum()),
                            "n_lung_slices": int(keep.sum()), "n_infected_all": int((y == 1).sum())}
    y_kept = y[keep]
    chosen = {c: values[c][keep] for c in cols}
    if not (y == 1).any():
        info["role"] = "normal subject (no infected slice): negatives of the pooled analysis"
    if y_kept.size and 0 < y_kept.sum() < y_kept.size:
        info.update(_auc_block(y_kept, {c: chosen[c] for c in SCORES}, level))
        info["candidates"] = {c: auc_score(y_kept, chosen[c]) for c in extra}
    if lobe_y is not None and (y == 1).any():
        info["lobes"] = _lobe_block(lobe_y[keep], y_kept, chosen)
    return info, chosen, y_kept


def _summary_blocks(per_study: dict[str, Any], extra: Sequence[str], positives: Sequence[dict[str, np.ndarray]],
                    negatives: Sequence[dict[str, np.ndarray]], level: float) -> dict[str, Any]:
    """The across-study part of ``metrics.json``: ``mean_within_auc``, ``pooled`` (infected lung slices of the
    studies with infection against the lung slices of the studies without) and ``candidates``, each only when there
    is something to report.

    Args:
        per_study: the studies' blocks (:func:`_study_block`).
        extra: the candidate ``residual_*`` columns.
        positives: per study with infection, its infected lung slices' scores (column → (K,)).
        negatives: per study without infection, its lung slices' scores (column → (K,)).
        level: confidence level of the DeLong intervals.
    """
    out: dict[str, Any] = {}
    within = [b for b in per_study.values() if "auc" in b]
    if within:
        out["mean_within_auc"] = {s: float(np.mean([b["auc"][s]["value"] for b in within])) for s in SCORES}
    candidates: dict[str, dict[str, float | None]] = {}
    for c in extra:
        candidates[c] = {sid: b["candidates"][c] for sid, b in per_study.items() if "candidates" in b}
    if positives and negatives:
        pos = {c: np.concatenate([p[c] for p in positives]) for c in positives[0]}
        neg = {c: np.concatenate([n[c] for n in negatives]) for c in negatives[0]}
        y = np.concatenate([np.ones(pos["lung_ml"].size, int), np.zeros(neg["lung_ml"].size, int)])
        both = {c: np.concatenate([pos[c], neg[c]]) for c in pos}
        if 0 < y.sum() < y.size:
            out["pooled"] = _auc_block(y, {c: both[c] for c in SCORES}, level)
            out["pooled"]["positives"] = "infected lung slices of studies with infection"
            out["pooled"]["negatives"] = "lung slices of studies without infection"
            for c in extra:
                candidates[c]["pooled"] = auc_score(y, both[c])
    if candidates:
        out["candidates"] = candidates
    return out


def _write_validation(out_dir: Path, metrics: dict[str, Any],
                      plots: Sequence[tuple[str, list[dict[str, Any]], np.ndarray, np.ndarray]],
                      matched_rows: Sequence[Sequence[Any]], has_lobes: bool) -> None:
    """Write the output folder: one ``<study_id>_scores.png`` per ``(study id, rows, (N,) labels, (N,) lung
    slices)`` of ``plots``, ``metrics.json``, ``matched_labels.csv`` (lobe columns when ``has_lobes``) and
    ``report.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for sid, rows, y, lung in plots:
        plot_slice_scores(out_dir / f"{sid}_scores.png", sid, rows, y, lung, SCORES)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))
    header = ["study_id", "slice", "z_mm", "infected", *(LOBES if has_lobes else ())]
    write_csv(out_dir / "matched_labels.csv", header, matched_rows)
    atomic_write_text(out_dir / "report.md", render_residual_validation_report(metrics, SCORES, LOBES))
