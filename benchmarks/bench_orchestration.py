"""Orchestration overhead of ``sweeps.run_sweep`` and CPU utilization of concurrent trials.

1. Overhead: a sweep of N trials whose "training" is trivial (a few microseconds), against a
   baseline in the same process and Ray instance: the same N trivial tasks as plain Ray tasks
   (same concurrency). The difference per trial is what Optuna ask/tell, MLflow child runs
   (params, metrics, status, end), the metric queue and progress cost. Target: < 0.5 s/trial.
2. Utilization: 2 concurrent trials of real training (MLP on MNIST-1D, 1 CPU each): CPU seconds
   the trials' processes used / (wall seconds x 2 CPUs) over the sweep, and slot occupancy
   (trial wall seconds / (sweep wall x 2)). Target: >= 90 %. Baseline run by this script: the
   CPU share of 2 trials run at once in 2 plain processes (no Ray, 1 thread each); on a shared
   machine it is below 100 % for reasons that are not the orchestration's.

Run: ``python benchmarks/bench_orchestration.py [--trials 40] [--real-trials 6] [--real-epochs 1200]``. Timings on a
shared machine are noisy: rerun and compare ratios, not absolute seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import tempfile
import time

import ray

from sweeps.runner import run_sweep
from sweeps.spec.config import load_config


@dataclasses.dataclass
class _Result:
    status: str
    metrics: dict
    history: list
    artifacts: dict


def trivial_trial(config, *, log=None, out_dir=None, device=None):
    """A trial with no training: one streamed metric, final metrics, no files."""
    log({"train_loss": 1.0}, 0)
    return _Result("converged", {"test_acc": config.train.lr, "steps": 1.0}, [], {})


def timed_real_trial(config, *, log=None, out_dir=None, device=None):
    """The real trial, reporting the CPU seconds and wall seconds its process spent on it."""
    from sweeps.trial.run import run_trial

    cpu, wall = time.process_time(), time.perf_counter()
    result = run_trial(config, log=log, out_dir=out_dir, device=device)
    result.metrics["bench_cpu_s"] = time.process_time() - cpu
    result.metrics["bench_wall_s"] = time.perf_counter() - wall
    return result


def direct_cpu_share(config) -> float:
    """CPU seconds / wall seconds of one real trial run in a plain process (1 torch thread)."""
    import torch

    from sweeps.trial.run import run_trial

    torch.set_num_threads(1)
    cpu, wall = time.process_time(), time.perf_counter()
    run_trial(config)
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


@ray.remote(num_cpus=1)
def _plain_task(i: int) -> float:
    return float(i)


def plain_ray(n: int, concurrency: int) -> float:
    """Baseline: n trivial Ray tasks with at most ``concurrency`` in flight; wall seconds."""
    start, pending, launched = time.perf_counter(), [], 0
    while launched < n or pending:
        while launched < n and len(pending) < concurrency:
            pending.append(_plain_task.remote(launched))
            launched += 1
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return time.perf_counter() - start


def config_for(name: str, n: int, real: bool, epochs: int = 400):
    space = {"train.lr": {"values": [round(0.01 * (i + 1), 4) for i in range(n)]}}
    train = {"batch_size": 64, "max_epochs": epochs, "stop": {"train_loss": 0.0001}} if real else {}
    return load_config(
        {
            "name": name,
            "dataset": {"name": "mnist1d", "train_size": 2000},
            "model": {"name": "mlp", "width": 128, "depth": 2},
            "train": train,
            "measure": ["hessian_top_eig"],
            "measure_subset": 512,
            "search": {"sampler": "grid", "space": space},
            "resources": {"cpus_per_trial": 1, "max_concurrent": 2},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--real-trials", type=int, default=6)
    parser.add_argument("--real-epochs", type=int, default=1200, help="epochs of each real trial (~15 s at 1200)")
    args = parser.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    plain_ray(4, 2)  # warm the workers
    with tempfile.TemporaryDirectory() as tmp:
        baseline = plain_ray(args.trials, 2)
        sweep = run_sweep(
            config_for("bench-trivial", args.trials, real=False),
            results_dir=tmp,
            quiet=True,
            trial_fn=trivial_trial,
            report=False,
        )
        per_trial = sweep.elapsed_s / args.trials
        extra = (sweep.elapsed_s - baseline) / args.trials
        print(f"\nOrchestration overhead, {args.trials} trivial trials, 2 in flight, sqlite stores (shared machine)")
        print(f"{'':34s}{'wall s':>9s}{'s/trial':>10s}{'ratio':>8s}")
        print(f"{'plain Ray tasks (baseline)':34s}{baseline:9.2f}{baseline / args.trials:10.3f}{1.0:8.1f}")
        print(
            f"{'run_sweep: Optuna+MLflow+Ray':34s}{sweep.elapsed_s:9.2f}{per_trial:10.3f}{sweep.elapsed_s / baseline:8.1f}"
        )
        print(f"overhead beyond the trial's own work: {extra:.3f} s/trial (target < 0.5)")

        baseline_configs = [
            config_for("bench-real", args.real_trials, real=True, epochs=args.real_epochs).with_point({"train.lr": lr})
            for lr in (0.01, 0.02)
        ]
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            direct_share = sum(pool.map(direct_cpu_share, baseline_configs)) / 2

        real = run_sweep(
            config_for("bench-real", args.real_trials, real=True, epochs=args.real_epochs),
            results_dir=tmp,
            quiet=True,
            trial_fn=timed_real_trial,
            report=False,
        )
        import sweeps

        frame = sweeps.results("bench-real", results_dir=tmp)
        cpu, busy = frame["bench_cpu_s"].sum(), frame["bench_wall_s"].sum()
        capacity = real.elapsed_s * 2
        print(
            f"\n{args.real_trials} real trials (MLP 2x128 on 2000 MNIST-1D samples, {args.real_epochs} epochs), 2 concurrent, 1 CPU each"
        )
        print(f"sweep wall {real.elapsed_s:.1f} s; trial wall sum {busy:.1f} s; trial CPU sum {cpu:.1f} s")
        print(f"slot occupancy {busy / capacity:6.1%}   CPU utilization {cpu / capacity:6.1%}  (target >= 90 %)")
        print(
            f"baseline: 2 trials in 2 plain processes (no Ray, same moment) got {direct_share:6.1%} of a CPU each; "
            f"utilization / baseline = {cpu / capacity / direct_share:.2f}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
