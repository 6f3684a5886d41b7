"""Benchmark: landscape.surface_2d against loss-landscapes' random_plane, a naive per-point loop,
and matmul peak.

Usage:
    python benchmarks/bench_surface.py [--steps 41] [--threads N] [--naive-points-large 48] [--widths 64,512]

Workload: a ``steps x steps`` filter-normalized surface (default 41 x 41 = 1681 points) of the
cross-entropy over the 4000 MNIST-1D training samples (generated offline), for an MLP
40-64-64-10 and an MLP 40-512-512-10 (untrained: timing does not depend on the weights).

* ``surface_2d``: this library with its defaults (no model copies; on a CPU a plain MLP goes
  several points per pass into reused buffers, see :mod:`landscape.evaluate`), and variants:
  the first-layer affine trick forced on, chunks sized by the memory budget as on a GPU
  (``micro_batch=None``), and the loss
  wrapped so that torch's ``log_softmax`` computes it.
* ``loss-landscapes``: the reference row, ``loss_landscapes.random_plane`` (``pip install
  loss-landscapes``; the row is skipped with a message if it is not installed) on the same
  model, data and number of points, with its loss metric (``Loss(loss_fn, x, y)``: loss only,
  no accuracy; surface_2d computes both). Its plane has its own random directions; the work per
  point is the same. The last column is its time divided by each row's (above 1: faster than
  loss-landscapes).
* ``naive loop``: what a straightforward tool does for every point: deep-copy the model, add
  ``alpha d1 + beta d2`` to its weights in place, evaluate. For the large model it runs on an
  evenly spread subset of the points and its time is extrapolated to the full grid (marked
  ``*``); the loss values of those points are compared with the surface's.

GFLOP/s counts the matmul FLOPs of the forward passes (``torch.utils.flop_counter``), and
"% peak" divides by the best rate of a 2048 x 2048 float32 matmul timed in the same process
(before and after, the larger kept). Every method runs once per round for ``--repeats`` rounds
(default 3) and keeps its fastest; a naive subset is timed before and after and the faster run
kept. The machine may be shared: rerun for stable figures.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import landscape
from landscape import evaluate
from landscape.evaluate import WORKING_SET
from landscape.surface import centered_grid


def mnist1d_train() -> tuple[torch.Tensor, torch.Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # generated offline (never get_dataset: it downloads)
    return torch.as_tensor(d["x"], dtype=torch.float32), torch.as_tensor(d["y"], dtype=torch.long)


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of an ``n x n`` float32 matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops_per_point(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def naive_losses(model, loss_fn, x, y, directions, coords) -> tuple[np.ndarray, float]:
    """Per point: deep copy, move the weights in place, evaluate. Returns (losses, seconds)."""
    d1, d2 = directions
    losses = []
    start = time.perf_counter()
    for a, b in coords:
        moved = copy.deepcopy(model).eval()
        with torch.no_grad():
            for name, p in moved.named_parameters():
                p.add_(a * d1[name] + b * d2[name])
            losses.append(float(loss_fn(moved(x), y)))
    return np.array(losses), time.perf_counter() - start


def loss_landscapes_plane(model, loss_fn, x, y, steps: int) -> float | None:
    """Seconds of ``loss_landscapes.random_plane`` on ``steps x steps`` points (filter-normalized
    directions, as surface_2d), or ``None`` when the package is not installed."""
    try:
        import loss_landscapes
        from loss_landscapes.metrics import Loss
    except ImportError:
        return None
    start = time.perf_counter()
    loss_landscapes.random_plane(
        model, Loss(loss_fn, x, y), distance=1, steps=steps, normalization="filter", deepcopy_model=True
    )
    return time.perf_counter() - start


def with_affine_trick(fn):
    """``fn`` run with the first-layer affine trick forced on (whatever the input width)."""

    def forced(*args, **kwargs):
        saved, evaluate.AFFINE_MIN_RATIO = evaluate.AFFINE_MIN_RATIO, 0
        try:
            return fn(*args, **kwargs)
        finally:
            evaluate.AFFINE_MIN_RATIO = saved

    return forced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=41, help="grid points per axis (default 41)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--naive-points-large", type=int, default=48, help="naive-loop subset for the large model")
    parser.add_argument(
        "--naive-points-small", type=int, default=None, help="naive-loop subset for the small model (default: all)"
    )
    parser.add_argument("--widths", default="64,512", help="MLP widths to run (default 64,512)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds over all methods; each keeps its fastest (default 3)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = mnist1d_train()
    loss_fn = nn.CrossEntropyLoss()
    peak = matmul_peak()
    points = args.steps**2
    rows = []
    widths = [int(w) for w in args.widths.split(",")]
    missing_reference = False
    for width in widths:
        subset = args.naive_points_small if width <= 64 else args.naive_points_large
        model = mlp(width)
        flops = flops_per_point(model, x)
        label = f"MLP 40-{width}-{width}-10"
        surface = landscape.surface_2d(model, loss_fn, (x, y), steps=3)  # warm-up; its directions
        directions = surface.directions
        grid = centered_grid(1.0, args.steps)
        a, b = np.meshgrid(grid, grid, indexing="ij")
        coords = np.column_stack([a.reshape(-1), b.reshape(-1)])
        pick = np.arange(points) if not subset or subset >= points else np.linspace(0, points - 1, subset).astype(int)
        # the load of a shared machine drifts: time a naive subset before and after, keep the faster
        naive, naive_s = naive_losses(model, loss_fn, x, y, directions, coords[pick])
        timings = {}
        wrapped = lambda out, target: loss_fn(out, target)  # noqa: E731 (not recognized: torch's log_softmax)
        variants = (
            ("surface_2d", loss_fn, {}, landscape.surface_2d),
            ("  affine trick", loss_fn, {}, with_affine_trick(landscape.surface_2d)),
            ("  budget chunks", loss_fn, {"micro_batch": None}, landscape.surface_2d),
            ("  torch CE", wrapped, {}, landscape.surface_2d),
        )
        # the load of a shared machine drifts: every method runs once per round, rounds repeat,
        # and each method's fastest round is kept
        reference = None
        for _ in range(args.repeats):
            seconds = loss_landscapes_plane(model, loss_fn, x, y, args.steps)
            reference = seconds if reference is None or seconds is None else min(reference, seconds)
            for method, loss, options, fn in variants:
                start = time.perf_counter()
                s = fn(model, loss, (x, y), steps=args.steps, **options)
                timings[method] = min(timings.get(method, np.inf), time.perf_counter() - start)
                surface = s if method == "surface_2d" else surface
        if reference is not None:
            timings["loss-landscapes"] = reference
        missing_reference |= reference is None
        if len(pick) < points:  # a subset is cheap to time twice
            naive_s = min(naive_s, naive_losses(model, loss_fn, x, y, directions, coords[pick])[1])
        naive_full = naive_s * points / len(pick)
        values = surface.loss.reshape(-1)
        max_rel = float(np.max(np.abs(naive - values[pick]) / np.abs(naive)))
        note = "" if len(pick) == points else f"* {len(pick)} pts"
        for method, secs, extra in [(m, t, "") for m, t in timings.items()] + [("naive loop", naive_full, note)]:
            rate = flops * points / secs / 1e9
            vs_reference = float("nan") if reference is None else reference / secs
            rows.append(
                (
                    label,
                    method,
                    secs,
                    1e3 * secs / points,
                    rate,
                    100 * rate / peak,
                    naive_full / secs,
                    vs_reference,
                    extra,
                )
            )
        print(
            f"{label}: {flops / 1e6:.1f} MFLOP/point, max relative difference naive vs surface_2d {max_rel:.1e}",
            flush=True,
        )
    peak = max(peak, matmul_peak())
    print(
        f"\nmatmul peak (2048^3 float32, best of 5, before/after): {peak:.1f} GFLOP/s; "
        f"threads {torch.get_num_threads()}; grid {args.steps}x{args.steps} = {points} points, 4000 samples"
    )
    print(
        f"{'model':<22}{'method':<17}{'seconds':>9}{'ms/pt':>9}{'GFLOP/s':>9}{'% peak':>8}{'vs naive':>9}{'vs l-l':>8}  note"
    )
    for label, method, secs, ms, rate, pct, ratio, vs_reference, note in rows:
        pct = 100 * rate / peak
        print(
            f"{label:<22}{method:<17}{secs:>9.2f}{ms:>9.2f}{rate:>9.1f}{pct:>8.1f}{ratio:>8.2f}x{vs_reference:>7.2f}x  {note}"
        )
    if missing_reference:
        print("loss-landscapes is not installed (pip install loss-landscapes): its reference row is skipped")
    print("* naive time extrapolated from the subset of points to the full grid")
    print(
        f"surface_2d: the default (micro_batch='auto': on a CPU a plain MLP goes up to {evaluate.MAX_STACK} points per"
        f" pass in {evaluate.STACK_BYTES // 2**20} MiB, other models one point per pass in pieces of at most"
        f" {WORKING_SET // 2**20} MiB; plain cross-entropy and accuracy from one shift by the row maxima)"
    )
    print(
        "'affine trick': the default plan with the first-layer affine trick forced on (default: only for inputs"
        f" >= {evaluate.AFFINE_MIN_RATIO}x the basis terms)"
    )
    print("'budget chunks': surface_2d(..., micro_batch=None), chunks of points sized by the memory budget (GPU plan)")
    print("'loss-landscapes': loss_landscapes.random_plane, loss only (no accuracy); 'vs l-l': its time / the row's")
    print("'torch CE': the default plan with the loss wrapped in a lambda, so torch's log_softmax computes it")


if __name__ == "__main__":
    main()
