"""Rank correlations on plain arrays: Kendall tau-b (with bootstrap resamples as counts),
Spearman rho, and the percentile bootstrap interval used for every confidence interval of
:mod:`sweeps.analysis`."""

from __future__ import annotations

import math
from typing import overload

import numpy as np
from scipy import stats

#: Largest number of models for which tau-b uses dense n x n pair matrices (memory ~ 24 n^2 bytes).
DENSE_PAIRS_MAX = 2000


def pair_signs(x: np.ndarray) -> np.ndarray:
    """``S[i, j] = sign(x[i] - x[j])`` as int8, shape ``(n, n)``; equal infinities are tied (0),
    where their difference would be NaN (a measure that is infinite for several models, e.g.
    ``1/alpha'^2`` at ``alpha' = 0``, or a mean that overflowed)."""
    x = np.asarray(x, dtype=float)
    above, below = x[:, None] > x[None, :], x[:, None] < x[None, :]
    return above.astype(np.int8) - below.astype(np.int8)


@overload
def kendall_tau_b(x: np.ndarray, y: np.ndarray, counts: None = None) -> float: ...
@overload
def kendall_tau_b(x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray: ...
@overload
def kendall_tau_b(x: np.ndarray, y: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray | float: ...
def kendall_tau_b(x: np.ndarray, y: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray | float:
    """Kendall's tau-b of ``x`` and ``y`` (ties in either variable handled as in Kendall 1945).

    tau_b = sum_{i<j} s_x s_y / sqrt(#pairs untied in x * #pairs untied in y), with
    s = sign of the pairwise difference. ``counts`` (shape ``(B, n)``) evaluates ``B`` resamples
    at once: row b holds how often each point occurs in resample b (a bootstrap), and the result
    has shape ``(B,)``; this equals tau-b of the resampled data, since a point paired with its own
    copy is tied in both variables and drops out of numerator and denominator. NaN where the
    denominator is 0 (a constant variable). Above ``DENSE_PAIRS_MAX`` points the O(n^2) pair
    matrices give way to scipy's O(n log n) algorithm (one call per resample).
    """
    if len(x) > DENSE_PAIRS_MAX:

        def scipy_tau(idx: np.ndarray) -> float:
            return float(stats.kendalltau(np.asarray(x)[idx], np.asarray(y)[idx], variant="b").statistic)

        if counts is None:
            return scipy_tau(np.arange(len(x)))
        return np.array([scipy_tau(np.repeat(np.arange(len(x)), c)) for c in np.atleast_2d(counts).astype(int)])
    sx, sy = pair_signs(x), pair_signs(y)
    agree = (sx * sy).astype(float)
    untied_x = (sx != 0).astype(float)
    untied_y = (sy != 0).astype(float)
    if counts is None:
        num, dx, dy = agree.sum(), untied_x.sum(), untied_y.sum()
    else:
        counts = np.atleast_2d(np.asarray(counts, dtype=float))
        num, dx, dy = (np.einsum("bi,bi->b", counts @ m, counts) for m in (agree, untied_x, untied_y))
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = num / np.sqrt(dx * dy)
    return float(tau) if counts is None else np.where((dx > 0) & (dy > 0), tau, np.nan)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties); NaN for a constant variable or n < 2."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile bootstrap interval at ``level`` (e.g. 0.95), ignoring NaN resamples."""
    samples = np.asarray(samples, float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)
