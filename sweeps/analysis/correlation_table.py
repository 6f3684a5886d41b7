"""The table of :func:`correlations`, one row per measure: every statistic of the package on
one prepared sweep (tau and Spearman, psi/Psi, CMI, sign-error, bootstrap intervals), and its
cheap tau-only part :func:`tau_table` (the live correlation of a running sweep). An incomplete
grid raises :class:`IncompleteGridError`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .granulated import granulated_kendall
from .mutual_information import conditional_mutual_information
from .prepared import PreparedSweep, prepare
from .ranks import kendall_tau_b, percentile_interval, spearman
from .sign_error import sign_error_environments

CONVENTION = (
    "measures multiplied by sign (+1: larger is sharper, -1: larger is flatter, +1 'neither': as is) "
    "and the target oriented so that larger = worse generalization; positive tau/psi/Psi and a "
    "sign-error below 0.5 mean 'sharper => larger generalization gap'"
)


class IncompleteGridError(ValueError):
    """The sweep is not a complete factorial grid, so psi/Psi and CMI would mean nothing.

    Attributes:
        missing: the missing cells (the first 1000), one ``{hyperparameter: value, ..., "reason": str}`` each.
        n_missing: how many cells are missing.
        n_cells: size of the full grid.
    """

    def __init__(self, missing: list[dict[str, Any]], n_missing: int, n_cells: int):
        self.missing = missing
        self.n_missing = n_missing
        self.n_cells = n_cells
        super().__init__(
            f"incomplete grid: {n_missing} of {n_cells} hyperparameter cells have no usable model, "
            f"so psi/Psi and CMI are undefined. Missing: {format_cells(missing)}. Fix: run the sweep "
            "with a grid sampler (and rerun failed cells), or pass allow_incomplete_grid=True to get "
            "tau, Spearman and sign-error only (psi/Psi/CMI are then NaN)."
        )


def format_cells(cells: Sequence[Mapping[str, Any]], limit: int = 10) -> str:
    """``[{k: v, "reason": r}, ...]`` as ``"(k=v, ...) [r]; ..."``, at most ``limit`` shown."""
    shown = [
        "(" + ", ".join(f"{k}={v}" for k, v in c.items() if k != "reason") + f") [{c.get('reason', '')}]"
        for c in cells[:limit]
    ]
    more = f"; ... and {len(cells) - limit} more" if len(cells) > limit else ""
    return "; ".join(shown) + more


def correlations(
    df: pd.DataFrame,
    target: str = "gen_gap",
    measures: Sequence[str] | None = None,
    hyperparameters: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    seed_columns: Sequence[str] | None = None,
    orientation: Mapping[str, str] | None = None,
    target_larger_is: str | None = None,
    allow_incomplete_grid: bool = False,
    confidence: float = 0.95,
    max_conditioning: int = 2,
    n_test: int | None = None,
    min_weight: float = 0.5,
) -> pd.DataFrame:
    """How well each measure predicts generalization across a sweep; one row per measure.

    Args:
        df: results, one row per trial (:func:`sweeps.results`): dotted config columns
            (``"train.lr"``), measure columns, the target, ``status``, optionally ``test_acc``
            and ``n_test`` (test-set size, for the sign-error weights).
        target: column to predict (default ``"gen_gap"`` = test error - train error).
        measures: measure columns (default: every registered ``landscape.METRICS`` name that
            is a numeric column of ``df``); unregistered columns are allowed.
        hyperparameters: config columns to compute psi and sign-error for (default: every
            dotted config column that varies across the sweep, seeds excluded).
        n_boot: bootstrap resamples for the confidence intervals (0: no intervals).
        seed: seed of the bootstrap's random generator.
        seed_columns: columns that only change the random seed; runs that differ only in them
            are averaged into one model (default: ``"seed"`` and columns named ``"*.seed"``).
        orientation: ``{measure: "sharper" | "flatter" | "neither"}`` overriding the registry
            (unregistered measures default to "neither": taken as is).
        target_larger_is: ``"worse"`` (gap, error, loss) or ``"better"`` (accuracy); default
            "better" if the target's name contains "acc", else "worse".
        allow_incomplete_grid: psi/Psi and CMI need a complete factorial grid over the varying
            config columns. By default an incomplete grid raises :class:`IncompleteGridError`
            naming the missing cells; with True they are NaN, the ``note`` column says why,
            a warning is issued and ``.attrs["missing_cells"]`` lists the cells.
        confidence: level of the percentile bootstrap intervals.
        max_conditioning: largest size of the conditioning sets S of the CMI score.
        n_test: test-set size to use where the ``n_test`` column is absent or NaN.
        min_weight: sign-error pairs with a Hoeffding weight at or below this are dropped.

    Returns:
        DataFrame indexed by measure with columns ``orientation`` (larger_is), ``sign``, ``n``
        (models after seed averaging), ``n_runs``, ``tau``, ``tau_ci_low``, ``tau_ci_high``,
        ``spearman``, ``tau_test_acc``, ``spearman_test_acc``, ``psi[k]`` per hyperparameter,
        ``Psi``, ``Psi_ci_low``, ``Psi_ci_high``, ``cmi``, ``cmi_given`` (the minimizing S),
        ``sign_error_mean``, ``sign_error_max``, ``sign_error_max[k]`` per hyperparameter,
        ``n_environments``, ``note``. ``.attrs`` holds the target, the exclusion counts
        (``excluded``: status -> runs), ``missing_cells``, ``keys``, ``seed_columns`` and the
        orientation ``convention``. Positive tau/psi/Psi and sign-error < 0.5 mean "sharper =>
        larger generalization gap" (see the module docstring).
    """
    if n_boot < 0:
        raise ValueError(f"n_boot={n_boot}: use 0 (no intervals) or a positive number of resamples")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: use a level in (0, 1), e.g. 0.95")
    sweep = prepare(
        df,
        target,
        measures,
        hyperparameters,
        seed_columns=seed_columns,
        orientation=orientation,
        target_larger_is=target_larger_is,
    )
    if sweep.models.empty:
        raise ValueError(f"df: no converged trial with a finite {target!r} (excluded: {sweep.excluded})")
    grid_note = ""
    if sweep.missing_cells:
        if not allow_incomplete_grid:
            raise IncompleteGridError(sweep.missing_cells, sweep.n_missing, sweep.n_cells)
        grid_note = (
            f"incomplete grid ({sweep.n_missing} of {sweep.n_cells} cells missing: "
            f"{format_cells(sweep.missing_cells, 3)}): psi/Psi/CMI undefined"
        )
        warnings.warn(grid_note, stacklevel=2)

    # The Hoeffding weight assumes the target is an error rate (a fraction): not for losses.
    is_rate = bool(sweep.runs["_target_raw"].abs().max() <= 1.0)
    has_n = bool(sweep.runs["n_test"].notna().any() or n_test)
    rng = np.random.default_rng(seed)
    rows = {}
    for m in sweep.measures:
        rows[m] = _measure_row(
            sweep,
            m,
            grid_ok=not grid_note,
            n_boot=n_boot,
            seed=seed,
            rng=rng,
            confidence=confidence,
            max_conditioning=max_conditioning,
            n_test=n_test,
            min_weight=min_weight,
            grid_note=grid_note,
            weighted=is_rate,
        )
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "measure"
    table.attrs.update(
        {
            "target": target,
            "target_larger_is": "worse" if sweep.target_sign > 0 else "better",
            "convention": CONVENTION,
            "n_runs_total": sweep.n_runs_total,
            "n_runs_used": len(sweep.runs),
            "n_models": len(sweep.models),
            "excluded": sweep.excluded,
            "keys": sweep.keys,
            "hyperparameters": sweep.hyperparameters,
            "seed_columns": sweep.seed_columns,
            "grid_complete": not sweep.missing_cells,
            "n_cells": sweep.n_cells,
            "missing_cells": sweep.missing_cells,
            "n_missing_cells": sweep.n_missing,
            "n_boot": n_boot,
            "confidence": confidence,
            "sign_error_weighting": (
                "Hoeffding weight from n_test"
                if has_n and is_rate
                else f"none: {target} is not a fraction in [-1, 1], every pair has weight 1"
                if has_n
                else "none: no n_test column or argument, every pair has weight 1"
            ),
        }
    )
    return table


def tau_with_interval(mu: np.ndarray, g: np.ndarray, *, n_boot: int, seed: int, confidence: float) -> dict[str, float]:
    """``tau``, ``tau_ci_low``, ``tau_ci_high`` of one oriented measure ``mu`` against the
    oriented target ``g`` (models, not runs): Kendall tau-b and its percentile bootstrap interval
    over ``n_boot`` resamples drawn from ``seed`` (the same resamples for every measure of
    equal size, so two tables over the same models agree exactly). NaN below 2 models."""
    if len(mu) < 2:
        return {"tau": math.nan, "tau_ci_low": math.nan, "tau_ci_high": math.nan}
    low = high = math.nan
    if n_boot:
        counts = np.random.default_rng(seed).multinomial(len(mu), np.full(len(mu), 1 / len(mu)), n_boot)
        low, high = percentile_interval(kendall_tau_b(mu, g, counts), confidence)
    return {"tau": kendall_tau_b(mu, g), "tau_ci_low": low, "tau_ci_high": high}


def tau_table(
    df: pd.DataFrame,
    target: str = "gen_gap",
    measures: Sequence[str] | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    **models: Any,
) -> pd.DataFrame:
    """The Kendall tau part of :func:`correlations` alone (its columns ``n``, ``tau``,
    ``tau_ci_low``, ``tau_ci_high``, equal to those of :func:`correlations` with the same
    arguments), for any set of finished trials: no grid needed, and much cheaper (no psi, CMI
    or sign-error). The live correlation of a running sweep (:mod:`sweeps.service.live`) is this table.
    Arguments as for :func:`correlations`; ``models``: how runs become models (``seed_columns``,
    ``orientation``, ``target_larger_is``, see :func:`prepare`). Raises as :func:`prepare`
    does, e.g. ``ValueError`` while no trial has converged."""
    sweep = prepare(df, target, measures, None, **models)
    rows = {}
    for m in sweep.measures:
        have = sweep.models[m].notna().to_numpy() if not sweep.models.empty else np.zeros(0, bool)
        mu, g = sweep.models[m].to_numpy()[have], sweep.models["_target"].to_numpy()[have]
        rows[m] = {"n": int(have.sum()), **tau_with_interval(mu, g, n_boot=n_boot, seed=seed, confidence=confidence)}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["n", "tau", "tau_ci_low", "tau_ci_high"])
    table.index.name = "measure"
    table.attrs.update({"target": target, "n_models": len(sweep.models), "excluded": sweep.excluded})
    return table


def _measure_row(
    sweep: PreparedSweep,
    m: str,
    *,
    grid_ok: bool,
    n_boot: int,
    seed: int,
    rng: np.random.Generator,
    confidence: float,
    max_conditioning: int,
    n_test: int | None,
    min_weight: float,
    grid_note: str,
    weighted: bool,
) -> dict[str, Any]:
    models = sweep.models
    have = models[m].notna().to_numpy()
    sub = models[have].reset_index(drop=True)
    mu, g = sub[m].to_numpy(), sub["_target"].to_numpy()
    notes = [grid_note] if grid_note else []
    row: dict[str, Any] = {
        "orientation": sweep.orientation[m],
        "sign": -1 if sweep.orientation[m] == "flatter" else 1,
        "n": int(have.sum()),
        "n_runs": int(sweep.runs[m].notna().sum()),
        **tau_with_interval(mu, g, n_boot=n_boot, seed=seed, confidence=confidence),
    }
    row["spearman"] = spearman(mu, g)
    acc = sub["test_acc"].to_numpy()
    acc_ok = np.isfinite(acc)
    row["tau_test_acc"] = kendall_tau_b(mu[acc_ok], acc[acc_ok]) if acc_ok.sum() >= 2 else math.nan
    row["spearman_test_acc"] = spearman(mu[acc_ok], acc[acc_ok])

    if not have.all():
        notes.append(f"{m} missing for {int((~have).sum())} models: psi/Psi/CMI undefined")
    if grid_ok and have.all():
        psi, Psi, Psi_boot = granulated_kendall(mu, g, sub, sweep.keys, sweep.hyperparameters, n_boot=n_boot, rng=rng)
        cmi, given = conditional_mutual_information(mu, g, sub, sweep.hyperparameters, max_conditioning)
    else:
        psi, Psi, Psi_boot = {k: math.nan for k in sweep.hyperparameters}, math.nan, np.full(n_boot, np.nan)
        cmi, given = math.nan, ()
    row.update({f"psi[{k}]": v for k, v in psi.items()})
    row["Psi"] = Psi
    row["Psi_ci_low"], row["Psi_ci_high"] = percentile_interval(Psi_boot, confidence) if n_boot else (math.nan,) * 2
    row["cmi"] = cmi
    row["cmi_given"] = "{" + ", ".join(given) + "}" if not math.isnan(cmi) else ""

    env = sign_error_environments(sweep, m, n_test=n_test, min_weight=min_weight, weighted=weighted)
    errors = env["error"].dropna()
    row["sign_error_mean"] = float(errors.mean()) if len(errors) else math.nan
    row["sign_error_max"] = float(errors.max()) if len(errors) else math.nan
    for k in sweep.hyperparameters:
        errs_k = env.loc[env["hyperparameter"] == k, "error"].dropna()
        row[f"sign_error_max[{k}]"] = float(errs_k.max()) if len(errs_k) else math.nan
    row["n_environments"] = int(len(errors))
    if sweep.orientation[m] == "neither":
        notes.append("orientation unknown or 'neither': taken as is (pass orientation={name: 'sharper'|'flatter'})")
    row["note"] = "; ".join(notes)
    return row
