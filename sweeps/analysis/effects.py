"""Which hyperparameters lead to flat minima: :func:`hyperparameter_effects` (the granulated
Kendall tau of each hyperparameter's value against each measure) and :func:`complete_subgrid`
(the largest complete factorial sub-grid a greedy search finds, for psi/Psi and CMI on a sweep
where some cells failed)."""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .columns import (
    CONVERGED,
    _hashable,
    _sorted_values,
    config_columns,
    default_measures,
    default_seed_columns,
)
from .granulated import _groups_differing_only_in, granulated_kendall
from .prepared import prepare
from .ranks import kendall_tau_b, percentile_interval


def complete_subgrid(
    df: pd.DataFrame, *, seed_columns: Sequence[str] | None = None
) -> tuple[pd.DataFrame, dict[str, list[Any]]]:
    """The rows of ``df`` on a complete factorial sub-grid of its converged configurations.

    psi/Psi and CMI (:func:`correlations`) need every cell of the grid; a sweep where a few cells
    diverged has none. This drops, one at a time, the hyperparameter value that takes part in the
    most missing cells (ties: the one with the fewest converged models) until no cell is missing.
    Greedy: the result is a complete grid, not always the largest one.

    Returns ``(rows, dropped)``: the rows of ``df`` (any status) whose configuration lies on the
    sub-grid, and ``{column: [dropped values]}``. Seeds (``seed_columns``, default as in
    :func:`correlations`) are not grid axes.
    """
    seeds = default_seed_columns(df) if seed_columns is None else list(seed_columns)
    keys = [c for c in config_columns(df) if c not in seeds and df[c].map(_hashable).nunique(dropna=False) > 1]
    cells = df[keys].map(_hashable) if keys else pd.DataFrame(index=df.index)
    status = df["status"].astype(str) if "status" in df.columns else pd.Series(CONVERGED, index=df.index)
    present = set(cells[status == CONVERGED].itertuples(index=False, name=None))
    kept = {k: _sorted_values(cells[k]) for k in keys}
    dropped: dict[str, list[Any]] = {}
    while keys:
        grid = set(itertools.product(*kept.values()))
        if grid <= present:
            break
        if grid.isdisjoint(present):
            raise ValueError("df: no converged configuration, no complete sub-grid")
        # (axis index, value) -> missing cells / converged cells it takes part in
        misses = Counter((i, c[i]) for c in grid - present for i in range(len(keys)))
        converged = Counter((i, c[i]) for c in grid & present for i in range(len(keys)))
        candidates = [(i, v) for i, k in enumerate(keys) if len(kept[k]) > 1 for v in kept[k]]
        i, v = max(candidates, key=lambda iv: (misses[iv], -converged[iv]))
        k = keys[i]
        kept[k].remove(v)
        dropped.setdefault(k, []).append(v)
    on_grid = np.ones(len(df), bool)
    for k in keys:
        on_grid &= cells[k].isin(kept[k]).to_numpy()
    return df[on_grid], dropped


def hyperparameter_effects(
    df: pd.DataFrame,
    columns: Sequence[str] | None = None,
    hyperparameters: Sequence[str] | None = None,
    *,
    values: Mapping[str, Mapping[Any, float]] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    seed_columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """How each swept hyperparameter moves each measure (and the generalization gap): the
    granulated Kendall tau of the hyperparameter's value against the column.

    For hyperparameter k and column c: the models (converged runs, seeds averaged) are grouped
    by every other grid key, so the models of a group differ only in k; the effect is the mean
    over groups of Kendall tau-b between k's value and c (the psi_k of Jiang et al. 2020 with the
    hyperparameter in place of the measure, and c's raw value in place of the gap: no
    orientation). +1: c grows with k in every group; -1: falls. A group where c or k is constant
    is skipped. The interval is the two-stage bootstrap of :func:`granulated_kendall`. No
    complete grid is needed.

    Args:
        df: results, one row per trial (:func:`sweeps.results`).
        columns: measure or outcome columns (default: the registered measures, ``gen_gap``
            and ``test_acc`` that are columns of ``df``).
        hyperparameters: config columns (default: every one that varies, seeds excluded).
        values: numbers for non-numeric hyperparameter values, e.g.
            ``{"train.batch_size": {"full": 4000}}``; a value that is neither numeric nor mapped
            raises ``ValueError``.
        n_boot, seed, confidence: the bootstrap, as for :func:`correlations`.
        seed_columns: as for :func:`correlations`.

    Returns:
        DataFrame indexed by ``(hyperparameter, column)`` with ``tau``, ``tau_ci_low``,
        ``tau_ci_high``, ``n_groups`` (groups with a defined tau) and ``n_models``.
    """
    target = "gen_gap"
    if columns is None:
        columns = [c for c in default_measures(df) + [target, "test_acc"] if c in df.columns]
    columns = list(dict.fromkeys(columns))
    measures = [c for c in columns if c not in (target, "test_acc")]
    sweep = prepare(
        df, target, measures, hyperparameters, seed_columns=seed_columns, orientation={m: "neither" for m in measures}
    )
    models = sweep.models.rename(columns={"_target_raw": target})
    rng = np.random.default_rng(seed)
    rows = {}
    for k in sweep.hyperparameters:
        numbers = models[k].map(lambda v, k=k: (values or {}).get(k, {}).get(v, v))
        x = pd.to_numeric(numbers, errors="coerce").to_numpy(float)
        if not np.isfinite(x).all():
            bad = models[k][~np.isfinite(x)].iloc[0]
            raise ValueError(
                f"hyperparameters: {k}={bad!r} is not a number; give it one, e.g. values={{{k!r}: {{{bad!r}: ...}}}}"
            )
        for c in columns:
            y = models[c].to_numpy(float)
            have = np.isfinite(y)
            xs, ys, sub = x[have], y[have], models[have].reset_index(drop=True)
            psi, _, boot = granulated_kendall(xs, ys, sub, sweep.keys, [k], n_boot=n_boot, rng=rng)
            with warnings.catch_warnings():  # the groups psi averaged over: those with a defined tau
                warnings.simplefilter("ignore", RuntimeWarning)
                n_groups = sum(
                    np.isfinite(kendall_tau_b(xs[g], ys[g])) for g in _groups_differing_only_in(sub, sweep.keys, k)
                )
            low, high = percentile_interval(boot, confidence) if n_boot else (math.nan, math.nan)
            rows[(k, c)] = {
                "tau": psi[k],
                "tau_ci_low": low,
                "tau_ci_high": high,
                "n_groups": int(n_groups),
                "n_models": int(have.sum()),
            }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["hyperparameter", "column"])
    return table
