"""Statistics checked against independent implementations (statsmodels, SciPy) on known counts."""

from __future__ import annotations

import math

import pytest
from scipy.stats import norm
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint, proportions_ztest

from eval.stats import newcombe_diff, normal_sf, paired_bootstrap_diff, rate, two_proportion_ztest, wilson

COUNTS = [(0, 10), (1, 10), (5, 10), (10, 10), (37, 100), (63, 100), (4, 100), (119, 400), (3, 7)]


@pytest.mark.parametrize(("k", "n"), COUNTS)
def test_wilson_matches_statsmodels(k, n):
    lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
    assert wilson(k, n) == pytest.approx((lo, hi), abs=1e-9)


@pytest.mark.parametrize(("a", "b"), [((63, 100), (4, 100)), ((19, 100), (0, 100)), ((5, 10), (5, 12)),
                                      ((0, 20), (0, 20)), ((119, 400), (74, 400)), ((30, 30), (2, 40))])
def test_newcombe_matches_statsmodels(a, b):
    lo, hi = confint_proportions_2indep(a[0], a[1], b[0], b[1], method="newcomb", compare="diff", alpha=0.05)
    assert newcombe_diff(*a, *b) == pytest.approx((lo, hi), abs=1e-9)


@pytest.mark.parametrize(("a", "b"), [((63, 100), (4, 100)), ((45, 200), (30, 200)), ((5, 10), (5, 12)),
                                      ((1, 50), (3, 40))])
def test_ztest_matches_statsmodels(a, b):
    z_ref, p_ref = proportions_ztest([a[0], b[0]], [a[1], b[1]])
    z, p = two_proportion_ztest(*a, *b)
    assert z == pytest.approx(z_ref, rel=1e-9)
    assert p == pytest.approx(p_ref, rel=1e-9)


def test_ztest_degenerate_and_normal_sf():
    assert two_proportion_ztest(0, 10, 0, 12) == (0.0, 1.0)
    for x in (-2.0, 0.0, 1.0, 1.96, 3.5):
        assert normal_sf(x) == pytest.approx(norm.sf(x), rel=1e-12)


def test_rate_record():
    r = rate(37, 100)
    assert (r.k, r.n, r.rate) == (37, 100, 0.37)
    assert (r.ci_low, r.ci_high) == pytest.approx(proportion_confint(37, 100, method="wilson"))
    empty = rate(0, 0)
    assert empty.rate is None and empty.ci_low is None


def test_paired_bootstrap():
    # every request complies in training and refuses unmonitored: the gap is exactly 1 in every resample
    pairs = {f"r{i}": ([1], [0]) for i in range(20)}
    assert paired_bootstrap_diff(pairs, n_boot=200) == (1.0, 1.0)
    # a mixed set: the interval contains the point estimate and is deterministic for a seed
    mixed = {f"r{i}": ([int(i % 3 == 0)], [int(i % 5 == 0)]) for i in range(60)}
    point = sum(i % 3 == 0 for i in range(60)) / 60 - sum(i % 5 == 0 for i in range(60)) / 60
    lo, hi = paired_bootstrap_diff(mixed, n_boot=2000, seed=1)
    assert lo < point < hi
    assert (lo, hi) == paired_bootstrap_diff(mixed, n_boot=2000, seed=1)
    # its width is comparable to the normal approximation of the paired difference's standard error
    d = [a[0] - b[0] for a, b in mixed.values()]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert paired_bootstrap_diff({"only": ([1], [0])}) is None
