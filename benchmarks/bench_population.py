"""Training throughput of the population core against a plain per-model ``torch.optim`` loop,
in models per hour.

Task: MNIST-1D (4000 training, 1000 test samples), MLP 40-W-W-10 with ReLU, one epoch per
model, SGD with momentum 0.9, a different lr and seed per model, one torch thread.

Two comparisons, each against a baseline written here and run in this process:

* steps: one epoch of optimizer steps. Baseline: per model, ``torch.optim.SGD`` on
  ``randperm`` mini-batches, reading each step's loss (the divergence check does). Stack: the
  K models as one :class:`sweeps.trial.population.Stack`, the step the core runs.
* whole: ``train_population`` (everything a trial's training does: the evaluations of the
  train and test sets at the start and end of the epoch, the per-member checks, members
  leaving the stack) against the baseline plus the same four evaluations per model (what
  ``train()`` has always done). K = 1 is what ``train()`` runs now.
* compiled (``resources.compile``, :mod:`sweeps.trial.compiled_step`): the same steps and the same
  ``train_population`` with the compiled step and evaluations, timed once compiled (the
  programs are compiled in a warm-up run of the same shape); ``compile`` is the extra CPU time
  of that first run (inductor's on-disk cache warm from earlier runs: a cold cache costs more).

Times are CPU seconds of this single-threaded process (``time.process_time``, best of
``--repeats``, the two sides alternating): on a shared machine they leave out the time other
processes hold the core; on an idle one they equal wall time. Speed-up = baseline / ours.
Run ``python benchmarks/bench_population.py`` (``--quick``: K in {1, 16}, width 64, batch 32).
Figures: ``benchmarks/population.md``.
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import time

import torch
import torch.nn.functional as F

from sweeps.spec.config import load_config
from sweeps.trial.compiled_step import CompiledStack
from sweeps.trial.data import load_dataset
from sweeps.trial.models import build_model
from sweeps.trial.population import Stack
from sweeps.trial.train import evaluate, member_losses, train_population


def configs(k: int, width: int, batch: int) -> list:
    return [
        load_config(
            {
                "name": "bench",
                "seed": i,
                "model": {"name": "mlp", "width": width, "depth": 2},
                "train": {
                    "lr": 0.01 * (1 + 0.1 * i),
                    "momentum": 0.9,
                    "batch_size": batch,
                    "max_epochs": 1,
                    "stop": {},
                },
                "measure": [],
            }
        )
        for i in range(k)
    ]


def plain_loop(cfgs, data, *, evaluations: bool) -> float:
    """CPU seconds for the plain torch.optim loop over the models of ``cfgs``, one after
    another, with or without the train/test evaluations at the start and end."""
    start = time.process_time()
    x, y, n = data.x_train, data.y_train, data.n_train
    splits = ((x, y), (data.x_test, data.y_test)) if evaluations else ()
    for c in cfgs:
        model = build_model(c.model, data.input_shape, data.num_classes, seed=c.seed)
        opt = torch.optim.SGD(model.parameters(), lr=c.train.lr, momentum=c.train.momentum)
        gen = torch.Generator().manual_seed(c.seed)
        for split in splits:
            evaluate(model, F.cross_entropy, *split)
        for idx in torch.randperm(n, generator=gen).split(c.train.batch_size):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            math.isfinite(float(loss.detach()))
        for split in splits:
            evaluate(model, F.cross_entropy, *split)
    return time.process_time() - start


def stacked_steps(cfgs, data) -> float:
    """CPU seconds for one epoch of steps of the models of ``cfgs`` as one Stack."""
    start = time.process_time()
    x, y, n = data.x_train, data.y_train, data.n_train
    stack = Stack(
        [build_model(c.model, data.input_shape, data.num_classes, seed=c.seed) for c in cfgs], [c.train for c in cfgs]
    )
    loss_fn = functools.partial(member_losses, "cross_entropy")
    lrs = [c.train.lr for c in cfgs]
    orders = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(c.seed)) for c in cfgs])
    for idx in orders.split(cfgs[0].train.batch_size, dim=1):
        grad, losses, _ = stack.gradient(loss_fn, x[idx], y[idx])
        stack.step(grad, lrs)
        [math.isfinite(v) for v in losses.tolist()]
    return time.process_time() - start


def compiled_steps(cfgs, data, dynamic: bool = True) -> float:
    """CPU seconds for one epoch of steps of the models of ``cfgs`` as one compiled stack
    (``dynamic=False``: a program specialized to this K, the alternative to a dynamic K)."""
    start = time.process_time()
    x, y, n = data.x_train, data.y_train, data.n_train
    stack = Stack(
        [build_model(c.model, data.input_shape, data.num_classes, seed=c.seed) for c in cfgs], [c.train for c in cfgs]
    )
    step = CompiledStack(stack, "cross_entropy")
    if not dynamic:
        step._step = torch.compile(step._step._torchdynamo_orig_callable, dynamic=False)
    lrs = [c.train.lr for c in cfgs]
    orders = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(c.seed)) for c in cfgs])
    for idx in orders.split(cfgs[0].train.batch_size, dim=1):
        if dynamic:
            losses = step.train_step(x[idx], y[idx], lrs)
        else:
            losses = step._step(stack.params.flat, step._state(), x[idx], y[idx], step._columns(lrs))[2]
        [math.isfinite(v) for v in losses.tolist()]
    return time.process_time() - start


def core(cfgs, data, compile: bool = False) -> float:
    """CPU seconds for the same models trained by ``train_population`` (model building included)."""
    start = time.process_time()
    models = [build_model(c.model, data.input_shape, data.num_classes, seed=c.seed) for c in cfgs]
    train_population(models, data, [c.train for c in cfgs], seeds=[c.seed for c in cfgs], compile=compile)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K in {1, 16}, width 64, batch 32")
    parser.add_argument("--ks", type=int, nargs="*", help="the K to run (default 1 4 16 64)")
    parser.add_argument("--widths", type=int, nargs="*", help="default 64 256")
    parser.add_argument("--batches", type=int, nargs="*", help="default 32 256")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(configs(1, 64, 32)[0].dataset)
    ks, widths, batches = ([1, 16], [64], [32]) if args.quick else ([1, 4, 16, 64], [64, 256], [32, 256])
    ks, widths, batches = args.ks or ks, args.widths or widths, args.batches or batches
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread; "
        f"MNIST-1D n={data.n_train}, one epoch per model, CPU seconds, best of {args.repeats}"
    )
    print(
        "| width | batch | K | steps: plain (s) | stack (s) | compiled (s) | stack speed-up | compiled speed-up "
        "| whole: plain (s) | core (s) | core compiled (s) | core speed-up | compiled speed-up | compile (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    core(configs(2, 64, 32), data)  # warm up
    runs = {
        "steps: plain": lambda c: plain_loop(c, data, evaluations=False),
        "steps: stack": lambda c: stacked_steps(c, data),
        "steps: compiled": lambda c: compiled_steps(c, data),
        "whole: plain": lambda c: plain_loop(c, data, evaluations=True),
        "whole: core": lambda c: core(c, data),
        "whole: compiled": lambda c: core(c, data, compile=True),
    }
    for width in widths:
        for batch in batches:
            for k in ks:
                cfgs = configs(k, width, batch)
                first = core(cfgs, data, compile=True) + compiled_steps(cfgs, data)  # compiles this shape's programs
                t = {name: min(run(cfgs) for _ in range(args.repeats)) for name, run in runs.items()}
                compile_s = first - t["whole: compiled"] - t["steps: compiled"]
                p, w = t["steps: plain"], t["whole: plain"]
                print(
                    f"| {width} | {batch} | {k} | {p:.3f} | {t['steps: stack']:.3f} | {t['steps: compiled']:.3f} | "
                    f"{p / t['steps: stack']:.2f}x | **{p / t['steps: compiled']:.2f}x** | {w:.3f} | "
                    f"{t['whole: core']:.3f} | {t['whole: compiled']:.3f} | {w / t['whole: core']:.2f}x | "
                    f"**{w / t['whole: compiled']:.2f}x** | {compile_s:.1f} |",
                    flush=True,
                )
    if args.quick:
        return
    print("\nMembers leaving: compiled steps of one epoch, width 64, batch 32 (dynamic K vs a program per K)")
    print("| K | dynamic K (s) | static K (s) |\n|---:|---:|---:|")
    for k in (4, 8, 16):
        cfgs = configs(k, 64, 32)
        compiled_steps(cfgs, data, dynamic=False)
        dyn, static = (min(compiled_steps(cfgs, data, d) for _ in range(args.repeats)) for d in (True, False))
        print(f"| {k} | {dyn:.3f} | {static:.3f} |", flush=True)


if __name__ == "__main__":
    main()
