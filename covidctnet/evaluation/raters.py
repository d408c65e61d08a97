"""The raters of a reader study (each reader, their majority vote, the model) and what is computed on them.

Per rater: accuracy (COVID-19 vs non-COVID and 3-class), sensitivity and specificity with Wilson intervals and the AUC
with DeLong's; the reader average, with intervals from a stratified case bootstrap; the paired tests of the model
against each rater (exact McNemar, DeLong) and against the average reader (exact sign-flip test, DeLong contrast);
inter-reader agreement (Cohen's kappa per pair, Fleiss' kappa over all). Every rater's arrays are (N,), in the same
case order; ``y`` is the (N,) bool truth COVID-19 vs non-COVID, ``truth3`` the (N,) 3-class truth (``None`` for
2-class labels).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from covidctnet.core.labels import CLASS_NAMES
from covidctnet.evaluation.inputs import POSITIVE_CLASS
from covidctnet.evaluation.stats import (
    DeLongTest,
    Estimate,
    bootstrap_ci,
    cohen_kappa,
    delong_auc_ci,
    delong_contrast_test,
    delong_covariance,
    delong_interval,
    delong_test,
    fleiss_kappa,
    mcnemar_exact,
    nan_to_none,
    proportion,
    sign_flip_test,
    undefined_auc,
)

__all__ = [
    "Rater",
    "majority_vote",
    "majority_vote_rater",
    "rater_metrics",
    "reader_average",
    "reader_average_method",
    "paired_tests",
    "reader_agreement",
]

# Tie-break of the majority vote: a tie that involves COVID-19 is called COVID-19 (the cautious call that triggers
# isolation and testing), then CAP, then control.
_VOTE_PRIORITY = ("covid", "cap", "control")


@dataclass
class Rater:
    """One rater's reads of the N cases.

    Attributes:
        name: display name (the table's ``rater`` column).
        kind: ``"reader"``, ``"majority vote"`` or ``"model"``.
        call: (N,) bool: called COVID-19.
        labels3: (N,) 3-class labels, ``None`` if the rater only gave covid / noncovid.
        score: (N,) COVID-19 score (higher = more likely), ``None`` if none was given.
        score_name: what the score is, for the reports (``"score"``, ``"p_covid"``, ``"vote fraction"``).
    """

    name: str
    kind: str
    call: np.ndarray
    labels3: np.ndarray | None
    score: np.ndarray | None
    score_name: str = "score"

    def auc_input(self) -> tuple[np.ndarray, str]:
        """The ROC score (the given score, else the binary call) and its description."""
        if self.score is not None:
            return self.score, self.score_name
        return self.call.astype(np.float64), "binary call"


def majority_vote(labels: np.ndarray) -> np.ndarray:
    """Per-case majority of R readers' labels; ties go to covid, then cap, then control (noncovid last).

    Args:
        labels: (N, R) labels (3-class names, or covid / noncovid).

    Returns:
        (N,) the voted label.
    """
    priority = {name: i for i, name in enumerate((*_VOTE_PRIORITY, "noncovid"))}
    out = []
    for row in np.asarray(labels, dtype=object):
        counts = Counter(row.tolist())
        best = max(counts.values())
        out.append(min((lab for lab, c in counts.items() if c == best), key=lambda lab: priority[lab]))
    return np.asarray(out, dtype=object)


def majority_vote_rater(readers: Sequence[Rater]) -> Rater:
    """The readers' majority vote as one more rater.

    It votes on 3-class labels when every reader gave them, else on covid / noncovid; its ROC score is the (N,)
    fraction of readers calling COVID-19.
    """
    all3 = all(r.labels3 is not None for r in readers)
    votes = majority_vote(
        np.stack([r.labels3 if all3 else np.where(r.call, "covid", "noncovid") for r in readers], axis=1)
    )
    return Rater(
        "Majority vote",
        "majority vote",
        votes == POSITIVE_CLASS,
        votes if all3 else None,
        np.mean([r.call for r in readers], axis=0),
        "vote fraction",
    )


def rater_metrics(r: Rater, y: np.ndarray, truth3: np.ndarray | None, level: float) -> dict[str, Any]:
    """One rater's table row: accuracies, sensitivity and specificity with Wilson intervals, the AUC with DeLong's
    (of the score, else of the binary call; undefined when ``y`` holds one class).

    Args:
        r: the rater.
        y: (N,) bool truth, COVID-19 vs non-COVID.
        truth3: (N,) 3-class truth, or ``None`` (then no 3-class accuracy).
        level: confidence level.

    Returns:
        ``rater``, ``type``, ``n_cases``, ``accuracy_2class``, ``accuracy_3class``, ``sensitivity``,
        ``specificity``, ``auc`` (:class:`~covidctnet.evaluation.stats.Estimate` or ``None``) and ``auc_source``.
    """
    n = int(y.size)
    correct2 = r.call == y
    row: dict[str, Any] = {
        "rater": r.name,
        "type": r.kind,
        "n_cases": n,
        "accuracy_2class": proportion(int(correct2.sum()), n, level),
        "accuracy_3class": None,
        "sensitivity": proportion(int(np.sum(r.call & y)), int(y.sum()), level),
        "specificity": proportion(int(np.sum(~r.call & ~y)), int((~y).sum()), level),
    }
    if r.labels3 is not None and truth3 is not None:
        row["accuracy_3class"] = proportion(int(np.sum(r.labels3 == truth3)), n, level)
    score, source = r.auc_input()
    row["auc"] = delong_auc_ci(y.astype(int), score, level) if 0 < y.sum() < n else undefined_auc(n, level)
    row["auc_source"] = source
    return row


def reader_average_method(n_boot: int, seed: int) -> str:
    """How the reader average's intervals are computed, in the words of the reports."""
    return f"stratified case bootstrap (percentile, {n_boot} resamples, seed {seed})"


def reader_average(
    readers: Sequence[Rater],
    y: np.ndarray,
    truth3: np.ndarray | None,
    strata: np.ndarray,
    level: float,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """The reader average's table row: the mean of the readers' metrics, with intervals from a case bootstrap
    stratified by ``strata`` (every reader resampled alike), the AUC's by DeLong (mean of the readers' AUCs).

    Args:
        readers: the R readers.
        y: (N,) bool truth, COVID-19 vs non-COVID.
        truth3: (N,) 3-class truth, or ``None``.
        strata: (N,) the class of each case, kept in every resample.
        level: confidence level.
        n_boot: bootstrap resamples.
        seed: seed of the bootstrap's ``numpy.random.default_rng``.

    Returns:
        the keys of :func:`rater_metrics`' row (an undefined metric is ``None``), and ``note`` when only some readers
        gave 3-class labels.
    """
    n = int(y.size)
    correct2 = np.stack([r.call == y for r in readers]).astype(np.float64)  # (R, N)
    calls = np.stack([r.call for r in readers]).astype(np.float64)
    with3 = [r for r in readers if r.labels3 is not None]
    correct3 = (
        np.stack([r.labels3 == truth3 for r in with3]).astype(np.float64) if (with3 and truth3 is not None) else None
    )

    def means(w: np.ndarray) -> list[float]:
        pos, neg = w * y, w * ~y
        acc2 = float((correct2 @ w).mean() / w.sum())
        acc3 = float((correct3 @ w).mean() / w.sum()) if correct3 is not None else math.nan
        sens = float((calls @ pos).mean() / pos.sum()) if pos.sum() else math.nan
        spec = float(((1.0 - calls) @ neg).mean() / neg.sum()) if neg.sum() else math.nan
        return [acc2, acc3, sens, spec]

    point = means(np.ones(n))
    low, high = bootstrap_ci(
        lambda idx: means(np.bincount(idx, minlength=n).astype(np.float64)),
        n,
        strata=strata,
        n_boot=n_boot,
        seed=seed,
        level=level,
    )
    method = reader_average_method(n_boot, seed)

    def est(i: int) -> Estimate | None:
        if math.isnan(point[i]):
            return None
        return Estimate(point[i], nan_to_none(low[i]), nan_to_none(high[i]), method, n=n, level=level)

    row: dict[str, Any] = {
        "rater": "Reader average",
        "type": "reader average",
        "n_cases": n,
        "accuracy_2class": est(0),
        "accuracy_3class": est(1),
        "sensitivity": est(2),
        "specificity": est(3),
    }
    sources = sorted({r.auc_input()[1] for r in readers})
    if 0 < y.sum() < n:
        scores = np.stack([r.auc_input()[0] for r in readers])
        aucs, cov = delong_covariance(y.astype(int), scores)
        c = np.full(len(readers), 1.0 / len(readers))
        auc_method = "DeLong (mean of the readers' AUCs)"
        row["auc"] = delong_interval(float(c @ aucs), float(c @ cov @ c), level, auc_method, n)
    else:
        row["auc"] = undefined_auc(n, level)
    row["auc_source"] = "mean of readers (" + ", ".join(sources) + ")"
    if correct3 is not None and len(with3) < len(readers):
        row["note"] = f"3-class accuracy averaged over the {len(with3)} readers who gave 3-class labels"
    return row


def paired_tests(
    model: Rater, others: Sequence[Rater], readers: Sequence[Rater], y: np.ndarray, truth3: np.ndarray | None
) -> list[dict[str, Any]]:
    """The model against each of ``others`` (readers, majority vote), then against the average of ``readers``.

    Args:
        model: the model as a rater.
        others: the raters compared one by one (exact McNemar, DeLong where both gave scores).
        readers: the readers whose average is compared last (exact sign-flip test, DeLong contrast).
        y: (N,) bool truth, COVID-19 vs non-COVID.
        truth3: (N,) 3-class truth, or ``None`` for 2-class labels.

    Returns:
        one row per comparison, the keys of ``tests.csv``.
    """
    m_correct3 = model.labels3 == truth3 if (model.labels3 is not None and truth3 is not None) else None
    out = [_paired_test(model, other, y, truth3, m_correct3) for other in others]
    out.append(_average_reader_test(model, readers, y, truth3, m_correct3))
    return out


def _paired_test(
    model: Rater, other: Rater, y: np.ndarray, truth3: np.ndarray | None, m_correct3: np.ndarray | None
) -> dict[str, Any]:
    """The model against one rater: exact McNemar on correctness (2- and 3-class), DeLong on the AUCs."""
    both_classes = 0 < y.sum() < y.size
    row: dict[str, Any] = {"comparison": f"model vs {other.name}", "other": other.name, "other_type": other.kind}
    row.update(_mcnemar_fields(model.call == y, other.call == y, "2class"))
    if m_correct3 is not None and other.labels3 is not None:
        row.update(_mcnemar_fields(m_correct3, other.labels3 == truth3, "3class"))
    else:
        row.update(_NO_3CLASS_TEST)
    if other.score is not None and model.score is not None and both_classes:
        t = delong_test(y.astype(int), model.score, other.score)
        row.update(_auc_test_fields(f"DeLong (model p_covid vs {other.score_name})", t, t.aucs[1]))
    else:
        row.update(_auc_test_fields("n/a (no scores)"))
    return row


_NO_3CLASS_TEST = {"test_3class": "n/a (no 3-class labels)", "b_3class": None, "c_3class": None, "p_3class": None}


def _auc_test_fields(test: str, t: DeLongTest | None = None, auc_other: float | None = None) -> dict[str, Any]:
    """The ``auc_*`` fields of a ``tests.csv`` row: ``test`` names DeLong's test ``t`` of the model's AUC against the
    other's (``auc_other``), or says why there is none (``t`` is ``None``: every other field empty)."""
    if t is None:
        return dict(auc_test=test, auc_model=None, auc_other=None, auc_difference=None, auc_z=None, auc_p=None)
    return dict(
        auc_test=test, auc_model=t.aucs[0], auc_other=auc_other, auc_difference=t.estimate, auc_z=t.z, auc_p=t.p_value
    )


def _mcnemar_fields(m_correct: np.ndarray, o_correct: np.ndarray, view: str) -> dict[str, Any]:
    """The exact McNemar test of two raters' (N,) correctness, as the ``*_<view>`` fields of a ``tests.csv`` row."""
    res = mcnemar_exact(m_correct, o_correct)
    return {
        f"test_{view}": "exact McNemar",
        f"b_{view}": res.b,
        f"c_{view}": res.c,
        f"p_{view}": res.p_value,
        f"accuracy_difference_{view}": float(m_correct.mean() - o_correct.mean()),
    }


def _sign_flip_fields(m_correct: np.ndarray, readers_correct: Sequence[np.ndarray], view: str) -> dict[str, Any]:
    """The exact paired sign-flip test of the model's (N,) correctness against the mean of R readers' (N,)
    correctness, as the ``*_<view>`` fields of a ``tests.csv`` row.

    The per-case difference is scaled by R to integers; with R = 1 the test is the exact McNemar test.
    """
    n_readers = len(readers_correct)
    d = n_readers * m_correct.astype(int) - np.sum(readers_correct, axis=0)
    return {
        f"test_{view}": "exact paired sign-flip test",
        f"b_{view}": None,
        f"c_{view}": None,
        f"p_{view}": sign_flip_test(d),
        f"accuracy_difference_{view}": float(d.mean() / n_readers),
    }


def _average_reader_test(
    model: Rater, readers: Sequence[Rater], y: np.ndarray, truth3: np.ndarray | None, m_correct3: np.ndarray | None
) -> dict[str, Any]:
    """The model against the average reader: exact sign-flip tests on correctness, a DeLong contrast on the AUCs."""
    both_classes = 0 < y.sum() < y.size
    R = len(readers)
    row: dict[str, Any] = {
        "comparison": "model vs average reader", "other": "Reader average", "other_type": "reader average"
    }
    row.update(_sign_flip_fields(model.call == y, [r.call == y for r in readers], "2class"))
    if m_correct3 is not None and all(r.labels3 is not None for r in readers):
        row.update(_sign_flip_fields(m_correct3, [r.labels3 == truth3 for r in readers], "3class"))
    else:
        row.update(_NO_3CLASS_TEST)
    if model.score is not None and all(r.score is not None for r in readers) and both_classes:
        scores = np.stack([model.score, *[r.score for r in readers]])  # type: ignore[misc]
        t = delong_contrast_test(y.astype(int), scores, np.r_[1.0, np.full(R, -1.0 / R)])
        row.update(_auc_test_fields("DeLong contrast (model AUC - mean reader AUC)", t, float(np.mean(t.aucs[1:]))))
    else:
        row.update(_auc_test_fields("n/a (not every reader gave scores)"))
    return row


def reader_agreement(readers: Sequence[Rater]) -> dict[str, Any]:
    """Agreement of the readers: Cohen's kappa and the fraction of cases agreed on for every pair (3-class where both
    gave 3-class labels, and COVID-19 vs non-COVID), Fleiss' kappa over all readers (3-class where every reader gave
    them); ``None`` where undefined.

    Returns:
        ``pairwise`` (one row per pair: the keys of ``agreement.csv``), ``fleiss_kappa_3class`` and
        ``fleiss_kappa_2class``.
    """
    pairs = []
    for i in range(len(readers)):
        for j in range(i + 1, len(readers)):
            a, b = readers[i], readers[j]
            row: dict[str, Any] = {"reader_a": a.name, "reader_b": b.name}
            if a.labels3 is not None and b.labels3 is not None:
                row["cohen_kappa_3class"] = cohen_kappa(a.labels3, b.labels3, CLASS_NAMES)
                row["agreement_3class"] = float(np.mean(a.labels3 == b.labels3))
            else:
                row["cohen_kappa_3class"] = None
                row["agreement_3class"] = None
            row["cohen_kappa_2class"] = cohen_kappa(a.call, b.call, [False, True])
            row["agreement_2class"] = float(np.mean(a.call == b.call))
            pairs.append(row)
    result: dict[str, Any] = {"pairwise": pairs, "fleiss_kappa_3class": None, "fleiss_kappa_2class": None}
    if len(readers) >= 2:
        if all(r.labels3 is not None for r in readers):
            result["fleiss_kappa_3class"] = fleiss_kappa(np.stack([r.labels3 for r in readers], axis=1), CLASS_NAMES)
        result["fleiss_kappa_2class"] = fleiss_kappa(
            np.stack([np.where(r.call, "covid", "noncovid") for r in readers], axis=1), ("noncovid", "covid")
        )
    return result
