"""Training throughput of the population core (:func:`sweeps.train.train_population`) against a
plain per-model ``torch.optim`` loop, in models per hour.

Task: MNIST-1D (4000 training, 1000 test samples), MLP 40-W-W-10 with ReLU, one epoch per
model, SGD with momentum 0.9, a different lr and seed per model, one torch thread.

* plain loop (the baseline, written here): per model, ``torch.optim.SGD``, ``randperm`` data
  order, plus the evaluations the core also does for an epoch (train and test loss/accuracy at
  the start and at the end of the epoch: what ``train()`` has always done).
* population core: the K models as one stack through ``train_population`` (K = 1 is what
  ``train()`` runs).

Both run in this process, alternately, best of ``--repeats``. Times are CPU seconds of this
(single-threaded) process, ``time.process_time``: on a shared machine they do not count the
time other processes hold the core, and on an idle one they equal wall time. The table prints
seconds per K models, models/hour and the ratio plain/core (how many times more models per
hour the core trains). Run ``python benchmarks/bench_population.py``
(``--quick`` for K in {1, 16}, width 64, batch 32). Figures: ``benchmarks/population.md``.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
import torch.nn.functional as F

from sweeps.config import load_config
from sweeps.data import load_dataset
from sweeps.models import build_model
from sweeps.train import evaluate, train_population


def configs(k: int, width: int, batch: int) -> list:
    return [load_config({"name": "bench", "seed": i, "model": {"name": "mlp", "width": width, "depth": 2},
                         "train": {"lr": 0.01 * (1 + 0.1 * i), "momentum": 0.9, "batch_size": batch, "max_epochs": 1, "stop": {}},
                         "measure": []}) for i in range(k)]


def plain_loop(cfgs, data) -> float:
    """CPU seconds for the plain torch.optim loop over the models of ``cfgs``, one after another."""
    start = time.process_time()
    x, y, n = data.x_train, data.y_train, data.n_train
    for c in cfgs:
        model = build_model(c.model, data.input_shape, data.num_classes, seed=c.seed)
        opt = torch.optim.SGD(model.parameters(), lr=c.train.lr, momentum=c.train.momentum)
        gen = torch.Generator().manual_seed(c.seed)
        for split in ((x, y), (data.x_test, data.y_test)):
            evaluate(model, F.cross_entropy, *split)
        for idx in torch.randperm(n, generator=gen).split(c.train.batch_size):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            math.isfinite(float(loss.detach()))  # the per-step divergence check reads the loss
        for split in ((x, y), (data.x_test, data.y_test)):
            evaluate(model, F.cross_entropy, *split)
    return time.process_time() - start


def core(cfgs, data) -> float:
    """CPU seconds for the same models trained as one population (model building included)."""
    start = time.process_time()
    models = [build_model(c.model, data.input_shape, data.num_classes, seed=c.seed) for c in cfgs]
    train_population(models, data, [c.train for c in cfgs], seeds=[c.seed for c in cfgs])
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K in {1, 16}, width 64, batch 32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(configs(1, 64, 32)[0].dataset)
    ks, widths, batches = ([1, 16], [64], [32]) if args.quick else ([1, 4, 16, 64], [64, 256], [32, 256])
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread; "
          f"MNIST-1D n={data.n_train}, one epoch per model, best of {args.repeats}")
    print("| width | batch | K | plain loop (CPU s) | core (CPU s) | plain models/h | core models/h | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    core(configs(2, 64, 32), data)  # warm up
    for width in widths:
        for batch in batches:
            for k in ks:
                cfgs = configs(k, width, batch)
                times = {"plain": math.inf, "core": math.inf}
                for _ in range(args.repeats):
                    times["plain"] = min(times["plain"], plain_loop(cfgs, data))
                    times["core"] = min(times["core"], core(cfgs, data))
                per_hour = {name: 3600 * k / t for name, t in times.items()}
                print(f"| {width} | {batch} | {k} | {times['plain']:.3f} | {times['core']:.3f} | {per_hour['plain']:,.0f} | "
                      f"{per_hour['core']:,.0f} | {times['plain'] / times['core']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
