"""What a killed driver costs a long trial: uninterrupted, versus SIGKILLed at 60 % and resumed.

One trial (MLP 40-256-256-10 on MNIST-1D, 4000 samples, batch 32, SGD with momentum, a fixed
number of epochs, a checkpoint after every epoch) runs as a sweep through the CLI, each run on a
private local Ray and SQLite stores of its own:

* ``full``: the sweep uninterrupted (wall seconds from the command's start to its exit);
* ``killed + resumed``: the same sweep, the driver SIGKILLed once the trial's checkpoint is past
  60 % of its epochs, then ``sweeps resume`` after the lease period (timed: the resume alone).

It prints both times, their ratio and whether the final metrics are equal (they must be: the
resumed trial continues from its checkpoint). Run ``python benchmarks/bench_resume.py``
(``--epochs``, default 40).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import sweeps
from sweeps.trial import checkpoint

LEASE_SECONDS = 4.0
NUMBERS = ["train_loss", "train_acc", "test_loss", "test_acc", "epochs", "steps"]


def write_config(folder: Path, name: str, epochs: int) -> Path:
    config = {
        "name": name,
        "dataset": {"name": "mnist1d", "train_size": 4000, "test_size": 1000},
        "model": {"name": "mlp", "depth": 2, "width": 256},
        "train": {
            "optimizer": "sgd",
            "lr": 0.005,
            "momentum": 0.9,
            "batch_size": 32,
            "max_epochs": epochs,
            "stop": {},
            "checkpoint": {"every_epochs": 1, "every_seconds": 0},
        },
        "measure": [],
        "search": {"sampler": "grid", "space": {"seed": {"values": [0]}}},
        "resources": {"population_size": 1},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "SWEEPS_LEASE_SECONDS": str(LEASE_SECONDS)}
    return subprocess.Popen(
        [sys.executable, "-m", "sweeps.cli", *args, "--quiet", "--no-report"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def saved_epoch(folder: Path) -> int:
    for path in folder.glob("*.pt"):
        state = checkpoint.load(path)
        if state is not None:
            return int(state["epoch"])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        root = Path(tmp)
        full_dir, kill_dir = root / "full", root / "killed"
        start = time.monotonic()
        run = cli("run", str(write_config(root, "full", args.epochs)), "--results-dir", str(full_dir))
        assert run.wait() == 0, run.stderr.read() if run.stderr else ""
        full = time.monotonic() - start

        run = cli("run", str(write_config(root, "killed", args.epochs)), "--results-dir", str(kill_dir))
        folder = kill_dir / "checkpoints" / "killed"
        while run.poll() is None and saved_epoch(folder) < 0.6 * args.epochs:
            time.sleep(0.05)
        killed_at = saved_epoch(folder)
        run.send_signal(signal.SIGKILL)
        run.wait()
        time.sleep(LEASE_SECONDS + 0.5)
        start = time.monotonic()
        resume = cli("resume", "killed", "--results-dir", str(kill_dir))
        assert resume.wait() == 0, resume.stderr.read() if resume.stderr else ""
        resumed = time.monotonic() - start

        a = sweeps.results("full", results_dir=full_dir)[NUMBERS].to_numpy().tolist()
        b = sweeps.results("killed", results_dir=kill_dir)[NUMBERS].to_numpy().tolist()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.epochs} epochs")
    print(f"full run: {full:.1f} s wall")
    print(
        f"killed after epoch {killed_at} ({killed_at / args.epochs:.0%}), resume: {resumed:.1f} s wall "
        f"({resumed / full:.2f} of the full run)"
    )
    print(f"final metrics equal: {a == b}")


if __name__ == "__main__":
    main()
