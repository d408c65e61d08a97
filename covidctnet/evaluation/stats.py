"""Statistics for evaluation and reader studies: confidence intervals, DeLong's AUC test, McNemar, kappas.

What libraries already do well is used as is: Wilson intervals and exact McNemar from statsmodels, Cohen's kappa from
scikit-learn, Fleiss' kappa from statsmodels. DeLong's method for the variance and covariance of correlated AUCs
(DeLong, DeLong & Clarke-Pearson, Biometrics 44:837, 1988) has no maintained Python package, so it is written here in
the fast midrank form of Sun & Xu (IEEE Signal Process. Lett. 21:1389, 2014): O(n log n) per score vector instead of the
O(n1 n0) pairwise kernel.

Conventions: ``y_true`` is a 1-D array of 0/1 (1 = positive, i.e. COVID-19), scores are "higher = more positive", and
ties count one half (the Mann-Whitney convention), so the AUC equals ``U / (n1 n0)``. Every random draw comes from a
``numpy.random.default_rng(seed)`` made inside the function; nothing touches global random state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss_kappa
from statsmodels.stats.proportion import proportion_confint

from covidctnet.core.files import to_jsonable

__all__ = [
    "WeightedAuc",
    "Estimate",
    "DeLongTest",
    "McNemarResult",
    "wilson_ci",
    "proportion",
    "auc_score",
    "delong_placements",
    "delong_covariance",
    "delong_auc_ci",
    "delong_interval",
    "undefined_auc",
    "nan_to_none",
    "delong_test",
    "delong_contrast_test",
    "bootstrap_ci",
    "bootstrap_auc_ci",
    "roc_points",
    "bootstrap_roc_band",
    "mcnemar_exact",
    "sign_flip_test",
    "cohen_kappa",
    "fleiss_kappa",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval.

    Attributes:
        value: the estimate, or ``None`` when undefined (e.g. sensitivity with no positive case).
        ci_low, ci_high: interval bounds (same scale as ``value``), or ``None``.
        method: how the interval was computed, written out for the report (e.g. ``"Wilson score"``).
        k, n: numerator and denominator for proportions (``None`` otherwise).
        level: confidence level of the interval (0.95 for 95%).
    """

    value: float | None
    ci_low: float | None
    ci_high: float | None
    method: str
    k: int | None = None
    n: int | None = None
    level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``None`` stays ``None``, numpy scalars become Python numbers)."""
        return {key: to_jsonable(val) for key, val in asdict(self).items()}


@dataclass(frozen=True)
class DeLongTest:
    """Result of DeLong's test of a linear contrast of correlated AUCs (two-sided, normal approximation).

    Attributes:
        aucs: the AUCs entering the contrast, in input order.
        estimate: the contrast ``c @ aucs`` (for two curves: ``auc_a - auc_b``).
        se: its standard error from the DeLong covariance.
        z: ``estimate / se`` (``±inf`` when ``se`` is 0 and the estimate is not; 0 when both are 0).
        p_value: two-sided p-value, ``2 * (1 - Phi(|z|))``.
    """

    aucs: tuple[float, ...]
    estimate: float
    se: float
    z: float
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return {key: to_jsonable(val) for key, val in asdict(self).items()}


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test of paired binary outcomes (e.g. correct / wrong of two raters on the same cases).

    Attributes:
        b: cases where only the first rater is correct.
        c: cases where only the second rater is correct.
        p_value: exact two-sided p-value (binomial, p = 0.5, on the ``b + c`` discordant pairs).
    """

    b: int
    c: int
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return {key: to_jsonable(val) for key, val in asdict(self).items()}


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), not {level!r}")
    return float(norm.ppf(0.5 + level / 2.0))


# ----------------------------------------------------------------------------------------------------------------------
# proportions


def wilson_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (statsmodels ``proportion_confint``).

    Args:
        k: number of successes, ``0 <= k <= n``.
        n: number of trials, ``n > 0``.
        level: confidence level (0.95 for a 95% interval).

    Returns:
        ``(low, high)`` in [0, 1].
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, not k={k}, n={n}")
    low, high = proportion_confint(int(k), int(n), alpha=1.0 - level, method="wilson")
    return float(low), float(high)


def proportion(k: int, n: int, level: float = 0.95) -> Estimate:
    """``k / n`` with its Wilson interval; an undefined estimate (all ``None``) when ``n == 0``."""
    if n == 0:
        return Estimate(None, None, None, "Wilson score", k=int(k), n=0, level=level)
    low, high = wilson_ci(k, n, level)
    return Estimate(k / n, low, high, "Wilson score", k=int(k), n=int(n), level=level)


# ----------------------------------------------------------------------------------------------------------------------
# AUC and DeLong


def _check_binary(y_true: np.ndarray, n_scores: int) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1 or y.shape[0] != n_scores:
        raise ValueError(f"y_true must be 1-D with one entry per score ({n_scores}), not shape {y.shape}")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"y_true must hold only 0/1, found {sorted(values)}")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("the AUC needs at least one positive and one negative case")
    return y


def delong_placements(
    y_true: Sequence[int] | np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong's structural components ("placements") by the midrank method of Sun & Xu (2014).

    For positive case ``i`` the placement is ``V10_i = mean_j psi(x_i, y_j)`` over negatives ``j``; for negative ``j``
    it is ``V01_j = mean_i psi(x_i, y_j)`` over positives, with ``psi = 1`` (x > y), ``1/2`` (tie), ``0`` (x < y).
    Both follow from midranks: ``V10_i = (R_i - R^X_i) / n0`` and ``V01_j = 1 - (R_j - R^Y_j) / n1``, where ``R`` is
    the midrank among all cases and ``R^X`` / ``R^Y`` among the positives / negatives only.

    Args:
        y_true: (N,) 0/1 truth, at least one of each.
        scores: (N,) or (K, N) scores, higher = more positive.

    Returns:
        ``(aucs (K,), v10 (K, n1), v01 (K, n0))``, positives and negatives in input order.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2:
        raise ValueError(f"scores must be (N,) or (K, N), not shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    y = _check_binary(np.asarray(y_true), s.shape[1])
    pos, neg = s[:, y], s[:, ~y]
    n1, n0 = pos.shape[1], neg.shape[1]
    r_all = rankdata(s, axis=1)  # "average" method = midranks
    r_pos = rankdata(pos, axis=1)
    r_neg = rankdata(neg, axis=1)
    v10 = (r_all[:, y] - r_pos) / n0
    v01 = 1.0 - (r_all[:, ~y] - r_neg) / n1
    aucs = v10.mean(axis=1)
    return aucs, v10, v01


def auc_score(y_true: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (ties count 1/2), equal to the Mann-Whitney ``U / (n1 n0)``."""
    return float(delong_placements(y_true, np.asarray(score, dtype=np.float64))[0][0])


def delong_covariance(y_true: Sequence[int] | np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of K score vectors on the same cases and DeLong's estimate of their covariance.

    ``S = S10 / n1 + S01 / n0`` with ``S10``, ``S01`` the sample covariances (ddof = 1) of the placements
    (DeLong et al. 1988, eq. 4-5).

    Args:
        y_true: (N,) 0/1 truth.
        scores: (N,) or (K, N).

    Returns:
        ``(aucs (K,), cov (K, K))``.
    """
    aucs, v10, v01 = delong_placements(y_true, scores)
    n1, n0 = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10, ddof=1)) if n1 > 1 else np.zeros((v10.shape[0],) * 2)
    s01 = np.atleast_2d(np.cov(v01, ddof=1)) if n0 > 1 else np.zeros((v01.shape[0],) * 2)
    return aucs, s10 / n1 + s01 / n0


def delong_auc_ci(
    y_true: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray, level: float = 0.95
) -> Estimate:
    """AUC with the DeLong interval ``AUC ± z * sqrt(var)``, clipped to [0, 1] (as pROC's ``ci.auc``)."""
    aucs, cov = delong_covariance(y_true, np.asarray(score, dtype=np.float64))
    return delong_interval(float(aucs[0]), float(cov[0, 0]), level, "DeLong", n=int(np.asarray(y_true).shape[0]))


def delong_interval(auc: float, variance: float, level: float, method: str, n: int) -> Estimate:
    """An AUC (or a mean of AUCs) with the normal interval ``auc ± z * sqrt(variance)``, clipped to [0, 1].

    Args:
        auc: the estimate.
        variance: its DeLong variance (a negative rounding residue counts as 0).
        level: confidence level.
        method: the interval's description for the report.
        n: number of cases.
    """
    half = _z(level) * math.sqrt(max(variance, 0.0))
    return Estimate(auc, max(0.0, auc - half), min(1.0, auc + half), method, n=n, level=level)


def undefined_auc(n: int, level: float) -> Estimate:
    """The AUC estimate of ``n`` cases that hold only one class: no value, no interval, and the reason as method."""
    return Estimate(None, None, None, "undefined: only one class present", n=n, level=level)


def nan_to_none(x: float | None) -> float | None:
    """``x`` as a Python float, ``None`` for ``None`` or NaN (undefined estimates and interval bounds)."""
    return None if x is None or math.isnan(float(x)) else float(x)


def delong_contrast_test(
    y_true: Sequence[int] | np.ndarray, scores: np.ndarray, contrast: Sequence[float] | np.ndarray
) -> DeLongTest:
    """DeLong's test that the contrast ``c @ aucs`` of correlated AUCs is 0 (two-sided).

    With ``c = (1, -1)`` this is the usual paired comparison of two ROC curves; with ``c = (1, -1/R, ..., -1/R)`` it
    compares one curve with the mean AUC of R others (e.g. the model against the average reader).

    Args:
        y_true: (N,) 0/1 truth.
        scores: (K, N) scores of the K raters on the same N cases.
        contrast: (K,) weights.
    """
    c = np.asarray(contrast, dtype=np.float64)
    aucs, cov = delong_covariance(y_true, scores)
    if c.shape != aucs.shape:
        raise ValueError(f"contrast must have {aucs.shape[0]} weights, not {c.shape}")
    estimate = float(c @ aucs)
    var = float(c @ cov @ c)
    se = math.sqrt(max(var, 0.0))
    if se > 0.0:
        z = estimate / se
    elif abs(estimate) < 1e-15:
        z = 0.0
    else:
        # Zero variance with a non-zero difference (e.g. a perfect rater against constant scores): the normal
        # approximation degenerates; report it as infinitely significant and say so in the log.
        logger.warning("DeLong: zero variance with AUC difference %.4g; p-value set to 0", estimate)
        z = math.copysign(math.inf, estimate)
    p = float(2.0 * norm.sf(abs(z)))
    return DeLongTest(tuple(float(a) for a in aucs), estimate, se, float(z), p)


def delong_test(
    y_true: Sequence[int] | np.ndarray, score_a: Sequence[float] | np.ndarray, score_b: Sequence[float] | np.ndarray
) -> DeLongTest:
    """DeLong's paired test of two correlated AUCs on the same cases: H0 ``AUC_a = AUC_b`` (two-sided)."""
    scores = np.vstack([np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)])
    return delong_contrast_test(y_true, scores, (1.0, -1.0))


# ----------------------------------------------------------------------------------------------------------------------
# bootstrap


def _resample_indices(n: int, strata: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    if strata is None:
        return rng.integers(0, n, size=n)
    parts = []
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        parts.append(members[rng.integers(0, members.size, size=members.size)])
    return np.concatenate(parts)


def bootstrap_ci(
    statistic: Callable[[np.ndarray], Sequence[float] | float],
    n: int,
    *,
    strata: Sequence[Any] | np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of one or several statistics computed from resampled case indices.

    Args:
        statistic: maps an index array (n,) to a float or a (k,) vector; NaN marks a replicate where a statistic
            is undefined (it is left out of that statistic's percentiles).
        n: number of cases.
        strata: optional (n,) group of each case (e.g. the true class); cases are then resampled within each group,
            so every replicate keeps the group sizes (pROC's "stratified" bootstrap).
        n_boot: number of replicates.
        seed: seed of the ``numpy.random.default_rng`` used for the draws.
        level: confidence level.

    Returns:
        ``(low (k,), high (k,))``; NaN where fewer than 2 replicates were defined.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, not {n_boot}")
    rng = np.random.default_rng(seed)
    strata_arr = None if strata is None else np.asarray(strata)
    reps = np.array(
        [
            np.atleast_1d(np.asarray(statistic(_resample_indices(n, strata_arr, rng)), dtype=np.float64))
            for _ in range(n_boot)
        ]
    )
    alpha = 1.0 - level
    low = np.full(reps.shape[1], np.nan)
    high = np.full(reps.shape[1], np.nan)
    for j in range(reps.shape[1]):
        col = reps[:, j][~np.isnan(reps[:, j])]
        if col.size >= 2:
            low[j], high[j] = np.quantile(col, [alpha / 2.0, 1.0 - alpha / 2.0])
    return low, high


def _fast_auc(y: np.ndarray, s: np.ndarray) -> float:
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


class WeightedAuc:
    """AUC of a resample given as case multiplicities ``w`` (n,), e.g. ``np.bincount(idx, minlength=n)``.

    A bootstrap resample only repeats original cases, so its AUC is ``w1 @ psi @ w0 / (sum w1 * sum w0)`` with the
    pairwise kernel ``psi`` of the original sample (1, 1/2, 0). Precomputing ``psi`` once makes each replicate a
    matrix-vector product instead of a re-ranking; above ``max_pairs`` pairs it falls back to ranking the resample.
    """

    def __init__(self, y: np.ndarray, s: np.ndarray, max_pairs: int = 4_000_000) -> None:
        self.y = np.asarray(y, dtype=bool)
        self.s = np.asarray(s, dtype=np.float64)
        n1, n0 = int(self.y.sum()), int((~self.y).sum())
        self.psi = None
        if 0 < n1 * n0 <= max_pairs:
            pos, neg = self.s[self.y][:, None], self.s[~self.y][None, :]
            self.psi = (pos > neg) + 0.5 * (pos == neg)

    def __call__(self, w: np.ndarray) -> float:
        w1, w0 = w[self.y], w[~self.y]
        total1, total0 = w1.sum(), w0.sum()
        if total1 == 0 or total0 == 0:
            return math.nan
        if self.psi is None:
            idx = np.repeat(np.arange(w.size), w.astype(np.int64))
            return _fast_auc(self.y[idx], self.s[idx])
        return float(w1 @ self.psi @ w0 / (total1 * total0))


def bootstrap_auc_ci(
    y_true: Sequence[int] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """AUC with a stratified percentile bootstrap interval (positives and negatives resampled separately)."""
    s = np.asarray(score, dtype=np.float64)
    y = _check_binary(np.asarray(y_true), s.shape[0])
    auc_of = WeightedAuc(y, s)
    low, high = bootstrap_ci(
        lambda idx: auc_of(np.bincount(idx, minlength=y.size)), y.size, strata=y, n_boot=n_boot, seed=seed, level=level
    )
    method = f"stratified bootstrap (percentile, {n_boot} resamples, seed {seed})"
    return Estimate(_fast_auc(y, s), float(low[0]), float(high[0]), method, n=int(y.size), level=level)


def roc_points(
    y_true: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empirical ROC curve: one point per distinct threshold, from (0, 0) to (1, 1).

    Returns:
        ``(fpr, tpr, thresholds)``; point ``i`` calls positive every case with ``score >= thresholds[i]``
        (``thresholds[0] = +inf``).
    """
    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(y_true).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # last index of each run of equal scores: the curve moves diagonally through ties
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[last]
    fp = (last + 1) - tp
    fpr = np.r_[0.0, fp / n0 if n0 else np.zeros(last.size)]
    tpr = np.r_[0.0, tp / n1 if n1 else np.zeros(last.size)]
    return fpr, tpr, np.r_[np.inf, s_sorted[last]]


def bootstrap_roc_band(
    y_true: Sequence[int] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    fpr_grid: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise stratified-bootstrap band of the sensitivity at fixed false-positive rates.

    At each FPR ``f`` of ``fpr_grid`` the curve's sensitivity is the highest TPR reached with FPR <= f.

    Returns:
        ``(tpr_low, tpr_high)``, each shaped like ``fpr_grid``.
    """
    s = np.asarray(score, dtype=np.float64)
    y = _check_binary(np.asarray(y_true), s.shape[0])
    grid = np.asarray(fpr_grid, dtype=np.float64)
    # A resample repeats original cases, so its ROC steps through the original distinct scores with weighted counts:
    # sort once, then each replicate is two weighted cumulative sums.
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1]

    def tpr_at(idx: np.ndarray) -> np.ndarray:
        w = np.bincount(idx, minlength=y.size)[order].astype(np.float64)
        tp = np.cumsum(w * y_sorted)[last]
        fp = np.cumsum(w * ~y_sorted)[last]
        fpr = np.r_[0.0, fp / fp[-1]]
        tpr = np.r_[0.0, tp / tp[-1]]
        return tpr[np.searchsorted(fpr, grid, side="right") - 1]

    return bootstrap_ci(tpr_at, y.size, strata=y, n_boot=n_boot, seed=seed, level=level)


# ----------------------------------------------------------------------------------------------------------------------
# paired tests of correctness


def mcnemar_exact(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray) -> McNemarResult:
    """Exact McNemar test (statsmodels) of two raters' correctness on the same cases.

    Args:
        correct_a, correct_b: (N,) booleans, True where the rater is right.
    """
    a = np.asarray(correct_a, dtype=bool)
    b_ = np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape or a.ndim != 1:
        raise ValueError(f"correct_a and correct_b must be 1-D of equal length, not {a.shape} and {b_.shape}")
    table = np.array([[np.sum(a & b_), np.sum(a & ~b_)], [np.sum(~a & b_), np.sum(~a & ~b_)]])
    result = mcnemar(table, exact=True)
    return McNemarResult(int(table[0, 1]), int(table[1, 0]), float(result.pvalue))


def sign_flip_test(differences: Sequence[int] | np.ndarray) -> float:
    """Exact two-sided paired sign-flip (permutation) test that integer paired differences are centred on 0.

    Under H0 each difference ``d_i`` is equally likely to be ``+|d_i|`` or ``-|d_i|``; the p-value is
    ``P(|sum of signed d| >= |observed sum|)``, computed exactly by convolving the 2^m sign patterns (no sampling).
    With differences in {-1, 0, 1} (one rater against another on correctness) it equals the exact McNemar test. We
    use it to compare the model with the *average* reader: ``d_i = R * model_correct_i - sum_r reader_correct_ir``.

    Args:
        differences: (N,) integers; zeros carry no information and drop out.

    Returns:
        the two-sided p-value in (0, 1].
    """
    d = np.asarray(differences)
    if d.size and not np.all(np.equal(np.mod(d, 1), 0)):
        raise ValueError("sign_flip_test needs integer differences (scale them to a common denominator first)")
    v = np.abs(d.astype(np.int64))
    v = v[v > 0]
    observed = int(abs(int(np.sum(d.astype(np.int64)))))
    total = int(v.sum())
    if total == 0:
        return 1.0
    # probs[k] = P(S = k - total); each step is the average of shifting by +v and -v
    probs = np.zeros(2 * total + 1)
    probs[total] = 1.0
    for step in v:
        shifted = np.zeros_like(probs)
        shifted[step:] += 0.5 * probs[:-step]
        shifted[:-step] += 0.5 * probs[step:]
        probs = shifted
    values = np.arange(-total, total + 1)
    return float(min(1.0, probs[np.abs(values) >= observed].sum()))


# ----------------------------------------------------------------------------------------------------------------------
# agreement


def cohen_kappa(
    labels_a: Sequence[Any], labels_b: Sequence[Any], categories: Sequence[Any] | None = None
) -> float | None:
    """Cohen's kappa of two raters (scikit-learn ``cohen_kappa_score``, unweighted).

    Returns ``None`` when kappa is undefined (both raters give one and the same class to every case: 0 / 0).
    """
    a, b = list(labels_a), list(labels_b)
    expected = _expected_agreement(a, b)
    if expected >= 1.0 - 1e-12:
        return None
    return float(cohen_kappa_score(a, b, labels=None if categories is None else list(categories)))


def _expected_agreement(a: list[Any], b: list[Any]) -> float:
    n = len(a)
    if n == 0:
        return 1.0
    cats = set(a) | set(b)
    return sum((a.count(c) / n) * (b.count(c) / n) for c in cats)


def fleiss_kappa(
    ratings: Sequence[Sequence[Any]] | np.ndarray, categories: Sequence[Any] | None = None
) -> float | None:
    """Fleiss' kappa of R raters on N cases (statsmodels ``fleiss_kappa``).

    Args:
        ratings: (N, R) the class each rater gave each case (any hashable labels).
        categories: all possible classes (classes nobody used still count as categories with zero use).

    Returns:
        kappa, or ``None`` when undefined (every rating is the same class).
    """
    arr = np.asarray(ratings, dtype=object)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"ratings must be (cases, raters) with at least 2 raters, not shape {arr.shape}")
    cats = list(categories) if categories is not None else sorted({str(x) for x in arr.ravel()})
    index = {str(c): i for i, c in enumerate(cats)}
    counts = np.zeros((arr.shape[0], len(cats)), dtype=np.int64)
    for i, row in enumerate(arr):
        for value in row:
            counts[i, index[str(value)]] += 1
    p = counts.sum(axis=0) / counts.sum()
    if float(np.sum(p**2)) >= 1.0 - 1e-12:
        return None
    return float(sm_fleiss_kappa(counts, method="fleiss"))
