"""The conditional-mutual-information score of Jiang et al. 2020: how much the order of a
measure over pairs of models tells about the order of their generalization gaps, conditioned
on sets of hyperparameters; with the entropies and mutual information (in bits) it is built from."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd


def entropy_bits(p: np.ndarray) -> float:
    """Shannon entropy in bits of the probabilities ``p`` (zeros allowed)."""
    p = np.asarray(p, float).ravel()
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def mutual_information_bits(joint_counts: np.ndarray) -> float:
    """I(A; B) in bits from a contingency table of counts (rows: A, columns: B)."""
    joint = np.asarray(joint_counts, float)
    joint = joint / joint.sum()
    return entropy_bits(joint.sum(0)) + entropy_bits(joint.sum(1)) - entropy_bits(joint)


def _ordered_pair_table(mu: np.ndarray, g: np.ndarray, block: int = 512) -> np.ndarray:
    """2 x 2 counts of (1[mu_i > mu_j], 1[g_i > g_j]) over ordered pairs i != j, in row blocks
    so memory stays O(block * n)."""
    table = np.zeros((2, 2), dtype=np.int64)
    for start in range(0, len(mu), block):
        rows = slice(start, start + block)
        vm = mu[rows, None] > mu[None, :]
        vg = g[rows, None] > g[None, :]
        both = vm & vg
        table[1, 1] += both.sum()
        table[1, 0] += (vm & ~vg).sum()
        table[0, 1] += (vg & ~vm).sum()
        table[0, 0] += (~vm & ~vg).sum()
    table[0, 0] -= len(mu)  # the diagonal i == j: neither greater
    return table


def conditional_mutual_information(
    mu: np.ndarray,
    g: np.ndarray,
    models: pd.DataFrame,
    hyperparameters: Sequence[str],
    max_conditioning: int = 2,
) -> tuple[float, tuple[str, ...]]:
    """Jiang et al. CMI score: min over S (|S| <= max_conditioning) of I(V_mu; V_g | S) / H(V_g | S).

    Over ordered pairs (i, j), i != j, of models sharing the values of the hyperparameters in S:
    V_g = 1[g_i > g_j], V_mu = 1[mu_i > mu_j]. Per cell of S the mutual information is in bits;
    cells are weighted by their share of the pairs, and the normalizer is the conditional entropy
    H(V_g | S) with the same weights (as Jiang et al.), so the score lies in [0, 1]: 1 when mu
    orders every such pair as g does. Returns ``(score, S_argmin)``.
    """
    best: float = math.inf
    best_s: tuple[str, ...] = ()
    for size in range(min(max_conditioning, len(hyperparameters)) + 1):
        for s in itertools.combinations(hyperparameters, size):
            cells = models.groupby(list(s), dropna=False).indices.values() if s else [models.index.to_numpy()]
            mi = h = total = 0.0
            for idx in cells:
                if len(idx) < 2:
                    continue
                table = _ordered_pair_table(mu[idx], g[idx])
                pairs = table.sum()
                mi += pairs * mutual_information_bits(table)
                h += pairs * entropy_bits(table.sum(0) / pairs)
                total += pairs
            score = mi / h if h > 0 else math.nan
            if not math.isnan(score) and score < best:
                best, best_s = score, s
    return (best if math.isfinite(best) else math.nan), best_s
