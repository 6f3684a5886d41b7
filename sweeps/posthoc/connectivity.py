"""Run-to-run variation: how far apart are the minima that trials differing only in their seed reach?

``sweeps measure NAME --metric seed_barrier`` (the pairwise measure; options ``points``, default
11, and ``tolerance``, default 0.02, via ``--set measure_options.seed_barrier.K=V``) pairs the
``converged`` trials of a sweep that share every swept hyperparameter but the seed, and for each
pair evaluates the straight line between their final weights (``model.pt``) with
:func:`landscape.connectivity.linear_path`: loss and error on the first trial's measure batches
(its ``measure_subset``), loss and error barriers (Frankle et al. 2020). No permutation
alignment of hidden units. It runs in the calling process (a pair costs ``points`` evaluations
of the measure batches), and is computed whole each time it is asked for.

Stored on the sweep's MLflow parent run: ``connectivity/pairs.csv`` (one row per pair:
``trial_a``, ``trial_b``, the shared hyperparameters, ``loss_barrier``, ``error_barrier``, the
end values and ``connected`` = error barrier <= tolerance) and ``connectivity/summary.csv`` (one
row per configuration: ``n_pairs``, ``loss_barrier_mean``, ``error_barrier_mean``,
``connected_fraction``), ``connectivity/flatness.csv`` (whether flatter configurations are more
connected: :func:`flatness_vs_connectivity`), and the metrics ``connectivity.loss_barrier_mean``,
``connectivity.error_barrier_mean``, ``connectivity.connected_fraction`` over all pairs.
:func:`seed_barriers` reads the pairs back as a DataFrame.
"""

from __future__ import annotations

import io
import itertools
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

#: The pairwise measure's name for ``sweeps measure --metric``.
PAIRWISE = "seed_barrier"
#: Its options and their defaults: evaluation points on the line, error tolerance of "connected".
DEFAULTS = {"points": 11, "tolerance": 0.02}
PAIRS_FILE, SUMMARY_FILE = "connectivity/pairs.csv", "connectivity/summary.csv"
FLATNESS_FILE = "connectivity/flatness.csv"


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The pairwise measure's options over :data:`DEFAULTS`; an unknown or bad one is a
    :class:`~sweeps.spec.errors.ConfigError` naming it."""
    from ..spec.errors import ConfigError

    bad = sorted(set(options) - set(DEFAULTS))
    if bad:
        raise ConfigError(f"measure_options.{PAIRWISE}: unknown option(s) {bad}; accepted: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **options}
    if not isinstance(out["points"], int) or out["points"] < 2:
        raise ConfigError(f"measure_options.{PAIRWISE}.points: an integer >= 2 (got {out['points']!r})")
    if not isinstance(out["tolerance"], (int, float)) or out["tolerance"] < 0:
        raise ConfigError(f"measure_options.{PAIRWISE}.tolerance: a number >= 0 (got {out['tolerance']!r})")
    return out


def seed_groups(frame: pd.DataFrame) -> tuple[list[str], list[list[int]]]:
    """The swept hyperparameters other than seeds, and the trial numbers of the converged trials
    grouped by their values (groups of two or more)."""
    from ..analysis import default_seed_columns

    runs = frame[frame["status"] == "converged"]
    seeds = set(default_seed_columns(runs))
    keys = [c for c in runs.attrs.get("search_space", frame.attrs.get("search_space", [])) if c not in seeds]
    if not keys:
        groups = [list(runs["trial_number"])]
    else:
        groups = [list(g["trial_number"]) for _, g in runs.groupby(keys, dropna=False, sort=True)]
    return keys, [sorted(int(n) for n in g) for g in groups if len(g) >= 2]


def measure_pairs(
    name: str, base: Any, conn: Any, parent: str, options: Mapping[str, Any], log: Callable[[str], None]
) -> pd.DataFrame:
    """Compute and store the barriers of every seed pair (see the module docstring); returns the
    pairs frame. Called by :func:`sweeps.posthoc.remeasure.measure_sweep` under the sweep's lease."""
    import optuna
    import torch
    from mlflow import MlflowClient

    from landscape.connectivity import linear_path

    from ..service.search import make_storage
    from ..service.tracking import MODEL_FILE, artifact_bytes
    from ..trial.data import load_dataset
    from ..trial.models import build_model
    from ..trial.run import measure_batches
    from ..trial.train import LOSSES
    from .queries import results

    settings = check_options(options)
    study = optuna.load_study(study_name=name, storage=make_storage(conn.storage))
    points = {t.number: dict(t.params) for t in study.get_trials(deepcopy=False)}
    frame = results(name, conn.tracking_uri)
    keys, groups = seed_groups(frame)
    by_number = {int(r["trial_number"]): r for r in frame.to_dict("records")}
    client = MlflowClient(tracking_uri=conn.tracking_uri)
    rows = []
    for group in groups:
        for a, b in itertools.combinations(group, 2):
            config = base.with_point(points.get(a, {}))
            states = []
            for number in (a, b):
                blob = artifact_bytes(client, str(by_number[number]["run_id"]), MODEL_FILE)
                if blob is None:
                    raise FileNotFoundError(f"trial {number}: its run has no {MODEL_FILE} artifact")
                states.append(torch.load(io.BytesIO(blob), map_location="cpu"))
            data = load_dataset(config.dataset)
            model = build_model(config.model, data.input_shape, data.num_classes, seed=config.seed)
            path = linear_path(
                model, LOSSES[config.train.loss], measure_batches(data, config), *states, points=settings["points"]
            )
            row = {"trial_a": a, "trial_b": b, **{k: by_number[a][k] for k in keys}}
            row |= {"loss_barrier": path.loss_barrier, "error_barrier": path.error_barrier}
            row |= {"loss_a": float(path.loss[0]), "loss_b": float(path.loss[-1])}
            row |= {"error_a": float(path.error[0]), "error_b": float(path.error[-1])}
            row["connected"] = bool(path.error_barrier <= settings["tolerance"])
            rows.append(row)
            log(f"seed pair {a}-{b}: loss barrier {path.loss_barrier:.4g}, error barrier {path.error_barrier:.4g}")
    pairs = pd.DataFrame(
        rows,
        columns=["trial_a", "trial_b", *keys, "loss_barrier", "error_barrier"]
        + (["loss_a", "loss_b", "error_a", "error_b", "connected"]),
    )
    if parent:
        summary = summarize(pairs, keys)
        _store(client, parent, pairs, summary, flatness_vs_connectivity(frame, summary, keys))
    return pairs


def summarize(pairs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per configuration (``keys``): ``n_pairs``, ``loss_barrier_mean``, ``error_barrier_mean``,
    ``connected_fraction``."""
    if pairs.empty:
        return pd.DataFrame(columns=[*keys, "n_pairs", "loss_barrier_mean", "error_barrier_mean", "connected_fraction"])
    grouped = pairs.groupby(keys, dropna=False, sort=True) if keys else pairs.groupby(lambda _: 0)
    out = grouped.agg(
        n_pairs=("trial_a", "size"),
        loss_barrier_mean=("loss_barrier", "mean"),
        error_barrier_mean=("error_barrier", "mean"),
        connected_fraction=("connected", "mean"),
    )
    return out.reset_index() if keys else out.reset_index(drop=True)


def flatness_vs_connectivity(
    frame: pd.DataFrame,
    summary: pd.DataFrame,
    keys: list[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Are flatter configurations more connected across seeds? Per measure column of ``frame``
    (registered measures, :func:`sweeps.analysis.default_measures`): Kendall tau-b over the
    configurations between the measure's mean over the configuration's converged trials and the
    configuration's mean ``loss_barrier`` (``tau_loss``) and ``error_barrier`` (``tau_error``),
    each with its percentile bootstrap interval over configurations (``*_ci_low``,
    ``*_ci_high``: :func:`sweeps.analysis.tau_with_interval`, ``n_boot`` resamples from
    ``seed``), with ``n_configs`` and the measure's ``larger_is``. The taus are of the raw
    measure: for a ``sharper`` measure tau > 0 says sharper configurations have higher barriers
    (flatter ones are more connected), for a ``flatter`` one tau < 0 says so
    (:func:`connectivity_lines` words it). Empty with fewer than two configurations."""
    from ..analysis import default_measures, measure_orientation, tau_with_interval

    barriers = {"loss": "loss_barrier_mean", "error": "error_barrier_mean"}
    columns = ["measure", "larger_is", "n_configs"] + [
        f"tau_{b}{suffix}" for b in barriers for suffix in ("", "_ci_low", "_ci_high")
    ]
    if not keys or len(summary) < 2:
        return pd.DataFrame(columns=columns)
    runs = frame[frame["status"] == "converged"]
    measures = [m for m in default_measures(runs) if not m.endswith("_seconds")]
    # the keys as text on both sides: a summary read back from its CSV has "32" where the results have 32
    means = runs.assign(**{k: runs[k].astype(str) for k in keys}).groupby(keys, dropna=False)[measures].mean()
    joined = summary.assign(**{k: summary[k].astype(str) for k in keys}).set_index(keys).join(means)
    rows = []
    for m in measures:
        usable = joined[joined[m].notna()]
        row: dict[str, Any] = {"measure": m, "larger_is": measure_orientation(m), "n_configs": len(usable)}
        for b, column in barriers.items():
            mu, g = usable[m].to_numpy(float), usable[column].to_numpy(float)
            tau = tau_with_interval(mu, g, n_boot=n_boot, seed=seed, confidence=confidence)
            row |= {f"tau_{b}{suffix}": float(tau[f"tau{suffix}"]) for suffix in ("", "_ci_low", "_ci_high")}
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def connectivity_lines(flatness: pd.DataFrame) -> list[str]:
    """One sentence per oriented measure (``sharper`` or ``flatter``) of a
    :func:`flatness_vs_connectivity` table: are flatter configurations more connected across
    seeds? Its taus are turned so that tau > 0 means "sharper configuration, higher barrier"; the
    verdict is read from the bootstrap interval: above 0 "more connected", below 0 "less
    connected", holding 0 "inconclusive", undefined (ties, too few configurations) "undefined"."""
    import math

    lines = []
    for row in flatness.to_dict("records"):
        if row["larger_is"] not in ("sharper", "flatter"):
            continue
        sign = 1.0 if row["larger_is"] == "sharper" else -1.0
        parts = []
        for b in ("loss", "error"):
            tau, low, high = (sign * float(row[f"tau_{b}{s}"]) for s in ("", "_ci_low", "_ci_high"))
            low, high = min(low, high), max(low, high)
            if not math.isfinite(tau):
                parts.append(f"{b} barrier: tau undefined (ties): undefined")
                continue
            if not (math.isfinite(low) and math.isfinite(high)):
                parts.append(f"{b} barrier {tau:+.2f} (no interval): inconclusive")
                continue
            verdict = (
                "flatter configurations more connected"
                if low > 0
                else "flatter configurations less connected"
                if high < 0
                else "inconclusive (the interval holds 0)"
            )
            parts.append(f"{b} barrier {tau:+.2f} [{low:+.2f}, {high:+.2f}]: {verdict}")
        lines.append(
            f"{row['measure']} ({int(row['n_configs'])} configurations; Kendall tau between the configuration means, "
            f"turned so that + means sharper => higher barrier): " + "; ".join(parts)
        )
    return lines


def _store(client: Any, parent: str, pairs: pd.DataFrame, summary: pd.DataFrame, flatness: pd.DataFrame) -> None:
    from mlflow.entities import Metric

    with tempfile.TemporaryDirectory(prefix="sweeps-connectivity-") as tmp:
        pairs.to_csv(Path(tmp) / Path(PAIRS_FILE).name, index=False)
        summary.to_csv(Path(tmp) / Path(SUMMARY_FILE).name, index=False)
        flatness.to_csv(Path(tmp) / Path(FLATNESS_FILE).name, index=False)
        client.log_artifacts(parent, tmp, artifact_path=str(Path(PAIRS_FILE).parent))
    if pairs.empty:
        return
    now = int(time.time() * 1000)
    values = {
        "loss_barrier_mean": float(pairs["loss_barrier"].mean()),
        "error_barrier_mean": float(pairs["error_barrier"].mean()),
        "connected_fraction": float(pairs["connected"].mean()),
    }
    client.log_batch(parent, metrics=[Metric(f"connectivity.{k}", v, now, len(pairs)) for k, v in values.items()])


def flatness_table(
    name: str, frame: pd.DataFrame, tracking_uri: str | None = None, *, results_dir: str | Path | None = None
) -> pd.DataFrame | None:
    """:func:`flatness_vs_connectivity` of sweep ``name``'s stored seed-pair summary against the
    results ``frame`` as they are now (measures added after the pairs count too); ``None`` when
    the sweep has no seed_barrier results (or no parent run)."""
    try:
        summary = seed_barriers(name, tracking_uri, results_dir=results_dir, summary=True)
    except LookupError:
        return None
    if summary.empty:
        return None
    keys, _ = seed_groups(frame)
    return flatness_vs_connectivity(frame, summary, keys)


def seed_barriers(
    name: str,
    tracking_uri: str | None = None,
    *,
    results_dir: str | Path | None = None,
    summary: bool = False,
    flatness: bool = False,
) -> pd.DataFrame:
    """The seed pairs' barriers stored by ``sweeps measure NAME --metric seed_barrier`` (one row
    per pair); with ``summary`` the per-configuration summary, with ``flatness`` the table of
    :func:`flatness_vs_connectivity`; empty when none were measured."""
    from mlflow import MlflowClient

    from ..service.connections import resolve
    from ..service.tracking import artifact_bytes
    from .queries import find_parent_run

    uri = resolve(tracking_uri=tracking_uri, results_dir=results_dir, create=False).tracking_uri
    parent = find_parent_run(name, uri)
    file_name = FLATNESS_FILE if flatness else SUMMARY_FILE if summary else PAIRS_FILE
    blob = artifact_bytes(MlflowClient(tracking_uri=uri), parent, file_name)
    return pd.DataFrame() if blob is None else pd.read_csv(io.BytesIO(blob))


__all__ = [
    "DEFAULTS",
    "PAIRWISE",
    "check_options",
    "connectivity_lines",
    "flatness_table",
    "flatness_vs_connectivity",
    "measure_pairs",
    "seed_barriers",
    "seed_groups",
    "summarize",
]
