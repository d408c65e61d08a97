"""Tests of covidctnet.evaluation.stats: hand-computed tiny cases, independent computations and published worked
examples."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binomtest, mannwhitneyu, norm

from covidctnet.evaluation.stats import (
    Estimate,
    auc_score,
    bootstrap_auc_ci,
    bootstrap_roc_band,
    cohen_kappa,
    delong_auc_ci,
    delong_contrast_test,
    delong_covariance,
    delong_interval,
    delong_placements,
    delong_test,
    fleiss_kappa,
    mcnemar_exact,
    nan_to_none,
    proportion,
    roc_points,
    sign_flip_test,
    undefined_auc,
    wilson_ci,
)

Z95 = norm.ppf(0.975)


# ----------------------------------------------------------------------------------------------------------------------
# independent reference implementations (plain definitions, O(n^2), no midranks)


def naive_structural_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and DeLong covariance from the pairwise kernel psi(x, y) = 1, 1/2, 0 (DeLong et al. 1988, eq. 2-5)."""
    scores = np.atleast_2d(scores)
    y = np.asarray(y, dtype=bool)
    v10s, v01s, aucs = [], [], []
    for s in scores:
        pos, neg = s[y], s[~y]
        psi = np.array([[1.0 if a > b else 0.5 if a == b else 0.0 for b in neg] for a in pos])
        v10s.append(psi.mean(axis=1))
        v01s.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    v10, v01 = np.array(v10s), np.array(v01s)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.array([[np.sum((a - a.mean()) * (b - b.mean())) / (m - 1) for b in v10] for a in v10])
    s01 = np.array([[np.sum((a - a.mean()) * (b - b.mean())) / (n - 1) for b in v01] for a in v01])
    return np.array(aucs), s10 / m + s01 / n


def random_scores(seed: int, n: int, k: int = 1, ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    latent = y + rng.normal(0.0, 1.0, n)
    scores = np.stack([latent + rng.normal(0.0, 0.7, n) for _ in range(k)])
    if ties:
        scores = np.round(scores * 2) / 2  # heavy ties, as with reader scores on a 1-5 scale
    return y, scores


# ----------------------------------------------------------------------------------------------------------------------
# proportions


def test_wilson_hand_computed():
    # Wilson (1927): centre (p + z²/2n) / (1 + z²/n), half-width z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²)
    k, n = 8, 10
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2))
    assert wilson_ci(k, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    # 0 of n: the upper bound is z² / (n + z²)
    assert wilson_ci(0, 10) == pytest.approx((0.0, Z95**2 / (10 + Z95**2)), abs=1e-12)
    assert wilson_ci(10, 10)[1] == pytest.approx(1.0)


def test_proportion_estimate_and_undefined():
    est = proportion(18, 20)
    assert (est.value, est.k, est.n, est.method) == (0.9, 18, 20, "Wilson score")
    assert est.ci_low < 0.9 < est.ci_high
    empty = proportion(0, 0)
    assert empty.value is None and empty.ci_low is None and empty.to_dict()["n"] == 0
    with pytest.raises(ValueError):
        wilson_ci(3, 2)


def test_estimate_to_dict_has_no_nan_or_inf():
    d = Estimate(float("nan"), float("-inf"), np.float64(0.5), "x", k=np.int64(3), n=4).to_dict()
    assert d["value"] is None and d["ci_low"] is None and d["ci_high"] == 0.5 and isinstance(d["k"], int)


# ----------------------------------------------------------------------------------------------------------------------
# AUC and DeLong: tiny cases by hand


def test_delong_tiny_case_by_hand():
    # positives 0.35, 0.8; negatives 0.1, 0.4. psi rows (pos) = [1, 0], [1, 1]: AUC 3/4.
    # V10 = [0.5, 1] and V01 = [1, 0.5], both with sample variance 0.125; var = 0.125/2 + 0.125/2 = 0.125.
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    aucs, v10, v01 = delong_placements(y, s)
    assert aucs[0] == 0.75
    np.testing.assert_allclose(v10[0], [0.5, 1.0])
    np.testing.assert_allclose(v01[0], [1.0, 0.5])
    aucs, cov = delong_covariance(y, s)
    assert cov[0, 0] == pytest.approx(0.125)
    ci = delong_auc_ci(y, s)
    assert (ci.ci_low, ci.ci_high) == pytest.approx((0.75 - Z95 * math.sqrt(0.125), 1.0))  # clipped at 1


def test_delong_ties_by_hand():
    # positives 1, 2; negatives 1, 2: psi = [[.5, 0], [1, .5]], AUC 1/2; V10 = [.25, .75], V01 = [.75, .25]
    aucs, cov = delong_covariance([1, 0, 1, 0], [1.0, 1.0, 2.0, 2.0])
    assert aucs[0] == 0.5
    assert cov[0, 0] == pytest.approx(0.125 / 2 + 0.125 / 2)


def test_delong_paired_test_by_hand():
    # score b separates the classes perfectly (AUC 1, all placements 1: zero variance and covariance), so
    # var(a - b) = var(a) = 0.125 and z = (0.75 - 1) / sqrt(0.125) = -1/sqrt(2).
    y = [0, 0, 1, 1]
    res = delong_test(y, [0.1, 0.4, 0.35, 0.8], [0.2, 0.1, 0.6, 0.3])
    assert res.aucs == (0.75, 1.0)
    assert res.estimate == pytest.approx(-0.25)
    assert res.z == pytest.approx(-1 / math.sqrt(2))
    assert res.p_value == pytest.approx(2 * norm.cdf(-1 / math.sqrt(2)))


def test_delong_identical_scores_give_p_one():
    y, s = random_scores(3, 30)
    res = delong_test(y, s[0], s[0])
    assert res.estimate == 0.0 and res.z == 0.0 and res.p_value == 1.0


def test_delong_needs_both_classes():
    with pytest.raises(ValueError, match="positive and one negative"):
        delong_covariance([1, 1, 1], [0.1, 0.2, 0.3])


# ----------------------------------------------------------------------------------------------------------------------
# AUC and DeLong: independent computations


@pytest.mark.parametrize("seed, n, ties", [(0, 25, True), (1, 60, False), (2, 41, True)])
def test_auc_equals_mann_whitney_u(seed, n, ties):
    y, s = random_scores(seed, n, ties=ties)
    u = mannwhitneyu(s[0][y == 1], s[0][y == 0], alternative="two-sided").statistic
    assert auc_score(y, s[0]) == pytest.approx(u / (np.sum(y == 1) * np.sum(y == 0)), abs=1e-12)


@pytest.mark.parametrize("seed, n", [(0, 30), (5, 47)])
def test_fast_delong_matches_naive_structural_components(seed, n):
    y, s = random_scores(seed, n, k=3)
    aucs, cov = delong_covariance(y, s)
    naive_aucs, naive_cov = naive_structural_components(y, s)
    np.testing.assert_allclose(aucs, naive_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, naive_cov, atol=1e-12)


def test_delong_variance_agrees_with_large_bootstrap():
    # The bootstrap resamples positives and negatives separately (DeLong's variance conditions on n1, n0).
    y, s = random_scores(11, 160, k=2, ties=False)
    aucs, cov = delong_covariance(y, s)
    rng = np.random.default_rng(12345)
    b = 20000
    yb = y.astype(bool)
    psi = [(a[yb][:, None] > a[~yb][None, :]) + 0.5 * (a[yb][:, None] == a[~yb][None, :]) for a in s]
    n1, n0 = int(yb.sum()), int((~yb).sum())
    w1 = rng.multinomial(n1, np.full(n1, 1 / n1), size=b)
    w0 = rng.multinomial(n0, np.full(n0, 1 / n0), size=b)
    boot = np.stack([np.einsum("bi,ij,bj->b", w1, p, w0) / (n1 * n0) for p in psi])  # (2, B)
    assert np.var(boot[0], ddof=1) == pytest.approx(cov[0, 0], rel=0.1)
    assert np.var(boot[1], ddof=1) == pytest.approx(cov[1, 1], rel=0.1)
    assert np.var(boot[0] - boot[1], ddof=1) == pytest.approx(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], rel=0.1)


def test_delong_contrast_against_naive():
    y, s = random_scores(21, 50, k=3)
    c = np.array([1.0, -0.5, -0.5])
    res = delong_contrast_test(y, s, c)
    aucs, cov = naive_structural_components(y, s)
    z = (c @ aucs) / math.sqrt(c @ cov @ c)
    assert res.z == pytest.approx(z, rel=1e-10)
    assert res.p_value == pytest.approx(2 * norm.sf(abs(z)), rel=1e-10)
    two = delong_contrast_test(y, s[:2], (1.0, -1.0))
    assert two == delong_test(y, s[0], s[1])


def test_hanley_mcneil_1982_rating_example():
    # Hanley & McNeil, Radiology 143:29 (1982), Table 1: 109 CT images rated 1 (definitely normal) to 5 (definitely
    # abnormal); 58 normal: 33, 6, 6, 11, 2 and 51 abnormal: 3, 2, 2, 11, 33. Published: AUC 0.893, SE 0.032 (their
    # exponential approximation; DeLong's nonparametric SE is close to it, not equal).
    normal, abnormal = [33, 6, 6, 11, 2], [3, 2, 2, 11, 33]
    ratings = np.r_[np.repeat(np.arange(1, 6), normal), np.repeat(np.arange(1, 6), abnormal)]
    y = np.r_[np.zeros(58, int), np.ones(51, int)]
    est = delong_auc_ci(y, ratings)
    assert round(est.value, 3) == 0.893
    se = (est.ci_high - est.ci_low) / (2 * Z95)
    assert se == pytest.approx(0.032, abs=0.003)


# Placements of pROC's aSAH data (113 patients, 41 poor outcome) for s100b and wfns, as published in pROC's test
# suite (xrobin/pROC, tests/testthat/helper-deLongPlacementsCpp-expected.R), scaled to integers: X (positives) * 144,
# Y (negatives) * 82. Their docs print roc.test(roc(outcome, s100b), roc(outcome, wfns)): "Z = -2.209,
# p-value = 0.02718", AUCs 0.7313686 and 0.8236789, and ci.auc for s100b "95% CI: 0.6301-0.8326 (DeLong)".
ASAH_X = {
    "s100b": [81, 63, 103, 78, 130, 144, 140, 26, 123, 50, 26, 128, 126, 139, 144, 118, 144, 144, 144, 26, 144, 120, 0,
              50, 116, 144, 118, 144, 38, 118, 81, 63, 74, 116, 144, 88, 144, 121, 144, 144, 130],
    "wfns": [117, 94, 128, 140, 140, 140, 140, 94, 140, 94, 37, 94, 140, 128, 128, 94, 140, 140, 140, 94, 140, 94, 140,
             94, 128, 140, 128, 128, 37, 128, 128, 94, 94, 140, 140, 94, 94, 140, 140, 140, 140],
}  # fmt: skip
ASAH_Y = {
    "s100b": [58, 55, 66, 80, 28, 52, 66, 66, 80, 73, 80, 70, 63, 77, 52, 77, 63, 58, 52, 80, 53, 55, 36, 70, 24, 28,
              53, 77, 32, 28, 63, 73, 70, 73, 80, 58, 66, 55, 54, 80, 80, 70, 80, 70, 73, 53, 70, 73, 37, 63, 42, 77,
              66, 39, 77, 80, 48, 34, 66, 54, 73, 55, 66, 77, 80, 52, 54, 28, 52, 54, 24, 27],
    "wfns": [80, 80, 80, 80, 18, 80, 66, 66, 80, 66, 66, 80, 80, 80, 66, 80, 66, 80, 80, 53, 44, 80, 44, 80, 18, 18, 80,
             80, 66, 44, 80, 80, 66, 66, 80, 66, 80, 66, 66, 80, 80, 80, 80, 66, 80, 66, 80, 80, 53, 66, 44, 66, 80,
             44, 80, 80, 18, 44, 66, 66, 80, 80, 80, 53, 80, 66, 66, 44, 44, 80, 80, 80],
}  # fmt: skip


def _scores_from_placements(x144: list[int], y82: list[int]) -> np.ndarray:
    """Scores that reproduce a marker's case/control ordering from its placements.

    A case's 144 * V10 = 2 * (controls below) + (controls tied); a control whose midrank among controls is r sits at
    2r - 1 on that scale. Controls are ordered by 1 - V01 (their fraction of cases below), so the rebuilt scores give
    the same pairwise comparisons as the original data; pROC's Y is not used to build them, only to check them.
    """
    from scipy.stats import rankdata

    cases = np.asarray(x144, dtype=np.float64)
    controls = 2 * rankdata(-np.asarray(y82, dtype=np.float64)) - 1
    return np.r_[cases, controls]


def test_delong_reproduces_proc_asah_example():
    y = np.r_[np.ones(41, int), np.zeros(72, int)]
    s100b = _scores_from_placements(ASAH_X["s100b"], ASAH_Y["s100b"])
    wfns = _scores_from_placements(ASAH_X["wfns"], ASAH_Y["wfns"])
    aucs, v10, v01 = delong_placements(y, np.stack([s100b, wfns]))
    np.testing.assert_allclose(v10 * 144, [ASAH_X["s100b"], ASAH_X["wfns"]], atol=1e-9)
    np.testing.assert_allclose(v01 * 82, [ASAH_Y["s100b"], ASAH_Y["wfns"]], atol=1e-9)
    np.testing.assert_allclose(aucs, [0.7313686, 0.8236789], atol=5e-8)
    res = delong_test(y, s100b, wfns)
    assert round(res.z, 3) == -2.209
    assert round(res.p_value, 5) == 0.02718
    ci = delong_auc_ci(y, s100b)
    assert (round(ci.ci_low, 4), round(ci.ci_high, 4)) == (0.6301, 0.8326)


# ----------------------------------------------------------------------------------------------------------------------
# bootstrap and ROC points


def test_bootstrap_auc_ci_is_seeded_and_brackets_the_auc():
    y, s = random_scores(7, 80)
    a = bootstrap_auc_ci(y, s[0], n_boot=300, seed=1)
    b = bootstrap_auc_ci(y, s[0], n_boot=300, seed=1)
    c = bootstrap_auc_ci(y, s[0], n_boot=300, seed=2)
    assert a == b
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    assert a.ci_low < a.value < a.ci_high
    assert a.value == pytest.approx(auc_score(y, s[0]))
    assert "bootstrap" in a.method


def test_roc_points_match_sklearn():
    from sklearn.metrics import roc_curve

    y, s = random_scores(8, 70)
    fpr, tpr, thr = roc_points(y, s[0])
    ref_fpr, ref_tpr, _ = roc_curve(y, s[0], drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert thr[0] == np.inf and len(thr) == len(np.unique(s[0])) + 1


def test_bootstrap_roc_band():
    y, s = random_scores(9, 60)
    grid = np.linspace(0, 1, 21)
    low, high = bootstrap_roc_band(y, s[0], grid, n_boot=200, seed=0)
    fpr, tpr, _ = roc_points(y, s[0])
    curve = tpr[np.searchsorted(fpr, grid, side="right") - 1]
    assert low.shape == high.shape == grid.shape
    assert np.all(low <= high + 1e-12)
    assert low[-1] == high[-1] == 1.0
    assert np.mean((low <= curve + 1e-12) & (curve <= high + 1e-12)) > 0.9  # the band mostly holds the curve


# ----------------------------------------------------------------------------------------------------------------------
# McNemar and the sign-flip test


def test_mcnemar_hand_computed():
    # b = 4 (only a right), c = 0: two-sided exact p = 2 * 0.5^4 = 0.125
    res = mcnemar_exact([1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 0])
    assert (res.b, res.c, res.p_value) == (4, 0, 0.125)
    assert mcnemar_exact([1, 0, 1], [0, 1, 1]).p_value == 1.0  # b = c


def test_mcnemar_matches_scipy_binomtest():
    rng = np.random.default_rng(4)
    a, b = rng.random(60) < 0.8, rng.random(60) < 0.6
    res = mcnemar_exact(a, b)
    n_b, n_c = int(np.sum(a & ~b)), int(np.sum(~a & b))
    assert (res.b, res.c) == (n_b, n_c)
    assert res.p_value == pytest.approx(binomtest(n_b, n_b + n_c, 0.5).pvalue, abs=1e-12)


@pytest.mark.parametrize(
    "d, expected",
    [([1, 1, 1], 2 / 8), ([2, 1], 2 / 4), ([0, 0], 1.0), ([1, -1, 0], 1.0), ([3, -1, 1, 1], 8 / 16)],
)
def test_sign_flip_hand_computed(d, expected):
    # [3, -1, 1, 1]: observed sum 4. With +3 the three ±1 add 3, 1, -1, -3 in 1, 3, 3, 1 of the 8 patterns, so
    # S = 6, 4, 2, 0; |S| >= 4 in 1 + 3 patterns, and as many with -3: p = 8/16.
    assert sign_flip_test(d) == pytest.approx(expected)


def test_sign_flip_matches_brute_force_and_mcnemar():
    rng = np.random.default_rng(5)
    for _ in range(5):
        d = rng.integers(-4, 5, size=11)
        signs = np.array(list(itertools.product([-1, 1], repeat=d.size)))
        brute = float(np.mean(np.abs(signs @ np.abs(d)) >= abs(d.sum())))
        assert sign_flip_test(d) == pytest.approx(brute, abs=1e-12)
    a, b = rng.random(40) < 0.8, rng.random(40) < 0.6
    assert sign_flip_test(a.astype(int) - b.astype(int)) == pytest.approx(mcnemar_exact(a, b).p_value, abs=1e-12)
    with pytest.raises(ValueError, match="integer"):
        sign_flip_test([0.5, 1.0])


# ----------------------------------------------------------------------------------------------------------------------
# agreement


def test_cohen_kappa_hand_computed():
    # p_o = 3/4; p_e = (2/4)(1/4) + (2/4)(3/4) = 1/2; kappa = (3/4 - 1/2) / (1 - 1/2) = 1/2
    assert cohen_kappa([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(0.5)
    assert cohen_kappa(["a", "b", "c"], ["a", "b", "c"]) == pytest.approx(1.0)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # 0 / 0


def test_fleiss_kappa_hand_computed():
    # 4 cases, 3 raters, 2 classes: per-case agreement P_i = 1, 1, 1/3, 1/3 -> P = 2/3; class shares 1/2, 1/2 ->
    # P_e = 1/2; kappa = (2/3 - 1/2) / (1/2) = 1/3
    ratings = [["a", "a", "a"], ["b", "b", "b"], ["a", "a", "b"], ["a", "b", "b"]]
    assert fleiss_kappa(ratings) == pytest.approx(1 / 3)
    assert fleiss_kappa([["a", "a"], ["a", "a"]]) is None


def test_fleiss_kappa_matches_formula_on_random_ratings():
    rng = np.random.default_rng(6)
    cats = ["control", "covid", "cap"]
    ratings = rng.choice(cats, size=(30, 4), p=[0.5, 0.3, 0.2])
    counts = np.array([[np.sum(row == c) for c in cats] for row in ratings], dtype=float)
    r = ratings.shape[1]
    p_i = (np.sum(counts**2, axis=1) - r) / (r * (r - 1))
    p_j = counts.sum(axis=0) / counts.sum()
    expected = (p_i.mean() - np.sum(p_j**2)) / (1 - np.sum(p_j**2))
    assert fleiss_kappa(ratings, cats) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# the shared pieces of evaluate and reader-study


def test_delong_interval_is_normal_and_clipped():
    est = delong_interval(0.9, 0.0036, 0.95, "DeLong (mean)", 12)
    assert est.ci_low == pytest.approx(0.9 - Z95 * 0.06) and est.ci_high == 1.0  # 0.9 + 0.118 clipped
    assert (est.method, est.n, est.level) == ("DeLong (mean)", 12, 0.95)
    low = delong_interval(0.05, 0.01, 0.9, "m", 5)
    assert low.ci_low == 0.0 and low.ci_high == pytest.approx(0.05 + norm.ppf(0.95) * 0.1)
    # a negative rounding residue of the variance is a zero-width interval, not a math error
    assert delong_interval(0.7, -1e-18, 0.95, "m", 5).ci_low == 0.7


def test_delong_auc_ci_is_the_interval_of_its_covariance():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 40)
    s = rng.normal(size=40) + y
    aucs, cov = delong_covariance(y, s)
    assert delong_auc_ci(y, s, 0.9) == delong_interval(float(aucs[0]), float(cov[0, 0]), 0.9, "DeLong", 40)


def test_undefined_auc_and_nan_to_none():
    est = undefined_auc(7, 0.9)
    assert (est.value, est.ci_low, est.ci_high, est.n, est.level) == (None, None, None, 7, 0.9)
    assert "only one class" in est.method
    assert nan_to_none(math.nan) is None and nan_to_none(None) is None
    value = nan_to_none(np.float32(0.25))
    assert value == 0.25 and type(value) is float
