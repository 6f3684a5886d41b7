"""End to end: a real sweep with one trial per task against the same sweep with populations.

Runs ``sweeps run CONFIG`` twice in fresh results folders, with ``resources.population_size``
``1`` (one model per Ray task, as before populations) and ``auto``, each as its own driver
process starting its own local Ray, one after the other. Prints a table:

* wall seconds of each run and their ratio (target >= 2.5x for examples/report.yaml on the
  2-core machine);
* whether every grid point got the same status in both runs;
* the correlation table's Kendall tau per measure in each run, with the other run's 95 %
  bootstrap interval, and whether each tau lies inside the other run's interval ("the same
  conclusions"). The runs train different floating-point programs (one stacked, one not), so
  the numbers differ in their last digits and, through the convergence checks, in the epochs
  at which models stop: the conclusions are compared, not the bits.

Run: ``python benchmarks/bench_population_sweep.py [--config examples/report.yaml] [--set KEY=VALUE ...]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

import sweeps
from sweeps.spec.config import load_config


def run(config: str, population_size: str, results_dir: Path, overrides: Sequence[str] = ()) -> float:
    """Wall seconds of one ``sweeps run`` (its own local Ray) with the given population size and
    ``overrides`` (``KEY=VALUE``, as ``--set``)."""
    command = [
        sys.executable,
        "-m",
        "sweeps.cli",
        "run",
        config,
        "--results-dir",
        str(results_dir),
        "--set",
        f"resources.population_size={population_size}",
        *[arg for override in overrides for arg in ("--set", override)],
        "--quiet",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/report.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for both runs, as sweeps run --set (e.g. resources.compile=false)",
    )
    args = parser.parse_args()
    config = load_config(args.config)
    space = list(config.search.space)
    with tempfile.TemporaryDirectory(prefix="bench-population-sweep-") as tmp:
        dirs = {size: Path(tmp, f"k-{size}") for size in ("1", "auto")}
        seconds = {size: run(args.config, size, path, args.overrides) for size, path in dirs.items()}
        frames = {size: sweeps.results(config.name, results_dir=path) for size, path in dirs.items()}
        tables = {
            size: pd.read_csv(path / "reports" / config.name / "correlations.csv", index_col=0)
            for size, path in dirs.items()
        }

    print(f"sweep {config.name} ({len(frames['1'])} trials), 2-core machine, one driver and local Ray per run\n")
    print("| population_size | wall (s) | statuses |")
    print("|---|---:|---|")
    for size in seconds:
        counts = frames[size]["status"].value_counts().sort_index()
        print(f"| {size} | {seconds[size]:.0f} | {', '.join(f'{k}={v}' for k, v in counts.items())} |")
    print(f"\nspeed-up (1 / auto): {seconds['1'] / seconds['auto']:.2f}x (target >= 2.5x)")

    statuses = [f.set_index(space)["status"].sort_index() for f in frames.values()]
    same = statuses[0].equals(statuses[1])
    print(f"same status for every grid point: {'yes' if same else 'no'}")
    if not same:
        print(pd.concat(statuses, axis=1, keys=list(frames)).loc[lambda d: d.iloc[:, 0] != d.iloc[:, 1]])

    accuracies = [f.set_index(space)["test_acc"].sort_index() for f in frames.values()]
    print(f"largest test accuracy difference at one grid point: {(accuracies[0] - accuracies[1]).abs().max():.4f}")

    one, auto = tables["1"], tables["auto"]
    print("\n| measure | tau (1) | 95% interval (1) | tau (auto) | 95% interval (auto) | each inside the other's |")
    print("|---|---:|---|---:|---|---|")
    agree = 0
    for measure in one.index.intersection(auto.index):
        a, b = one.loc[measure], auto.loc[measure]
        inside = a["tau_ci_low"] <= b["tau"] <= a["tau_ci_high"] and b["tau_ci_low"] <= a["tau"] <= b["tau_ci_high"]
        agree += bool(inside)
        print(
            f"| {measure} | {a['tau']:.3f} | [{a['tau_ci_low']:.3f}, {a['tau_ci_high']:.3f}] | {b['tau']:.3f} "
            f"| [{b['tau_ci_low']:.3f}, {b['tau_ci_high']:.3f}] | {'yes' if inside else 'no'} |"
        )
    print(f"\nsame conclusions: {agree} of {len(one.index.intersection(auto.index))} measures")


if __name__ == "__main__":
    main()
