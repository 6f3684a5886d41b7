"""The robust sign-error of Dziugaite et al. 2020 ("In search of robust measures of
generalization"): over environments (pairs of configurations differing in one hyperparameter),
how often a measure orders two runs against their generalization gaps, each pair of runs weighted
by how sure the gap ordering is (:func:`hoeffding_weight`)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from .granulated import _groups_differing_only_in
from .prepared import PreparedSweep


def hoeffding_weight(gap_difference: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Dziugaite et al. 2020 weight max(0, 1 - 2 exp(-n dg^2 / 2))^2 of a pair of runs.

    ``gap_difference`` dg is in units of error rate (fraction, not percent), ``n`` is the test-set
    size. The weight is a lower bound on the probability that the observed ordering of the two
    generalization gaps is the true one (Hoeffding).
    """
    dg = np.asarray(gap_difference, float)
    return np.maximum(0.0, 1.0 - 2.0 * np.exp(-np.asarray(n, float) * dg**2 / 2.0)) ** 2


def sign_error_environments(
    prepared: PreparedSweep,
    measure: str,
    *,
    n_test: int | None = None,
    min_weight: float = 0.5,
    weighted: bool = True,
) -> pd.DataFrame:
    """Robust sign-error of one measure per environment (Dziugaite et al. 2020).

    An environment is a pair of configurations that differ in exactly one hyperparameter. Every
    pair of runs (one from each configuration, so seeds are kept apart) contributes the error
    (1 - sign(d mu) sign(d g)) / 2, weighted by :func:`hoeffding_weight` of the raw target
    difference with n = the smaller test-set size of the two runs (column ``n_test``, else the
    argument ``n_test``; with neither, or ``weighted=False``, every pair has weight 1). Pairs with weight <= min_weight
    are dropped (their gap ordering is more likely noise than not). The environment's error is
    the weighted mean; NaN when no pair is left. Returns columns ``hyperparameter``, ``model_a``,
    ``model_b``, ``error``, ``weight`` (sum of the pair weights), ``pairs``.
    """
    runs = prepared.runs.sort_values("_model", kind="stable")
    mu_all, g_all = runs[measure].to_numpy(float), runs["_target"].to_numpy(float)
    n_all = runs["n_test"].to_numpy(float)
    if n_test is not None:
        n_all = np.where(np.isfinite(n_all), n_all, n_test)
    if not weighted:
        n_all = np.full_like(n_all, np.nan)
    bounds = np.searchsorted(runs["_model"].to_numpy(), np.arange(len(prepared.models) + 1))
    rows = []
    for k in prepared.hyperparameters:
        for group in _groups_differing_only_in(prepared.models, prepared.keys, k):
            for a, b in itertools.combinations(group, 2):
                ra, rb = slice(bounds[a], bounds[a + 1]), slice(bounds[b], bounds[b + 1])
                d_mu = mu_all[ra][:, None] - mu_all[rb][None, :]
                d_g = g_all[ra][:, None] - g_all[rb][None, :]
                n = np.minimum(n_all[ra][:, None], n_all[rb][None, :])
                w = np.where(np.isfinite(n), hoeffding_weight(d_g, np.nan_to_num(n)), 1.0)
                w = np.where(np.isfinite(d_mu) & (w > min_weight), w, 0.0)
                err = (1.0 - np.sign(np.nan_to_num(d_mu)) * np.sign(d_g)) / 2.0
                total = w.sum()
                rows.append(
                    (
                        k,
                        int(a),
                        int(b),
                        float((w * err).sum() / total) if total > 0 else math.nan,
                        float(total),
                        int((w > 0).sum()),
                    )
                )
    return pd.DataFrame(rows, columns=["hyperparameter", "model_a", "model_b", "error", "weight", "pairs"])
