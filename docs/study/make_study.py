"""Build docs/study/ from a finished run of examples/study.yaml: the numbers the study page cites.

Usage:
    sweeps run examples/study.yaml --results-dir RESULTS     # 949 s (16 minutes) measured on 2 CPU cores
    python docs/study/make_study.py --results-dir RESULTS [--out docs/study]

Writes into ``--out``:

    results.csv          every trial (sweeps.results)
    report/              the sweeps report on the largest complete sub-grid of converged cells
                         (correlations.csv/json, psi heat map, scatter and trend figures)
    effects.csv          granulated tau of each hyperparameter vs each measure, gen_gap, test_acc
    diagonal.csv         the lr / batch size = const models (seed means) and their statistics
    eos.csv              the full-batch runs: tracked lambda_max against 2 / lr
    claims.json          every number the page quotes, with its interval
    batch_lr.png, diagonal.png, width.png, eos.png

Every statistic comes from sweeps.analysis; this script only selects rows and draws.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

import sweeps
from sweeps.analysis import complete_subgrid, hyperparameter_effects, tau_table
from sweeps.posthoc.report import make_report
from sweeps.service.connections import resolve

NAME = "mnist1d-study"
LR, BATCH, WIDTH = "train.lr", "train.batch_size", "model.width"
#: lr / batch size on the grid's diagonal (0.1 at 32, 0.2 at 64, 0.4 at 128, 0.8 at 256).
DIAGONAL_RATIO = 0.1 / 32
#: Raw measures and their magnitude-aware (adaptive / scale-invariant) counterparts.
RAW_VS_ADAPTIVE = [
    ("sharpness_avg", "adaptive_sharpness_avg"),
    ("keskar_sharpness", "adaptive_sharpness_worst"),
    ("hessian_trace", "adaptive_trace"),
    ("pacbayes_flatness", "pacbayes_mag_flatness"),
]
SHARPNESS = ["hessian_top_eig", "keskar_sharpness", "hessian_trace"]
N_BOOT = 2000


def batch_numbers(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    """``full`` as a number: the training-set size."""
    return {BATCH: {"full": int(frame["n_train"].dropna().iloc[0])}}


def interval(row: pd.Series, value: str = "tau") -> dict[str, float]:
    return {
        value: float(row[value]),
        "ci_low": float(row[f"{value}_ci_low"]),
        "ci_high": float(row[f"{value}_ci_high"]),
    }


def effects_claims(effects: pd.DataFrame) -> dict[str, dict[str, float]]:
    return {
        f"{k} -> {c}": {**interval(effects.loc[(k, c)]), "n_groups": int(effects.loc[(k, c), "n_groups"])}
        for k, c in effects.index
    }


def diagonal(frame: pd.DataFrame) -> pd.DataFrame:
    """Converged runs with lr / batch = DIAGONAL_RATIO (the full batch is never on it)."""
    ratio = (frame[LR] / pd.to_numeric(frame[BATCH], errors="coerce")).to_numpy(float)
    converged = (frame["status"] == "converged").to_numpy()
    return frame[converged & np.isclose(ratio, DIAGONAL_RATIO)]


def eos_table(frame: pd.DataFrame, tracking_uri: str) -> tuple[pd.DataFrame, dict[int, pd.DataFrame]]:
    """One row per full-batch run: 2/lr, the largest and the last tracked lambda_max."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    rows, paths = [], {}
    for _, run in frame[frame[BATCH].astype(str) == "full"].iterrows():
        history = client.get_metric_history(run["run_id"], "track.hessian_top_eig")
        path = pd.DataFrame({"step": [m.step for m in history], "lambda_max": [m.value for m in history]}).sort_values(
            "step"
        )
        paths[int(run["trial_number"])] = path
        threshold = 2.0 / run[LR]
        late = path[path["step"] >= path["step"].max() / 2] if len(path) else path
        ratio = path["lambda_max"] / threshold
        rows.append(
            {
                "trial_number": int(run["trial_number"]),
                LR: run[LR],
                WIDTH: run[WIDTH],
                "seed": run["seed"],
                "status": run["status"],
                "steps": run["steps"],
                "two_over_lr": threshold,
                "init_ratio": ratio.iloc[0],
                "max_lambda": path["lambda_max"].max(),
                "max_ratio": ratio.max(),
                "step_of_max": int(path["step"].iloc[int(ratio.argmax())]),
                "share_near": float(((ratio >= 0.8) & (ratio <= 1.25)).mean()),  # of the tracked points
                "first_step_at_90pct": path.loc[path["lambda_max"] >= 0.9 * threshold, "step"].min(),
                "final_lambda": run.get("hessian_top_eig", math.nan),
                "late_mean_ratio": late["lambda_max"].mean() / threshold,
                "n_points": len(path),
            }
        )
    return pd.DataFrame(rows).sort_values([LR, WIDTH, "seed"]), paths


def draw_batch_lr(frame: pd.DataFrame, sizes: dict[str, int]) -> Figure:
    runs = frame[frame["status"] == "converged"].copy()
    runs["batch"] = runs[BATCH].map(lambda b: sizes.get(b, b)).astype(float)
    fig = Figure(figsize=(12, 6.4), layout="constrained")
    axes = fig.subplots(2, 3)
    for row, width in enumerate(sorted(runs[WIDTH].unique())):
        sub = runs[runs[WIDTH] == width]
        for ax, column in zip(axes[row], ["hessian_top_eig", "gen_gap", "test_acc"]):
            for lr, group in sub.groupby(LR):
                means = group.groupby("batch")[column].agg(["mean", "min", "max"])
                ax.errorbar(
                    means.index,
                    means["mean"],
                    yerr=[means["mean"] - means["min"], means["max"] - means["mean"]],
                    marker="o",
                    capsize=2,
                    label=f"lr {lr:g}",
                )
            ax.set_xscale("log", base=2)
            ax.set_title(f"width {width}: {column}")
            ax.set_xlabel("batch size (full = 4000)")
    axes[0][0].legend(fontsize=8)
    return fig


def draw_diagonal(models: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, column in zip(axes, ["hessian_top_eig", "gen_gap", "test_acc"]):
        for width, group in models.groupby(WIDTH):
            ax.plot(group[LR], group[column], "o-", label=f"width {width}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("lr (batch size = 320 lr)")
        ax.set_title(column)
    axes[0].legend(fontsize=8)
    return fig


def draw_width(table: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    labels, raw, adaptive = [], [], []
    for r, a in RAW_VS_ADAPTIVE:
        labels.append(f"{r}\nvs {a}")
        raw.append(table.loc[r, f"psi[{WIDTH}]"])
        adaptive.append(table.loc[a, f"psi[{WIDTH}]"])
    x = np.arange(len(labels))
    ax.bar(x - 0.2, raw, 0.4, label="raw")
    ax.bar(x + 0.2, adaptive, 0.4, label="magnitude-aware")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("psi[width] (granulated Kendall)")
    ax.legend(fontsize=8)
    return fig


def draw_eos(paths: dict[int, pd.DataFrame], eos: pd.DataFrame) -> Figure:
    widths = sorted(eos[WIDTH].unique())
    fig = Figure(figsize=(6 * len(widths), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(widths)))
    colours = {lr: f"C{i}" for i, lr in enumerate(sorted(eos[LR].unique()))}
    for ax, width in zip(axes, widths):
        for _, run in eos[eos[WIDTH] == width].iterrows():
            path = paths[run["trial_number"]]
            label = f"lr {run[LR]:g}" if run["seed"] == eos["seed"].min() else None
            ax.plot(path["step"], path["lambda_max"], color=colours[run[LR]], lw=1, label=label)
        for lr, colour in colours.items():
            ax.axhline(2 / lr, color=colour, ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("step (full batch)")
        ax.set_ylabel("tracked lambda_max (dashed: 2 / lr)")
        ax.set_title(f"width {width}")
        ax.legend(fontsize=8)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", required=True, help="where `sweeps run examples/study.yaml` wrote")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="output folder (default: docs/study)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame = sweeps.results(NAME, results_dir=args.results_dir)
    frame.to_csv(out / "results.csv", index=False)
    sizes = batch_numbers(frame)
    claims: dict = {"n_trials": len(frame), "status": frame["status"].value_counts().to_dict()}

    grid, dropped = complete_subgrid(frame)
    report = make_report(
        grid,
        out / "report",
        n_boot=N_BOOT,
        allow_incomplete_grid=False,
        dpi=60,
        title="MNIST-1D study: which measure predicts the generalization gap?",
    )
    table = report.table
    claims["subgrid"] = {
        "dropped": dropped,
        "n_runs": int(table.attrs["n_runs_used"]),
        "n_models": int(table.attrs["n_models"]),
    }
    claims["measures"] = {
        m: {
            **interval(table.loc[m]),
            "Psi": interval(table.loc[m], "Psi"),
            "psi": {k: float(table.loc[m, f"psi[{k}]"]) for k in table.attrs["hyperparameters"]},
            "sign_error_max": float(table.loc[m, "sign_error_max"]),
            "sign_error_mean": float(table.loc[m, "sign_error_mean"]),
            "n_environments": int(table.loc[m, "n_environments"]),
        }
        for m in table.index
    }
    claims["width_raw_vs_adaptive"] = {
        f"{r} vs {a}": [float(table.loc[r, f"psi[{WIDTH}]"]), float(table.loc[a, f"psi[{WIDTH}]"])]
        for r, a in RAW_VS_ADAPTIVE
    }

    effects = hyperparameter_effects(
        frame,
        SHARPNESS + [m for pair in RAW_VS_ADAPTIVE for m in pair] + ["gen_gap", "test_acc"],
        values=sizes,
        n_boot=N_BOOT,
    )
    effects.to_csv(out / "effects.csv")
    claims["effects"] = effects_claims(effects)

    diag = diagonal(frame).drop(columns=[BATCH])  # batch size = 320 lr there: lr alone says where
    diag_models = (
        diag.groupby([LR, WIDTH])[["hessian_top_eig", "keskar_sharpness", "gen_gap", "test_acc"]].mean().reset_index()
    )
    diag_models.to_csv(out / "diagonal.csv", index=False)
    diag_effects = hyperparameter_effects(
        diag, ["hessian_top_eig", "keskar_sharpness", "gen_gap", "test_acc"], n_boot=N_BOOT
    )
    diag_tau = tau_table(diag, measures=["hessian_top_eig", "keskar_sharpness"], n_boot=N_BOOT)
    claims["diagonal"] = {
        "effects": effects_claims(diag_effects),
        "tau_vs_gap": {m: interval(diag_tau.loc[m]) | {"n": int(diag_tau.loc[m, "n"])} for m in diag_tau.index},
    }

    eos, paths = eos_table(frame, resolve(results_dir=args.results_dir, create=False).tracking_uri)
    eos.to_csv(out / "eos.csv", index=False)
    ranges = (
        eos.groupby([LR, WIDTH])[["init_ratio", "max_ratio", "step_of_max", "share_near", "late_mean_ratio"]]
        .agg(["min", "max"])
        .round(3)
        .to_dict("index")
    )
    claims["eos"] = {
        f"lr={lr:g},width={w}": {f"{a}_{b}": v for (a, b), v in val.items()} for (lr, w), val in ranges.items()
    }

    for name, fig in {
        "batch_lr": draw_batch_lr(frame, sizes[BATCH]),
        "diagonal": draw_diagonal(diag_models),
        "width": draw_width(table),
        "eos": draw_eos(paths, eos),
    }.items():
        fig.savefig(out / f"{name}.png", dpi=100)
    (out / "claims.json").write_text(json.dumps(claims, indent=2, default=str))
    print(json.dumps(claims, indent=2, default=str))


if __name__ == "__main__":
    main()
