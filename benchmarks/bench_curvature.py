"""Curvature benchmark: Lanczos vs power iteration for lambda_max, and the cost of one HVP.

Model: MLP 40-512-512-10 (ReLU, P = 288,778), briefly trained with Adam on the 4,000-sample
MNIST-1D training set (generated offline), so the Hessian is that of a trained network.

Prints two groups of tables:

1. ``hessian_eigenvalues(k=1, tol=1e-3)`` (Lanczos, the default) beside power iteration run
   the way PyHessian runs it (stop when the relative change < 1e-3, at most 100 iterations):
   seconds, HVPs and relative error against a tight reference (float64 Lanczos, tol 1e-9),
   and Lanczos started from the top eigenvector of a 500-sample subset's Hessian (``v0``);
   the HVP counts of both from several start seeds beside the Krylov floor (the fewest HVPs
   after which a Rayleigh-quotient estimate from that start can be within 1e-3); then how many
   HVPs power iteration needs to be within 1e-3 of that reference at all.
2. The cost of one HVP as a multiple of one gradient, for double backward and
   forward-over-reverse, and a block of 8 vmapped products against 8 sequential ones; then
   a block of 16 vmapped against one at a time for MLPs of several widths.

Every ratio is against a baseline measured in the same process. Timings are medians over
``--repeats`` runs. Run: ``python benchmarks/bench_curvature.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from landscape import HessianOperator, hessian_eigenvalues, power_iteration
from landscape._lanczos import Lanczos, as_operator, random_block


def mnist1d(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset  # offline generation, no download

    data = make_dataset(get_dataset_args())
    x = torch.as_tensor(data["x"], dtype=torch.float32, device=device)
    y = torch.as_tensor(data["y"], dtype=torch.long, device=device)
    return x, y


def trained_mlp(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    model.to(x.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=g).to(x.device)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"trained {steps} Adam steps: train loss {loss_fn(model(x), y).item():.3f}, train acc {acc:.3f}")
    return model


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Median wall seconds of ``fn`` over ``repeats`` runs, and its last result."""
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def eigen_table(model: nn.Module, data: tuple, repeats: int, device: torch.device, max_iter: int) -> None:
    loss_fn = nn.CrossEntropyLoss()
    reference = hessian_eigenvalues(model, loss_fn, data, k=1, tol=1e-9, dtype=torch.float64, max_hvp=400)
    lam = float(reference.values[0])
    print(
        f"\nreference lambda_max = {lam:.8g} (float64 Lanczos, tol 1e-9, residual "
        f"{float(reference.residuals[0]):.1e}, {reference.n_hvp} HVPs)"
    )
    op = HessianOperator(model, loss_fn, data)
    calls = {
        "power (PyHessian rule)": lambda: hessian_eigenvalues(model, loss_fn, data, k=1, tol=1e-3, method="power"),
        "lanczos (default)": lambda: hessian_eigenvalues(model, loss_fn, data, k=1, tol=1e-3),
        f"lanczos, v0 from {SUBSAMPLE}": lambda: subsample_start(model, loss_fn, data),
    }
    times: dict[str, list[float]] = {label: [] for label in calls}
    results = {}
    for _ in range(repeats):  # interleaved, so that a drifting machine load hits all alike
        for label, call in calls.items():
            # the whole user-facing call: operator set-up (snapshot, determinism check, kept
            # gradient graph) included
            seconds, results[label] = timed(call, 1, device)
            times[label].append(seconds)
    rows = [(label, statistics.median(times[label]), results[label]) for label in calls]
    base = rows[0][1]
    print(f"\n{'method':<38}{'seconds':>10}{'HVPs':>7}{'rel. error':>12}{'residual/lam':>14}{'time vs power':>15}")
    for label, seconds, r in rows:
        err = abs(float(r.values[0]) - lam) / abs(lam)
        print(
            f"{label:<38}{seconds:>10.2f}{r.n_hvp:>7d}{err:>12.1e}{float(r.residuals[0]) / abs(lam):>14.1e}"
            f"{seconds / base:>14.2f}x"
        )
    print(
        f"(HVPs: products with the full-data Hessian; the subsample start adds {SUBSAMPLE_HVPS[-1]} products "
        f"with the Hessian of {SUBSAMPLE_N} samples, included in its seconds)"
    )
    seed_table(op, lam, seeds=5)
    needed = power_products_to_accuracy(op, lam, 1e-3, max_iter)
    seconds_per_hvp = rows[0][1] / rows[0][2].n_hvp
    shown = f"{needed:d}" if needed else f">{max_iter}"
    estimate = f"{needed * seconds_per_hvp:.2f}" if needed else f">{max_iter * seconds_per_hvp:.0f}"
    print(
        f"power iteration needs {shown} HVPs (~{estimate} s at its measured s/HVP) to be within 1e-3 of "
        f"lambda_max; lanczos (default) took {rows[1][2].n_hvp}"
    )


SUBSAMPLE_N = 500
SUBSAMPLE = f"{SUBSAMPLE_N}-sample Hessian"
SUBSAMPLE_HVPS: list[int] = []


def subsample_start(model: nn.Module, loss_fn: nn.Module, data: tuple) -> object:
    """Lanczos on the full data started from the top eigenvector of the Hessian of a random
    subsample (tol 3e-2): the public ``v0`` argument, no library change. The stopping rule is
    still the full-data residual, so the result is as accurate as the default's; the start only
    cuts the full-data products (its Krylov floor drops from ~8 to 2-4 on this model)."""
    x, y = data
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:SUBSAMPLE_N].to(y.device)
    rough = hessian_eigenvalues(model, loss_fn, (x[pick], y[pick]), k=1, tol=3e-2)
    SUBSAMPLE_HVPS.append(rough.n_hvp)
    return hessian_eigenvalues(model, loss_fn, data, k=1, tol=1e-3, v0=rough.vectors[:, 0])


def seed_table(op: HessianOperator, reference: float, seeds: int) -> None:
    """HVP counts and errors of both methods from several random start vectors (the timed rows
    use seed 0; the time of a call is its set-up plus its HVPs), and the fewest HVPs after which
    a Rayleigh-quotient estimate from the products of that start can be within 1e-3 (see
    :func:`krylov_floor`)."""
    print(
        f"\n{'start seed':<12}{'power HVPs':>12}{'power error':>13}{'lanczos HVPs':>14}{'lanczos error':>15}"
        f"{'HVP ratio':>11}{'floor HVPs':>12}{'floor ratio':>13}"
    )
    ratios, floors = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(seeds):
            p = hessian_eigenvalues(op, tol=1e-3, method="power", seed=seed)
            q = hessian_eigenvalues(op, tol=1e-3, seed=seed)
            floor = krylov_floor(op, reference, 1e-3, seed)
            ratios.append(q.n_hvp / p.n_hvp)
            floors.append(floor / p.n_hvp)
            print(
                f"{seed:<12d}{p.n_hvp:>12d}{abs(float(p.values[0]) - reference) / reference:>13.1e}{q.n_hvp:>14d}"
                f"{abs(float(q.values[0]) - reference) / reference:>15.1e}{ratios[-1]:>11.2f}{floor:>12d}"
                f"{floors[-1]:>13.2f}"
            )
    print(
        f"over {seeds} start seeds, lanczos/power HVPs: median {statistics.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}); floor/power: median {statistics.median(floors):.2f} "
        f"(min {min(floors):.2f})"
    )


def krylov_floor(op: HessianOperator, reference: float, accuracy: float, seed: int) -> int:
    """The first step ``m`` at which the largest Ritz value of the Krylov space
    ``span{v0, H v0, ..., H^(m-1) v0}`` (``v0`` the start vector of ``seed``) is within
    ``accuracy`` of ``reference``. That Ritz value is the largest Rayleigh quotient of any vector
    in the space and at most ``lambda_max``; power iteration's estimate after ``m`` products is
    the Rayleigh quotient of such a vector, so it (or any other Rayleigh-quotient estimate from
    those products, whatever its stopping rule) is not within ``accuracy`` sooner."""
    operator = as_operator(op)
    start = random_block(operator.dim, 1, torch.Generator().manual_seed(seed), rademacher=False, like=operator)
    run = Lanczos(operator, start, 100)
    for steps in run:
        if abs(run.ritz()[0][-1] - reference) <= accuracy * abs(reference):
            return steps
    raise RuntimeError("krylov_floor: not within accuracy after 100 steps")


def power_products_to_accuracy(op: HessianOperator, reference: float, accuracy: float, max_iter: int) -> int | None:
    """Power iteration without its stopping rule: products until the Rayleigh quotient is within
    ``accuracy`` (relative) of ``reference``; ``None`` if not within ``max_iter``."""
    quotients: list[float] = []

    def recording(block: torch.Tensor) -> torch.Tensor:
        out = op.matmat(block)
        quotients.append(float(block[:, 0] @ out[:, 0]))
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        power_iteration(
            recording, k=1, tol=1e-15, max_iter=max_iter, dim=op.num_params, dtype=op.dtype, device=op.device
        )
    for count, value in enumerate(quotients, start=1):
        if abs(value - reference) <= accuracy * abs(reference):
            return count
    return None


def hvp_table(model: nn.Module, data: tuple, repeats: int, device: torch.device) -> None:
    loss_fn = nn.CrossEntropyLoss()
    ops = {
        "double_backward, graph rebuilt": HessianOperator(
            model, loss_fn, data, block_size=8, vmap_blocks=True, cache_graph=False
        ),
        "double_backward, graph kept (default)": HessianOperator(model, loss_fn, data, block_size=8, vmap_blocks=True),
        "forward_over_reverse": HessianOperator(
            model, loss_fn, data, backend="forward_over_reverse", block_size=8, vmap_blocks=True
        ),
    }
    p = ops["forward_over_reverse"].num_params
    g = torch.Generator().manual_seed(0)
    v = torch.randn(p, 1, generator=g).to(device)
    block = torch.randn(p, 8, generator=g).to(device)
    grad_s, _ = timed(ops["forward_over_reverse"].gradient, repeats, device)
    print(f"\none gradient over {len(data[1])} samples: {grad_s * 1e3:.1f} ms (P = {p:,})")
    print(f"\n{'product':<58}{'ms':>9}{'x gradient':>12}")
    print(f"{'gradient (baseline)':<58}{grad_s * 1e3:>9.1f}{1.0:>11.2f}x")
    for name, op in ops.items():
        one, _ = timed(lambda op=op: op @ v, repeats, device)
        seq, _ = timed(lambda op=op: [op @ block[:, i : i + 1] for i in range(8)], repeats, device)
        vm, _ = timed(lambda op=op, block=block: op @ block, repeats, device)
        print(f"{'1 HVP, ' + name:<58}{one * 1e3:>9.1f}{one / grad_s:>11.2f}x")
        print(f"{'8 HVPs sequential, ' + name:<58}{seq * 1e3:>9.1f}{seq / grad_s:>11.2f}x")
        print(
            f"{'8 HVPs one vmapped block, ' + name:<58}{vm * 1e3:>9.1f}{vm / grad_s:>11.2f}x"
            f"   (sequential/vmapped = {seq / vm:.2f})"
        )


def block_rule_table(x: torch.Tensor, y: torch.Tensor, repeats: int, device: torch.device) -> None:
    """A block of 16 HVPs (kept graphs, double backward) as one vmapped product against one
    vector at a time, for MLPs 40-w-w-10 of several widths: the evidence for ``vmap_blocks``'
    default."""
    print(
        f"\n{'16 HVPs, double backward, graph kept':<44}{'vmapped ms':>12}{'one at a time ms':>18}{'vmapped/one':>13}"
    )
    for width, samples in ((32, 1000), (128, 1000), (128, 4000), (512, 4000)):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        ).to(device)
        data, loss_fn = (x[:samples], y[:samples]), nn.CrossEntropyLoss()
        ops = [HessianOperator(model, loss_fn, data, block_size=16, vmap_blocks=v) for v in (True, False)]
        block = torch.randn(ops[0].num_params, 16, generator=torch.Generator().manual_seed(0)).to(device)
        vm, one = (timed(lambda op=op, block=block: op @ block, repeats, device)[0] for op in ops)
        label = f"MLP 40-{width}-{width}-10, {samples} samples"
        print(f"{label:<44}{vm * 1e3:>12.1f}{one * 1e3:>18.1f}{vm / one:>12.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--power-max-iter", type=int, default=60, help="cap for the run of power iteration to 1e-3 accuracy (row 3)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads")
    x, y = mnist1d(device)
    model = trained_mlp(x, y, args.train_steps, args.seed)
    data = (x, y)
    eigen_table(model, data, args.repeats, device, args.power_max_iter)
    hvp_table(model, data, args.repeats, device)
    block_rule_table(x, y, args.repeats, device)


if __name__ == "__main__":
    main()
