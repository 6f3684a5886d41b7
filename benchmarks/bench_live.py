"""The live correlation at study scale: what one update costs, and what it costs the driver.

A synthetic sweep (a grid learning rate x batch size x width x seed, the 14 measures of
``examples/report.yaml``, a few non-converged trials) of up to 10,000 trials is fed to
:class:`sweeps.service.live.LiveCorrelation` as a driver would. Prints two tables:

1. **One update** at 1,000 and 10,000 trials: seconds for the tau table (tau-b and its
   200-resample bootstrap interval per measure) and for the 14 figures.
2. **The driver's loop with and without the live updates**: a stand-in for the driver's own
   work per recorded trial (JSON round trips of its record, ``--per-trial-ms`` per trial, default
   5 ms, i.e. 200 trials/s: faster than the driver records real trials), run for all the trials, once alone and once adding each trial to a
   ``LiveCorrelation`` and polling it, with the update interval of a real sweep (10 s, or ten
   times the last update's duration). Ratio = with / without: how much the live view slows the
   driver. The final update (computed when the sweep ends) is timed apart. MLflow writes are
   replaced by a no-op, to time the view, not the store.

Run: ``python benchmarks/bench_live.py [--trials 10000]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sweeps.service.live import LIVE_BOOTSTRAP, UPDATE_SECONDS, LiveCorrelation
from sweeps.spec.config import load_config

SPACE = ["train.lr", "train.batch_size", "model.width", "seed"]


def synthetic_sweep(n_trials: int, measures: list[str]) -> pd.DataFrame:
    """``n_trials`` rows of a grid over SPACE (10 seeds per configuration), measures = gap + noise."""
    rng = np.random.default_rng(0)
    n_configs = max(1, n_trials // 10)
    lrs = np.geomspace(1e-3, 1.0, max(1, round(n_configs ** (1 / 3))))
    batches = [16, 32, 64, 128, 256, 512, 1024, 4000][: max(1, round(n_configs ** (1 / 3)))]
    widths = list(range(16, 16 * (n_configs // (len(lrs) * len(batches)) + 2), 16))
    rows = []
    for number, (lr, batch, width, seed) in enumerate(itertools.product(lrs, batches, widths, range(10))):
        if number == n_trials:
            break
        gap = 0.1 + 0.05 * np.log10(batch) - 0.02 * np.log10(lr) + 0.02 * rng.standard_normal()
        row = {
            "trial_number": number,
            "status": "not_converged" if number % 23 == 0 else "converged",
            "train.lr": float(lr),
            "train.batch_size": batch,
            "model.width": width,
            "seed": seed,
            "gen_gap": gap,
            "test_acc": 0.9 - gap,
            "n_test": 1000,
        }
        row.update({m: float(abs(gap * (i + 1) + rng.standard_normal())) for i, m in enumerate(measures)})
        rows.append(row)
    return pd.DataFrame(rows)


def driver_work(row: dict, measures: list[str], rounds: int) -> None:
    """The stand-in for the driver's own Python per trial: ``rounds`` JSON round trips of its record."""
    payload = json.dumps({"metrics": {m: row[m] for m in measures}, "params": {k: row[k] for k in SPACE}})
    for _ in range(rounds):
        payload = json.dumps(json.loads(payload))


def rounds_for(ms: float, row: dict, measures: list[str]) -> int:
    """JSON round trips that take about ``ms`` milliseconds on this machine."""
    started = time.perf_counter()
    driver_work(row, measures, 1000)
    return max(1, round(ms / ((time.perf_counter() - started) * 1000 / 1000)))


def feed(live: LiveCorrelation | None, frame: pd.DataFrame, measures: list[str], rounds: int) -> float:
    """Seconds of the driver stand-in over every row of ``frame``, adding each to ``live``."""
    started = time.perf_counter()
    for row in frame.to_dict("records"):
        driver_work(row, measures, rounds)
        if live is not None:
            live.add(
                row["trial_number"],
                row["status"],
                {k: row[k] for k in SPACE},
                {k: row[k] for k in ("gen_gap", "test_acc", "n_test", *measures)},
            )
            live.poll()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument(
        "--per-trial-ms",
        type=float,
        default=5.0,
        help="the driver's own work per trial (5 ms: 10,000 trials in under a minute, 200 trials/s)",
    )
    args = parser.parse_args()
    measures = list(load_config(Path(__file__).parent.parent / "examples" / "report.yaml").measure)
    big = synthetic_sweep(args.trials, measures)

    print(f"One update ({LIVE_BOOTSTRAP} bootstrap resamples, {len(measures)} measures); this machine\n")
    print("| trials | models | tau table (s) | figures (s) |")
    print("|---:|---:|---:|---:|")
    for n in sorted({min(1_000, args.trials), args.trials}):
        frame = big.iloc[:n]
        live = LiveCorrelation("gen_gap", SPACE, lambda *_: None, print, interval=0.0)
        from sweeps.analysis import tau_table

        t0 = time.perf_counter()
        table = tau_table(frame, "gen_gap", n_boot=LIVE_BOOTSTRAP)
        t1 = time.perf_counter()
        live._figures_for(frame, list(table.index))
        t2 = time.perf_counter()
        print(f"| {n:,} | {table.attrs['n_models']:,} | {t1 - t0:.2f} | {t2 - t1:.2f} |")

    rounds = rounds_for(args.per_trial_ms, big.iloc[0].to_dict(), measures)
    alone = feed(None, big, measures, rounds)
    updates: list[int] = []
    live = LiveCorrelation(
        "gen_gap", SPACE, lambda metrics, step, _: updates.append(step), print, interval=UPDATE_SECONDS
    )
    with_live = feed(live, big, measures, rounds)
    t0 = time.perf_counter()
    live.close()
    final = time.perf_counter() - t0
    print(
        f"\nThe driver's loop over {len(big):,} trials (update interval {UPDATE_SECONDS:g} s or 10x the last update)\n"
    )
    print("| without live (s) | with live (s) | ratio | updates during the loop | final update at the end (s) |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {alone:.1f} | {with_live:.1f} | {with_live / alone:.2f}x | {len(updates) - 1} | {final:.1f} |")


if __name__ == "__main__":
    main()
