"""Build docs/study/ from a finished run of examples/study.yaml: the numbers the study page cites.

Usage:
    sweeps run examples/study.yaml --results-dir RESULTS     # 949 s (16 minutes) measured on 2 CPU cores
    sweeps measure mnist1d-study --results-dir RESULTS $(python docs/study/make_study.py --measure-flags)
    sweeps measure mnist1d-study --results-dir RESULTS --metric seed_barrier
    python docs/study/make_study.py --results-dir RESULTS [--out docs/study]

Writes into ``--out``:

    results.csv          every trial (sweeps.results)
    report/              the sweeps report on the largest complete sub-grid of converged cells
                         (correlations.csv/json, psi heat map, scatter and trend figures)
    effects.csv          granulated tau of each hyperparameter vs each measure, gen_gap, test_acc
    diagonal.csv         the lr / batch size = const models (seed means) and their statistics
    eos.csv              the full-batch runs: tracked lambda_max against 2 / lr
    jiang.csv            every measure (the study's and JIANG_MEASURES, added by ``sweeps measure``) on the
                         complete sub-grid: tau, Psi, sign-error next to Jiang et al.'s published value
    seed_pairs.csv       the seed pairs' barriers (``sweeps measure --metric seed_barrier``)
    seed_configs.csv     their summary per configuration
    connectivity.csv     flatness vs connectivity: tau between each measure's and the barrier's
                         configuration means, with intervals (sweeps.posthoc.connectivity.flatness_vs_connectivity)
    claims.json          every number the page quotes, with its interval
    batch_lr.png, diagonal.png, width.png, eos.png

and prints claims.json and the markdown tables of the page's sections 6 and 7 (page_tables).

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
from sweeps.analysis import complete_subgrid, correlations, hyperparameter_effects, tau_table
from sweeps.posthoc.connectivity import connectivity_lines, flatness_vs_connectivity, seed_barriers
from sweeps.posthoc.report import make_report
from sweeps.service.connections import resolve
from sweeps.spec.config import load_config

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
#: The measures examples/study.yaml computes after training: the report and section 4's table.
#: Explicit (not "every measure column"): the measures added later must not change these numbers
#: (the Psi bootstrap draws from one generator, measure after measure, in this order).
STUDY_MEASURES = sorted(load_config(Path(__file__).resolve().parents[2] / "examples" / "study.yaml").measure)
#: Jiang et al. 2020's measures (and a few more norms and curvatures) from the registry, added to
#: the finished sweep with `sweeps measure` (MEASURE_FLAGS), in the order of Jiang et al.'s
#: equations; STEPS is logged by every trial (optimizer steps to cross-entropy 0.1).
JIANG_MEASURES = [
    "param_count",  # eq. 20
    "inverse_margin",  # 22
    "log_prod_of_spec_over_margin",  # 31
    "log_prod_of_spec",  # 32
    "fro_over_spec",  # 33
    "log_prod_of_fro_over_margin",  # 36
    "log_prod_of_fro",  # 37
    "fro_dist_from_init",  # 40
    "spec_dist_from_init",  # 41
    "param_norm",  # 42
    "path_norm_over_margin",  # 43
    "path_norm",  # 44
    "fisher_rao_norm",
    "pacbayes_init",  # 48
    "pacbayes_orig",  # 49
    "sharpness_flatness",  # 1 / alpha'^2, plain
    "pacbayes_mag_init",  # 56
    "pacbayes_mag_orig",  # 57
    "sharpness_mag_flatness",  # 1 / alpha'^2, magnitude-aware
    "frobenius_norm_sum",
    "spectral_norm_sum",
    "ggn_trace",
    "fisher_trace",
]
STEPS = "steps_to_loss_0.1"
#: Options of the added measures (the study's own traces use rtol 0.05 too).
MEASURE_OPTIONS = {"ggn_trace": {"rtol": 0.05}, "fisher_trace": {"rtol": 0.05}}
#: Jiang et al. 2020's published values, only those /work/shared/REFERENCES.md states ("Jiang et al.
#: Table 1, CIFAR-10", marked "check" there: recalled, not read from the paper): their
#: "magnitude-aware worst-case sharpness" (1 / alpha'^2 here; which of their magnitude-aware
#: sharpness variants the note means is not stated). Every other row is blank.
JIANG_PUBLISHED = {"sharpness_mag_flatness": {"tau": 0.48, "Psi": 0.52}}


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


def measure_flags() -> list[str]:
    """The `sweeps measure` flags that add JIANG_MEASURES with MEASURE_OPTIONS."""
    flags = [f for m in JIANG_MEASURES for f in ("--metric", m)]
    return flags + [f"--set=measure_options.{m}.{k}={v}" for m, o in MEASURE_OPTIONS.items() for k, v in o.items()]


def jiang_table(grid: pd.DataFrame) -> pd.DataFrame:
    """tau, Psi and sign-error of every measure on the complete sub-grid (the study's measures
    first, in the report's order, so their numbers are the report's), with Jiang et al.'s
    published values where JIANG_PUBLISHED has them."""
    from landscape.metrics import METRICS

    present = [m for m in JIANG_MEASURES + [STEPS] if m in grid.columns]
    table = correlations(grid, measures=STUDY_MEASURES + present, n_boot=N_BOOT, allow_incomplete_grid=False)
    out = table[
        ["orientation", "n", "tau", "tau_ci_low", "tau_ci_high", "Psi", "Psi_ci_low", "Psi_ci_high"]
        + ["sign_error_max", "sign_error_mean", "n_environments"]
    ].copy()
    out.insert(0, "reference", [METRICS[m].reference if m in METRICS else "Jiang et al. 2020" for m in out.index])
    out["added"] = [m not in STUDY_MEASURES for m in out.index]
    out["jiang_tau"] = [JIANG_PUBLISHED.get(m, {}).get("tau", math.nan) for m in out.index]
    out["jiang_Psi"] = [JIANG_PUBLISHED.get(m, {}).get("Psi", math.nan) for m in out.index]
    return out


def connectivity_table(frame: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """sweeps.posthoc.connectivity.flatness_vs_connectivity over the converged configurations, N_BOOT resamples."""
    return flatness_vs_connectivity(frame, summary, [LR, BATCH, WIDTH], n_boot=N_BOOT)


def signed(value: float | None, low: float | None = None, high: float | None = None) -> str:
    """``+0.12`` or ``+0.12 [-0.05, +0.30]`` (the page's format); blank for ``None`` (no published
    value), ``-`` for NaN (undefined, e.g. psi of a measure tied within every group)."""
    if value is None:
        return ""
    if math.isnan(value):
        return "-"
    return f"{value:+.2f}" + ("" if low is None or high is None else f" [{low:+.2f}, {high:+.2f}]")


def page_tables(claims: dict) -> str:
    """The markdown tables of the page's sections 6 (Jiang et al. side by side) and 7 (flatness vs
    connectivity, taus turned so that + means sharper => higher barrier), from ``claims``."""
    lines = [
        "| measure | Kendall tau [95%] | Psi [95%] | sign-error max | Jiang et al. tau | Jiang et al. Psi |",
        "|---|---|---|---:|---:|---:|",
    ]
    for m, q in claims["jiang"].items():
        lines.append(
            f"| `{m}` | {signed(q['tau'], q['ci_low'], q['ci_high'])} | "
            f"{signed(q['Psi']['Psi'], q['Psi']['ci_low'], q['Psi']['ci_high'])} | {q['sign_error_max']:.2f} | "
            f"{signed(q['jiang_tau'])} | {signed(q['jiang_Psi'])} |"
        )
    if "connectivity" in claims:
        lines += ["", "| measure | loss barrier tau [95%] | error barrier tau [95%] |", "|---|---|---|"]
        for m, q in claims["connectivity"]["measures"].items():
            if q["larger_is"] not in ("sharper", "flatter"):
                continue
            sign = 1 if q["larger_is"] == "sharper" else -1
            cells = []
            for b in ("loss", "error"):
                low, high = sorted([sign * q[f"tau_{b}_ci_low"], sign * q[f"tau_{b}_ci_high"]])
                cells.append(signed(sign * q[f"tau_{b}"], low, high))
            lines.append(f"| `{m}` | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


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
    parser.add_argument("--results-dir", help="where `sweeps run examples/study.yaml` wrote")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="output folder (default: docs/study)")
    parser.add_argument("--measure-flags", action="store_true", help="print the `sweeps measure` flags and exit")
    args = parser.parse_args()
    if args.measure_flags:
        print(" ".join(measure_flags()))
        return
    if not args.results_dir:
        parser.error("--results-dir is required")
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
        measures=STUDY_MEASURES,
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

    jiang = jiang_table(grid)
    jiang.to_csv(out / "jiang.csv")
    claims["jiang"] = {
        m: {
            **interval(row),
            "Psi": interval(row, "Psi"),
            "sign_error_max": float(row["sign_error_max"]),
            "n_environments": int(row["n_environments"]),
            "added": bool(row["added"]),
            "jiang_tau": None if math.isnan(row["jiang_tau"]) else float(row["jiang_tau"]),
            "jiang_Psi": None if math.isnan(row["jiang_Psi"]) else float(row["jiang_Psi"]),
        }
        for m, row in jiang.iterrows()
    }

    pairs = seed_barriers(NAME, results_dir=args.results_dir)
    if not pairs.empty:
        configs = seed_barriers(NAME, results_dir=args.results_dir, summary=True)
        pairs.to_csv(out / "seed_pairs.csv", index=False)
        configs.to_csv(out / "seed_configs.csv", index=False)
        flat = connectivity_table(frame, configs)
        flat.to_csv(out / "connectivity.csv", index=False)
        claims["connectivity"] = {
            "n_pairs": len(pairs),
            "n_configs": len(configs),
            "loss_barrier_mean": float(pairs["loss_barrier"].mean()),
            "error_barrier_mean": float(pairs["error_barrier"].mean()),
            "connected_fraction": float(pairs["connected"].mean()),
            "measures": {
                row["measure"]: {k: v for k, v in row.items() if k != "measure"} for row in flat.to_dict("records")
            },
            "lines": connectivity_lines(flat),
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
    print("\nThe tables of the page's sections 6 and 7:\n")
    print(page_tables(claims))


if __name__ == "__main__":
    main()
