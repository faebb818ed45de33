"""Interval estimates and tests for rates and differences of rates (pure Python, no SciPy).

- ``wilson``: Wilson score interval for one proportion;
- ``newcombe_diff``: Newcombe's hybrid score interval (his method 10) for p1 - p2 of two
  independent proportions, built from the two Wilson intervals;
- ``two_proportion_ztest``: pooled two-sided z test of p1 == p2;
- ``paired_bootstrap_diff``: percentile bootstrap over requests for the difference when the
  same requests are asked under both conditions (keeps the pairing that Newcombe ignores).

The tests check each against SciPy/statsmodels on known counts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from eval.summary import RateCI

Z95 = 1.959963984540054  # two-sided 95% standard-normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval; (0, 1) when n == 0 (nothing is known)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"count {k} outside 0..{n}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int) -> RateCI:
    lo, hi = wilson(k, n)
    return RateCI(k=k, n=n, rate=(k / n if n else None), ci_low=(lo if n else None), ci_high=(hi if n else None))


def newcombe_diff(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe hybrid score interval for p1 - p2 (independent samples)."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError("both groups need at least one observation")
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, low), min(1.0, high)


def normal_sf(x: float) -> float:
    """P(Z > x) for a standard normal Z."""
    return 0.5 * math.erfc(x / math.sqrt(2))


def two_proportion_ztest(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """Pooled two-sided z test; returns (z, p). Identical degenerate rates give (0, 1)."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError("both groups need at least one observation")
    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (p1 - p2) / se
    return z, 2 * normal_sf(abs(z))


def paired_bootstrap_diff(
    pairs: Mapping[str, tuple[Sequence[int], Sequence[int]]],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile CI for mean(a) - mean(b), resampling *requests* (the cluster) with replacement.

    ``pairs`` maps a request id to (outcomes under condition a, outcomes under condition b),
    each a list of 0/1 (several samples per request are allowed). Returns None when fewer
    than two requests have outcomes in both conditions.
    """
    ids = [r for r, (a, b) in pairs.items() if len(a) and len(b)]
    if len(ids) < 2 or n_boot < 1:
        return None
    sums = [(sum(pairs[r][0]), len(pairs[r][0]), sum(pairs[r][1]), len(pairs[r][1])) for r in ids]
    rng = random.Random(seed)
    m = len(sums)
    diffs = []
    for _ in range(n_boot):
        ka = na = kb = nb = 0
        for _ in range(m):
            s = sums[rng.randrange(m)]
            ka += s[0]
            na += s[1]
            kb += s[2]
            nb += s[3]
        diffs.append(ka / na - kb / nb)
    diffs.sort()
    alpha = (1 - level) / 2
    lo = diffs[max(0, math.floor(alpha * n_boot))]
    hi = diffs[min(n_boot - 1, math.ceil((1 - alpha) * n_boot) - 1)]
    return lo, hi


def ratio_ci(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float | None, float | None, float | None]:
    """(p1 / p2, low, high): Katz log interval for a ratio of two independent proportions.

    A zero count gets the usual 0.5 continuity correction in the interval (the point estimate
    stays k1/n1 / (k2/n2)); with p2 == 0 the ratio is undefined and (None, None, None) comes back."""
    if n1 <= 0 or n2 <= 0 or k2 == 0:
        return None, None, None
    ratio = (k1 / n1) / (k2 / n2)
    a, b = (k1, n1) if k1 > 0 else (0.5, n1 + 0.5)
    c, d = k2, n2
    centre = math.log((a / b) / (c / d))
    se = math.sqrt(max(1 / a - 1 / b + 1 / c - 1 / d, 0.0))
    return ratio, math.exp(centre - z * se), math.exp(centre + z * se)
