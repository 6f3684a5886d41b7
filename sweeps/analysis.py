"""How well does each flatness measure predict generalization? Rank statistics over a sweep.

:func:`correlations` takes the results DataFrame of a sweep (one row per trial, see
:func:`sweeps.results`) and returns one row per measure with

* Kendall tau-b and Spearman rho against the target (default ``gen_gap``) and against
  ``test_acc`` (Kendall 1938/1945),
* the granulated Kendall coefficients ``psi[k]`` per hyperparameter and their mean ``Psi``
  (Jiang et al. 2020, "Fantastic generalization measures and where to find them"),
* the conditional-mutual-information score ``cmi`` (Jiang et al. 2020),
* the robust sign-error over environments (Dziugaite et al. 2020, "In search of robust
  measures of generalization"),
* percentile-bootstrap confidence intervals for tau and Psi.

Orientation: every measure is multiplied by ``sign`` (+1 when a larger value means a sharper
minimum, -1 when it means a flatter one, see ``landscape.METRICS[name].larger_is``) and the
target by +1 when larger is worse (``gen_gap``, errors, losses) or -1 when larger is better
(accuracies). So a positive tau/psi/Psi, and a sign-error below 0.5, mean "sharper => larger
generalization gap", which is what the flatness hypothesis predicts. ``tau_test_acc`` and
``spearman_test_acc`` compare the oriented measure with raw test accuracy: the hypothesis
predicts them negative.

Models: failed, diverged and not-converged trials are excluded (counted in ``.attrs``); the
runs of one configuration (same hyperparameters, different seeds) are averaged into one model
before tau, Spearman, psi and CMI. The robust sign-error uses the individual runs.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .status import TrialStatus

#: Columns that describe a trial's outcome, never a measure.
OUTCOME_COLUMNS = ("test_acc", "train_acc", "gen_gap", "test_loss", "train_loss", "n_test", "n_train")
#: Bookkeeping columns of the results DataFrame.
BOOKKEEPING_COLUMNS = ("status", "run_id", "trial_number", "sweep")
CONVERGED = TrialStatus.CONVERGED
#: Missing grid cells listed (all are counted).
MISSING_LISTED = 1000
#: Largest number of models for which tau-b uses dense n x n pair matrices (memory ~ 24 n^2 bytes).
DENSE_PAIRS_MAX = 2000

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


# ---------------------------------------------------------------------------------------------
# Rank statistics on plain arrays
# ---------------------------------------------------------------------------------------------


def pair_signs(x: np.ndarray) -> np.ndarray:
    """``S[i, j] = sign(x[i] - x[j])`` as int8, shape ``(n, n)``."""
    x = np.asarray(x, dtype=float)
    return np.sign(x[:, None] - x[None, :]).astype(np.int8)


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


def hoeffding_weight(gap_difference: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Dziugaite et al. 2020 weight max(0, 1 - 2 exp(-n dg^2 / 2))^2 of a pair of runs.

    ``gap_difference`` dg is in units of error rate (fraction, not percent), ``n`` is the test-set
    size. The weight is a lower bound on the probability that the observed ordering of the two
    generalization gaps is the true one (Hoeffding).
    """
    dg = np.asarray(gap_difference, float)
    return np.maximum(0.0, 1.0 - 2.0 * np.exp(-np.asarray(n, float) * dg**2 / 2.0)) ** 2


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile bootstrap interval at ``level`` (e.g. 0.95), ignoring NaN resamples."""
    samples = np.asarray(samples, float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# From the results DataFrame to models
# ---------------------------------------------------------------------------------------------


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


def default_seed_columns(df: pd.DataFrame) -> list[str]:
    """``"seed"`` and every column named ``"*.seed"`` or ``"*_seed"`` among the dotted config keys."""
    return [c for c in df.columns if c == "seed" or c.endswith(".seed") or ("." in c and c.endswith("_seed"))]


def _top_level_config_keys() -> set[str]:
    """Scalar fields at the top of the sweep config (``name``, ``measure_subset``, ...), not sections."""
    try:
        from pydantic import BaseModel

        from .config import SweepConfig
    except ImportError:  # pragma: no cover - config module missing
        return set()
    return {
        name for name, info in SweepConfig.model_fields.items()
        if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel))
    }


#: Dotted names that are metrics, not config keys: in-training landscape values logged by the
#: sweep runner (``track.hessian_top_eig``) and metrics renamed on a clash with a param.
METRIC_PREFIXES = ("track.", "metric.")


def config_columns(df: pd.DataFrame) -> list[str]:
    """Config keys of a results DataFrame: dotted keys (``"train.lr"``, ``"model.width"``), ``"seed"``
    and the other scalar top-level config fields; never dotted metrics (:data:`METRIC_PREFIXES`)."""
    top = _top_level_config_keys() | {"seed"}
    return [
        c for c in df.columns
        if isinstance(c, str) and not c.startswith(METRIC_PREFIXES) and ("." in c or c in top)
    ]


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, np.ndarray)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if value is None or (not isinstance(value, (str, tuple)) and pd.isna(value)):
        return "None"
    return value


def _sorted_values(values: Iterable[Any]) -> list[Any]:
    values = list(dict.fromkeys(values))
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)


def measure_orientation(name: str, overrides: Mapping[str, str] | None = None) -> str:
    """``larger_is`` of a measure column: the override, else ``landscape.METRICS``, else "neither".

    A column produced by a metric that returns several keys (``"hessian_spectrum_trace"`` from
    ``"hessian_spectrum"``) inherits that metric's orientation.
    """
    if overrides and name in overrides:
        value = overrides[name]
        if value not in ("sharper", "flatter", "neither"):
            raise ValueError(f"orientation[{name!r}]={value!r}: use 'sharper', 'flatter' or 'neither'")
        return value
    from landscape.metrics import metric_of_key

    metric = metric_of_key(name)
    return metric.larger_is if metric is not None else "neither"


def default_measures(df: pd.DataFrame) -> list[str]:
    """Numeric columns of ``df`` that a registered metric declares as a result key (``Metric.keys``)."""
    from landscape.metrics import metric_of_key

    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()]
    return [c for c in numeric if metric_of_key(c) is not None]


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
        raise ValueError(f"target_larger_is={target_larger_is!r}: use 'better' (accuracy) or 'worse' (gap, error, loss)")
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
        runs[column] = pd.to_numeric(frame.loc[usable, column], errors="coerce").astype(float) if column in frame else np.nan

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
        attempted = {
            (cell if isinstance(cell, tuple) else (cell,)): ", ".join(sorted(set(s))) for cell, s in status_of
        }
    # A random/TPE sweep has a huge nominal grid: list the first MISSING_LISTED cells, count all.
    missing = list(itertools.islice(
        ({**dict(zip(keys, cell)), "reason": attempted.get(cell, "not run")}
         for cell in itertools.product(*values.values()) if cell not in present),
        MISSING_LISTED,
    ))

    return PreparedSweep(
        runs=runs.reset_index(drop=True), models=models, keys=keys, hyperparameters=hyperparameters,
        measures=measures, orientation=orient, target=target, target_sign=target_sign,
        seed_columns=seeds, missing_cells=missing, n_missing=n_cells - len(present), n_cells=n_cells,
        excluded=excluded_counts,
        n_runs_total=n_total,
    )


# ---------------------------------------------------------------------------------------------
# Statistics on a prepared sweep
# ---------------------------------------------------------------------------------------------


def _groups_differing_only_in(models: pd.DataFrame, keys: Sequence[str], k: str) -> list[np.ndarray]:
    """Model indices grouped by the values of every key but ``k``: each group differs only in k."""
    others = [c for c in keys if c != k]
    if not others:
        return [models.index.to_numpy()]
    return list(models.groupby(others, dropna=False, sort=True).indices.values())


def granulated_kendall(
    mu: np.ndarray, g: np.ndarray, models: pd.DataFrame, keys: Sequence[str], hyperparameters: Sequence[str],
    *, n_boot: int = 0, rng: np.random.Generator | None = None,
) -> tuple[dict[str, float], float, np.ndarray]:
    """psi_k = mean over the settings of the other keys of tau-b over the models differing only in k.

    A group where ``mu`` or ``g`` is constant has no ranking to compare and is skipped. Returns
    ``({k: psi_k}, Psi, Psi_boot)``, ``Psi`` = mean_k psi_k. The bootstrap is two-stage: resample
    the groups of each k, then the models inside each resampled group; ``Psi_boot`` has shape
    ``(n_boot,)``.
    """
    psi, boot = {}, []
    for k in hyperparameters:
        groups = _groups_differing_only_in(models, keys, k)
        taus = np.array([kendall_tau_b(mu[gr], g[gr]) for gr in groups])
        psi[k] = float(np.nanmean(taus)) if np.isfinite(taus).any() else math.nan
        if n_boot:
            within = np.stack([
                kendall_tau_b(mu[gr], g[gr], counts=rng.multinomial(len(gr), np.full(len(gr), 1 / len(gr)), n_boot))
                for gr in groups
            ])  # (groups, n_boot)
            pick = rng.integers(len(groups), size=(n_boot, len(groups)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                boot.append(np.nanmean(within[pick, np.arange(n_boot)[:, None]], axis=1))
    Psi = float(np.mean(list(psi.values()))) if psi else math.nan
    Psi_boot = np.mean(boot, axis=0) if boot else np.full(n_boot, np.nan)
    return psi, Psi, Psi_boot


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
    mu: np.ndarray, g: np.ndarray, models: pd.DataFrame, hyperparameters: Sequence[str], max_conditioning: int = 2,
) -> tuple[float, tuple[str, ...]]:
    """Jiang et al. CMI score: min over S (|S| <= max_conditioning) of I(V_mu; V_g | S) / H(V_g | S).

    Over ordered pairs (i, j), i != j, of models sharing the values of the hyperparameters in S:
    V_g = 1[g_i > g_j], V_mu = 1[mu_i > mu_j]. Per cell of S the mutual information is in bits;
    cells are weighted by their share of the pairs, and the normalizer is the conditional entropy
    H(V_g | S) with the same weights (as Jiang et al.), so the score lies in [0, 1]: 1 when mu
    orders every such pair as g does. Returns ``(score, S_argmin)``.
    """
    best, best_s = math.inf, ()
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


def sign_error_environments(
    prepared: PreparedSweep, measure: str, *, n_test: int | None = None, min_weight: float = 0.5,
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
                rows.append((k, int(a), int(b), float((w * err).sum() / total) if total > 0 else math.nan,
                             float(total), int((w > 0).sum())))
    return pd.DataFrame(rows, columns=["hyperparameter", "model_a", "model_b", "error", "weight", "pairs"])


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
        df, target, measures, hyperparameters, seed_columns=seed_columns, orientation=orientation,
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
        rows[m] = _measure_row(sweep, m, grid_ok=not grid_note, n_boot=n_boot, seed=seed, rng=rng, confidence=confidence,
                               max_conditioning=max_conditioning, n_test=n_test, min_weight=min_weight,
                               grid_note=grid_note, weighted=is_rate)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "measure"
    table.attrs.update({
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
            "Hoeffding weight from n_test" if has_n and is_rate else
            f"none: {target} is not a fraction in [-1, 1], every pair has weight 1" if has_n else
            "none: no n_test column or argument, every pair has weight 1"
        ),
    })
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


def tau_table(df: pd.DataFrame, target: str = "gen_gap", measures: Sequence[str] | None = None, *, n_boot: int = 1000,
              seed: int = 0, confidence: float = 0.95, **models: Any) -> pd.DataFrame:
    """The Kendall tau part of :func:`correlations` alone (its columns ``n``, ``tau``,
    ``tau_ci_low``, ``tau_ci_high``, equal to those of :func:`correlations` with the same
    arguments), for any set of finished trials: no grid needed, and much cheaper (no psi, CMI
    or sign-error). The live correlation of a running sweep (:mod:`sweeps.live`) is this table.
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
    sweep: PreparedSweep, m: str, *, grid_ok: bool, n_boot: int, seed: int, rng: np.random.Generator, confidence: float,
    max_conditioning: int, n_test: int | None, min_weight: float, grid_note: str, weighted: bool,
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


# ---------------------------------------------------------------------------------------------
# Which hyperparameters lead to flat minima
# ---------------------------------------------------------------------------------------------


def complete_subgrid(df: pd.DataFrame, *, seed_columns: Sequence[str] | None = None) -> tuple[pd.DataFrame, dict[str, list[Any]]]:
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
    sweep = prepare(df, target, measures, hyperparameters, seed_columns=seed_columns,
                    orientation={m: "neither" for m in measures})
    models = sweep.models.rename(columns={"_target_raw": target})
    rng = np.random.default_rng(seed)
    rows = {}
    for k in sweep.hyperparameters:
        numbers = models[k].map(lambda v, k=k: (values or {}).get(k, {}).get(v, v))
        x = pd.to_numeric(numbers, errors="coerce").to_numpy(float)
        if not np.isfinite(x).all():
            bad = models[k][~np.isfinite(x)].iloc[0]
            raise ValueError(f"hyperparameters: {k}={bad!r} is not a number; give it one, e.g. "
                             f"values={{{k!r}: {{{bad!r}: ...}}}}")
        for c in columns:
            y = models[c].to_numpy(float)
            have = np.isfinite(y)
            xs, ys, sub = x[have], y[have], models[have].reset_index(drop=True)
            psi, _, boot = granulated_kendall(xs, ys, sub, sweep.keys, [k], n_boot=n_boot, rng=rng)
            with warnings.catch_warnings():  # the groups psi averaged over: those with a defined tau
                warnings.simplefilter("ignore", RuntimeWarning)
                n_groups = sum(np.isfinite(kendall_tau_b(xs[g], ys[g])) for g in _groups_differing_only_in(sub, sweep.keys, k))
            low, high = percentile_interval(boot, confidence) if n_boot else (math.nan, math.nan)
            rows[(k, c)] = {"tau": psi[k], "tau_ci_low": low, "tau_ci_high": high, "n_groups": int(n_groups),
                            "n_models": int(have.sum())}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["hyperparameter", "column"])
    return table
