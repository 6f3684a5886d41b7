"""The cost of trial checkpoints: one trial of ``examples/report.yaml`` trained with and without them.

The trial: the sweep's largest and slowest model (MLP 40-256-256-10, batch 32, lr 0.005, SGD with
momentum 0.9, MNIST-1D 4000 samples), a fixed number of epochs (``stop: {}``), one torch thread,
in this process. Three settings alternate, best of ``--repeats`` each:

* ``off``: ``train.checkpoint`` both 0;
* ``default``: the defaults (``every_seconds: 60``, ``every_epochs: 0``);
* ``every epoch``: a checkpoint after every epoch (a stress setting, to measure one checkpoint).

Times are CPU seconds of this process (``time.process_time``: on a shared machine they leave out
the time other processes hold the core) plus, separately, the wall seconds of the checkpoints'
writes (their ``fsync`` waits for the disk, which CPU time does not count). The overhead at the
default cadence is one checkpoint's cost per 60 s of training.

Run ``python benchmarks/bench_checkpoint.py`` (``--epochs``, ``--repeats``).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from sweeps.spec.config import load_config
from sweeps.trial import checkpoint
from sweeps.trial.data import load_dataset
from sweeps.trial.models import build_model
from sweeps.trial.train import train_population

ROOT = Path(__file__).resolve().parents[1]


def one_run(cfg, data, folder: Path) -> tuple[float, float, int]:
    """(CPU seconds of training, wall seconds in checkpoint writes, checkpoints written)."""
    model = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.seed)
    path = checkpoint.checkpoint_path(folder, cfg)
    writes = []
    real_save = checkpoint.save

    def timed_save(p, state):
        start = time.perf_counter()
        real_save(p, state)
        writes.append(time.perf_counter() - start)

    checkpoint.save = timed_save
    try:
        start = time.process_time()
        train_population([model], data, [cfg.train], seeds=[cfg.seed], checkpoint_paths=[path])
        return time.process_time() - start, sum(writes), len(writes)
    finally:
        checkpoint.save = real_save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_config(ROOT / "examples" / "report.yaml").with_point(
        {
            "train.lr": 0.005,
            "train.batch_size": 32,
            "model.width": 256,
            "seed": 0,
            "train.max_epochs": args.epochs,
            "train.stop": {},
        }
    )
    settings = {
        "off": {"train.checkpoint.every_epochs": 0, "train.checkpoint.every_seconds": 0},
        "default": {},
        "every epoch": {"train.checkpoint.every_epochs": 1, "train.checkpoint.every_seconds": 0},
    }
    data = load_dataset(base.dataset)
    best: dict[str, tuple[float, float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, point in settings.items():
                cpu, wall, count = one_run(base.with_point(point), data, Path(tmp) / name)
                if name not in best or cpu < best[name][0]:
                    best[name] = (cpu, wall, count)
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*.pt")) / max(1, len(list(Path(tmp).rglob("*.pt"))))
    off = best["off"][0]
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, "
        f"torch {torch.__version__}; {args.epochs} epochs, best of {args.repeats}"
    )
    print(f"{'setting':<12} {'CPU s':>8} {'vs off':>8} {'checkpoints':>12} {'write wall s':>13}")
    for name, (cpu, wall, count) in best.items():
        print(f"{name:<12} {cpu:8.2f} {cpu / off - 1:+8.1%} {count:12d} {wall:13.3f}")
    cpu, wall, count = best["every epoch"]
    per = max(0.0, (cpu - off) / count) + wall / count
    print(
        f"one checkpoint ({size / 2**20:.1f} MiB): {per * 1000:.1f} ms (CPU over 'off' + wall of the write); "
        f"at the default cadence (one per 60 s of training): {per / 60:.3%} of training time"
    )


if __name__ == "__main__":
    main()
