"""The figures of a sweep's analysis, from its results DataFrame: psi heat map, each measure
against test accuracy (scatter) and against each hyperparameter (trend). Used by the report
(:mod:`sweeps.posthoc.report`) and the live view (:mod:`sweeps.service.live`); matplotlib ``Figure`` objects,
no pyplot state, so they can be drawn in any thread."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

DECADES = 1.0  # log axis when max/min spans at least this many decades


def _spans_decades(values: pd.Series | np.ndarray) -> bool:
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna().to_numpy(float)
    return v.size > 1 and bool((v > 0).all()) and math.log10(v.max() / v.min()) >= DECADES


def is_numeric(values: pd.Series) -> bool:
    """Whether every value of ``values`` reads as a number."""
    return pd.to_numeric(values, errors="coerce").notna().all()


def _positions(values: pd.Series) -> tuple[np.ndarray, list[str] | None]:
    """x coordinates of hyperparameter values: the numbers, or category indices and their labels."""
    if is_numeric(values):
        return pd.to_numeric(values).to_numpy(float), None
    labels = sorted(map(str, values.unique()))
    return values.astype(str).map({lab: i for i, lab in enumerate(labels)}).to_numpy(float), labels


def _panel_grid(n: int, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list[Any]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def psi_heatmap(table: pd.DataFrame) -> Figure:
    """Heatmap of ``psi[k]`` (rows: measures, columns: hyperparameters, then Psi), colours in [-1, 1]."""
    columns = [c for c in table.columns if c.startswith("psi[")] + ["Psi"]
    values = table[columns].to_numpy(float)
    labels = [c[4:-1] if c.startswith("psi[") else "Psi (mean)" for c in columns]
    fig = Figure(figsize=(3.5 + 1.4 * len(columns), 1.6 + 0.45 * len(table)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(table)), list(table.index))
    for (i, j), v in np.ndenumerate(values):
        colour = "white" if abs(v) > 0.6 else "black"  # NaN compares False: black
        ax.text(j, i, "n/a" if np.isnan(v) else f"{v:+.2f}", ha="center", va="center", fontsize=9, color=colour)
    fig.colorbar(image, ax=ax, label="psi")
    ax.set_title("granulated Kendall psi (+1: sharper => larger gap)", fontsize=10)
    return fig


def scatter_figure(runs: pd.DataFrame, measure: str, y: str, hyperparameters: Sequence[str]) -> Figure:
    """``measure`` (x) against ``y`` (e.g. test accuracy), one panel per hyperparameter, coloured by it."""
    fig, axes = _panel_grid(max(len(hyperparameters), 1))
    log_x = _spans_decades(runs[measure])
    panels: Sequence[str | None] = hyperparameters if hyperparameters else [None]
    for ax, k in zip(axes, panels):
        if k is None:
            ax.scatter(runs[measure], runs[y], s=18)
        else:
            colours, labels = _positions(runs[k])
            if labels is not None:  # categories: one distinct colour each
                cmap, norm = colormaps["tab10"].resampled(len(labels)), Normalize(-0.5, len(labels) - 0.5)
            else:
                cmap, norm = colormaps["viridis"], LogNorm() if _spans_decades(runs[k]) else Normalize()
            points = ax.scatter(runs[measure], runs[y], c=colours, cmap=cmap, norm=norm, s=18)
            bar = fig.colorbar(points, ax=ax, label=k)
            if labels is not None:
                bar.set_ticks(range(len(labels)), labels=labels)
        ax.set_xscale("log" if log_x else "linear")
        ax.set_xlabel(measure)
        ax.set_ylabel(y)
    fig.suptitle(f"{measure} vs {y}")
    return fig


def trend_figure(runs: pd.DataFrame, measure: str, hyperparameters: Sequence[str]) -> Figure:
    """``measure`` against each hyperparameter: every run as a dot, the median per value as a line."""
    fig, axes = _panel_grid(max(len(hyperparameters), 1))
    log_y = _spans_decades(runs[measure])
    for ax, k in zip(axes, hyperparameters):
        x, labels = _positions(runs[k])
        ax.scatter(x, runs[measure], s=10, alpha=0.35, color="tab:gray")
        median = pd.Series(runs[measure].to_numpy(float)).groupby(x).median()
        ax.plot(median.index, median.to_numpy(), "o-", color="tab:blue", label="median")
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels)
        elif _spans_decades(x):
            ax.set_xscale("log")
        ax.set_yscale("log" if log_y else "linear")
        ax.set_xlabel(k)
        ax.set_ylabel(measure)
    fig.suptitle(f"{measure} across the sweep")
    return fig


# ---------------------------------------------------------------------------------------------
# Table output
# ---------------------------------------------------------------------------------------------


__all__ = ["DECADES", "is_numeric", "psi_heatmap", "scatter_figure", "trend_figure"]
