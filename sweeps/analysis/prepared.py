"""From the results DataFrame to models: :func:`prepare` validates the frame, drops unusable
runs, orients the measures and the target, averages the seeds of each configuration into one
model and lists the missing cells of the grid, all in one :class:`PreparedSweep`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    measure_orientation,
)

#: Missing grid cells listed (all are counted).
MISSING_LISTED = 1000


@dataclass
class PreparedSweep:
    """The inputs of every statistic, built once by :func:`prepare`.

    Attributes:
        runs: converged runs with a finite target; columns: grid keys, ``_model`` (index into
            ``models``), measures (oriented), ``_target`` (oriented), ``_target_raw``, ``n_test``.
        models: one row per configuration (seed-averaged means of ``runs``), index 0..n-1.
        keys: the config columns that vary across the sweep (seeds excluded); they define a model.
        hyperparameters: the subset of ``keys`` that psi, CMI and sign-error are computed for.
        measures: measure column names, in output order.
        orientation: measure -> ``larger_is`` (``"sharper"``, ``"flatter"``, ``"neither"``).
        target_sign: +1 if a larger target is worse generalization, -1 if better.
        missing_cells: full-grid cells without a model, with the reason (the first
            ``MISSING_LISTED``); ``n_missing`` counts them all.
        n_cells: size of the full grid (product of the numbers of values of ``keys``).
        excluded: status -> number of runs dropped.
    """

    runs: pd.DataFrame
    models: pd.DataFrame
    keys: list[str]
    hyperparameters: list[str]
    measures: list[str]
    orientation: dict[str, str]
    target: str
    target_sign: int
    seed_columns: list[str]
    missing_cells: list[dict[str, Any]]
    n_missing: int
    n_cells: int
    excluded: dict[str, int]
    n_runs_total: int


def prepare(
    df: pd.DataFrame,
    target: str = "gen_gap",
    measures: Sequence[str] | None = None,
    hyperparameters: Sequence[str] | None = None,
    *,
    seed_columns: Sequence[str] | None = None,
    orientation: Mapping[str, str] | None = None,
    target_larger_is: str | None = None,
) -> PreparedSweep:
    """Validate ``df``, drop unusable runs, orient measures and average seeds per configuration.

    See :func:`correlations` for the arguments.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df: expected a pandas DataFrame (e.g. sweeps.results(name)), got {type(df).__name__}")
    if "status" in df.columns and not (df["status"].astype(str) == CONVERGED).any():  # e.g. every trial failed
        statuses = ", ".join(f"{k}={v}" for k, v in df["status"].astype(str).value_counts().sort_index().items())
        raise ValueError(f"df: no converged trial, nothing to analyse ({statuses or 'no finished trial yet'})")
    if target not in df.columns:
        raise KeyError(f"target={target!r} is not a column of df; columns are {sorted(map(str, df.columns))}")
    if target_larger_is is None:
        target_larger_is = "better" if "acc" in target else "worse"
    if target_larger_is not in ("better", "worse"):
        raise ValueError(
            f"target_larger_is={target_larger_is!r}: use 'better' (accuracy) or 'worse' (gap, error, loss)"
        )
    target_sign = 1 if target_larger_is == "worse" else -1

    seeds = default_seed_columns(df) if seed_columns is None else list(seed_columns)
    absent = [c for c in seeds if c not in df.columns]
    if absent:
        raise KeyError(f"seed_columns: {absent} are not columns of df")

    if measures is None:
        measures = [m for m in default_measures(df) if m not in seeds and m != target]
        if not measures:
            raise ValueError(
                "measures: no registered landscape metric (landscape.METRICS) is a column of df; "
                "name the measure columns explicitly, e.g. measures=['hessian_top_eig']"
            )
    measures = list(dict.fromkeys(measures))
    for m in measures:
        if m not in df.columns:
            raise KeyError(f"measures: {m!r} is not a column of df")
        if not pd.api.types.is_numeric_dtype(df[m]):
            raise TypeError(f"measures: column {m!r} is not numeric (dtype {df[m].dtype})")
    if target in measures:
        raise ValueError(f"measures: the target {target!r} cannot also be a measure")

    frame = df.copy()
    config = [c for c in config_columns(frame) if c not in seeds and c not in measures and c != target]
    for c in config:
        frame[c] = frame[c].map(_hashable)
    keys = [c for c in config if frame[c].nunique(dropna=False) > 1]
    if hyperparameters is None:
        hyperparameters = list(keys)
    else:
        hyperparameters = list(hyperparameters)
        for h in hyperparameters:
            if h not in df.columns:
                raise KeyError(f"hyperparameters: {h!r} is not a column of df; config columns are {config}")
            if h in seeds:
                raise ValueError(f"hyperparameters: {h!r} is a seed column; seeds are averaged, not analysed")
            if h not in keys:
                raise ValueError(f"hyperparameters: {h!r} does not vary across the sweep (or is a measure)")

    n_total = len(frame)
    status = frame["status"].astype(str) if "status" in frame.columns else pd.Series(CONVERGED, index=frame.index)
    target_raw = pd.to_numeric(frame[target], errors="coerce").astype(float)
    usable = (status == CONVERGED) & np.isfinite(target_raw)
    excluded = status[~usable].where(status[~usable] != CONVERGED, f"converged, {target} missing")
    excluded_counts = {str(k): int(v) for k, v in excluded.value_counts().items()}

    runs = frame.loc[usable, keys + measures].copy()
    runs[measures] = runs[measures].astype(float)
    orient = {m: measure_orientation(m, orientation) for m in measures}
    for m in measures:
        runs[m] = runs[m] * (-1.0 if orient[m] == "flatter" else 1.0)
    runs["_target_raw"] = target_raw[usable].astype(float)
    runs["_target"] = target_sign * runs["_target_raw"]
    for column in ("test_acc", "n_test"):
        runs[column] = (
            pd.to_numeric(frame.loc[usable, column], errors="coerce").astype(float) if column in frame else np.nan
        )

    value_cols = measures + ["_target", "_target_raw", "test_acc", "n_test"]
    if keys:
        grouped = runs.groupby(keys, dropna=False, sort=True)
        models = grouped[value_cols].mean().reset_index()
        models["n_seeds"] = grouped.size().to_numpy()
        runs["_model"] = grouped.ngroup().to_numpy()
    else:
        models = runs[value_cols].mean().to_frame().T
        models["n_seeds"] = len(runs)
        runs["_model"] = 0
    models = models.reset_index(drop=True)

    values = {k: _sorted_values(frame[k]) for k in keys}
    n_cells = math.prod(len(v) for v in values.values()) if keys else 1
    present = set(models[keys].itertuples(index=False, name=None)) if keys else {()}
    attempted: dict[tuple, str] = {}
    if keys:
        status_of = status.groupby([frame[k] for k in keys], dropna=False)
        attempted = {(cell if isinstance(cell, tuple) else (cell,)): ", ".join(sorted(set(s))) for cell, s in status_of}
    # A random/TPE sweep has a huge nominal grid: list the first MISSING_LISTED cells, count all.
    missing = list(
        itertools.islice(
            (
                {**dict(zip(keys, cell)), "reason": attempted.get(cell, "not run")}
                for cell in itertools.product(*values.values())
                if cell not in present
            ),
            MISSING_LISTED,
        )
    )

    return PreparedSweep(
        runs=runs.reset_index(drop=True),
        models=models,
        keys=keys,
        hyperparameters=hyperparameters,
        measures=measures,
        orientation=orient,
        target=target,
        target_sign=target_sign,
        seed_columns=seeds,
        missing_cells=missing,
        n_missing=n_cells - len(present),
        n_cells=n_cells,
        excluded=excluded_counts,
        n_runs_total=n_total,
    )
