"""`sweeps measure`: measures added after the fact to a finished sweep, from its stored weights.

Real local Ray (2 CPUs, one cluster for the module), real MLflow and Optuna sqlite stores, one
finished sweep of 4 tiny trials (MLP on 256 digits, one epoch: each converges at the loose
target) shared by the tests in order.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from mlflow import MlflowClient

import sweeps
from landscape.metrics import measure
from sweeps.cli import main
from sweeps.runner import run_sweep
from sweeps.service.lease import DriverLease
from sweeps.spec.config import load_config
from sweeps.trial.data import load_dataset
from sweeps.trial.models import build_model
from sweeps.trial.run import measure_batches
from sweeps.trial.train import LOSSES

pytestmark = pytest.mark.slow
NAME = "remeasure"
SPACE = {"train.lr": {"values": [0.05, 0.1]}, "seed": {"values": [0, 1]}}


def tiny_config():
    return load_config(
        {
            "name": NAME,
            "dataset": {"name": "digits", "train_size": 256},
            "model": {"name": "mlp", "width": 8, "depth": 1},
            "train": {"lr": 0.1, "batch_size": 64, "max_epochs": 2, "stop": {"train_loss": 5.0}},
            "measure": ["param_norm"],
            "measure_subset": 96,
            "search": {"sampler": "grid", "space": SPACE},
            "resources": {"cpus_per_trial": 1},
        }
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """``(results dir, ray address)`` of the finished sweep."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    root = tmp_path_factory.mktemp("remeasure")
    summary = run_sweep(tiny_config(), results_dir=root, quiet=True, max_concurrent=2, report=False)
    assert summary.counts == {"converged": 4}
    yield root, ray.get_runtime_context().gcs_address
    ray.shutdown()


def child_runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("sweeps.role") == "trial"]


def direct(root: Path, row, metrics: list[str], **measure_options) -> dict[str, float]:
    """The measures computed here by hand on the trial's stored weights (its run's artifacts);
    ``measure_options``: ``options``/``artifacts`` of :func:`landscape.measure`."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    config = tiny_config().with_point({"train.lr": float(row["train.lr"]), "seed": int(row["seed"])})
    with tempfile.TemporaryDirectory() as tmp:
        state = torch.load(client.download_artifacts(row["run_id"], "model.pt", tmp))
        init = torch.load(io.BytesIO(Path(client.download_artifacts(row["run_id"], "init_state.pt", tmp)).read_bytes()))
    data = load_dataset(config.dataset)
    model = build_model(config.model, data.input_shape, data.num_classes, seed=config.seed)
    model.load_state_dict(state)
    batches = measure_batches(data, config)
    assert sum(len(y) for _, y in batches) == 96  # the trial's measure_subset
    return measure(
        model, LOSSES["cross_entropy"], batches, metrics, seed=config.seed, init_state=init, **measure_options
    )


def exact_hessian_trace(root: Path, row) -> float:
    """tr(H) of the trial's stored model on its measure batches, from the full Hessian (brute force)."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    config = tiny_config().with_point({"train.lr": float(row["train.lr"]), "seed": int(row["seed"])})
    with tempfile.TemporaryDirectory() as tmp:
        state = torch.load(client.download_artifacts(row["run_id"], "model.pt", tmp))
    data = load_dataset(config.dataset)
    model = build_model(config.model, data.input_shape, data.num_classes, seed=config.seed)
    model.load_state_dict(state)
    batches = measure_batches(data, config)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    model = model.double()

    def loss(w):
        parts = torch.split(w, [s.numel() for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
        return LOSSES["cross_entropy"](torch.func.functional_call(model, params, (x.double(),)), y)

    return float(torch.diagonal(torch.func.hessian(loss)(flat)).sum())


def test_measure_adds_values_equal_to_a_direct_computation(finished, capsys):
    root, address = finished
    before = {r.info.run_id for r in child_runs(root)}
    flags = ["--results-dir", str(root), "--address", address, "--max-concurrent", "2"]
    code = main(["measure", NAME, "--metric", "path_norm", "--metric", "dist_from_init", *flags])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "measured 4 trial(s), skipped 0" in out.out
    assert {r.info.run_id for r in child_runs(root)} == before  # no new runs: values on the trials' own runs

    frame = sweeps.results(NAME, results_dir=root)
    assert {"path_norm", "path_norm_seconds", "dist_from_init", "dist_from_init_seconds"} <= set(frame.columns)
    assert {"path_norm", "dist_from_init"} <= set(frame.attrs["measures"])
    for row in frame.to_dict("records"):
        expected = direct(root, row, ["path_norm", "dist_from_init", "param_norm"])
        assert row["path_norm"] == expected["path_norm"]  # deterministic: exactly
        assert row["dist_from_init"] == expected["dist_from_init"]
        assert row["param_norm"] == expected["param_norm"]  # measured by the trial itself: the stored model

    parent = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(_parent(root))
    assert parent.data.metrics["live.n.path_norm"] == 2  # the live correlation brought up to date (2 configs)
    html = (root / "reports" / NAME / "report.html").read_text()
    assert "path_norm" in html and "dist_from_init" in html  # and the report

    # idempotent: a second run skips every trial; --force measures them again to the same values
    assert main(["measure", NAME, "--metric", "path_norm", "--no-report", *flags]) == 0
    assert "measured 0 trial(s), skipped 4" in capsys.readouterr().out
    assert main(["measure", NAME, "--metric", "path_norm", "--force", "--no-report", *flags]) == 0
    assert "measured 4 trial(s), skipped 0" in capsys.readouterr().out
    again = sweeps.results(NAME, results_dir=root)
    assert again["path_norm"].tolist() == frame["path_norm"].tolist()
    assert len(child_runs(root)) == 4


def _parent(root: Path) -> str:
    from sweeps.posthoc.report import find_parent_run

    return find_parent_run(NAME, f"sqlite:///{root / 'mlflow.db'}")


def test_measure_refuses_bad_input_and_a_sweep_held_by_a_driver(finished, capsys):
    root, address = finished
    flags = ["--results-dir", str(root), "--address", address]
    assert main(["measure", NAME, "--metric", "path_nrom", *flags]) == 2
    err = capsys.readouterr().err
    assert "--metric: unknown measure(s) ['path_nrom']" in err and "path_norm" in err
    assert main(["measure", "nope", "--metric", "path_norm", *flags]) == 2
    assert "NAME: no sweep named 'nope'" in capsys.readouterr().err
    assert main(["measure", NAME, "--metric", "hessian_trace", "--set", "measure_options.hessian_trace.bogus=1"]) == 2
    assert "measure_options.hessian_trace: unknown option(s) ['bogus']" in capsys.readouterr().err
    assert main(["measure", NAME, "--metric", "path_norm", "--set", "train.lr=1", *flags]) == 2
    assert "--set train.lr: sweeps measure takes only measure_options" in capsys.readouterr().err
    with DriverLease(f"sqlite:///{root / 'optuna.db'}", NAME):  # a driver is running the sweep
        assert main(["measure", NAME, "--metric", "param_count", *flags]) == 2
    assert "is being run by another driver" in capsys.readouterr().err
    assert "param_count" not in sweeps.results(NAME, results_dir=root).columns  # nothing written


def test_seed_barrier_pairs_trials_that_differ_only_in_their_seed(finished, capsys):
    from landscape.connectivity import linear_path
    from sweeps.posthoc.connectivity import seed_barriers

    root, address = finished
    flags = ["--results-dir", str(root), "--address", address, "--no-report"]
    points = ["--set", "measure_options.seed_barrier.points=5"]
    assert main(["measure", NAME, "--metric", "seed_barrier", *points, *flags]) == 0
    assert "2 seed pair(s)" in capsys.readouterr().out
    frame = sweeps.results(NAME, results_dir=root).set_index("trial_number")
    pairs = seed_barriers(NAME, results_dir=root)
    assert len(pairs) == 2 and sorted(pairs["train.lr"]) == [0.05, 0.1]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    for pair in pairs.to_dict("records"):
        a, b = frame.loc[pair["trial_a"]], frame.loc[pair["trial_b"]]
        assert a["train.lr"] == b["train.lr"] == pair["train.lr"] and {a["seed"], b["seed"]} == {0, 1}
        with tempfile.TemporaryDirectory() as tmp:
            states = [torch.load(client.download_artifacts(r["run_id"], "model.pt", tmp)) for r in (a, b)]
        config = tiny_config().with_point({"train.lr": float(a["train.lr"]), "seed": int(a["seed"])})
        data = load_dataset(config.dataset)
        model = build_model(config.model, data.input_shape, data.num_classes, seed=config.seed)
        path = linear_path(model, LOSSES["cross_entropy"], measure_batches(data, config), *states, points=5)
        assert pair["loss_barrier"] == pytest.approx(path.loss_barrier, rel=1e-12)
        assert pair["error_barrier"] == pytest.approx(path.error_barrier, abs=1e-12)
    summary = seed_barriers(NAME, results_dir=root, summary=True)
    assert summary["n_pairs"].tolist() == [1, 1] and set(summary.columns) >= {"connected_fraction", "train.lr"}
    flatness = seed_barriers(NAME, results_dir=root, flatness=True).set_index("measure")
    assert flatness.loc["param_norm", "n_configs"] == 2  # tau is NaN here: both barriers are 0 (a tie)
    assert len(child_runs(root)) == 4
    assert main(["measure", NAME, "--metric", "seed_barrier", "--set", "measure_options.seed_barrier.nope=1"]) == 2
    assert "measure_options.seed_barrier: unknown option(s) ['nope']" in capsys.readouterr().err


def test_the_report_says_whether_flatter_configurations_are_more_connected(finished, capsys):
    import html

    from sweeps.posthoc.connectivity import connectivity_lines, flatness_vs_connectivity, seed_barriers

    root, address = finished
    flags = ["--results-dir", str(root), "--address", address]
    points = ["--set", "measure_options.seed_barrier.points=5"]
    assert main(["measure", NAME, "--metric", "hessian_top_eig", "--metric", "seed_barrier", *points, *flags]) == 0
    capsys.readouterr()
    frame = sweeps.results(NAME, results_dir=root)
    table = flatness_vs_connectivity(frame, seed_barriers(NAME, results_dir=root, summary=True), ["train.lr"])
    stored = seed_barriers(NAME, results_dir=root, flatness=True)
    pd.testing.assert_frame_equal(table, stored, check_dtype=False)  # the stored table, as the report computes it
    lines = connectivity_lines(table)  # the one oriented measure measured: hessian_top_eig
    assert len(lines) == 1 and lines[0].startswith("hessian_top_eig (2 configurations;")
    page = (root / "reports" / NAME / "report.html").read_text()
    assert "Are flatter configurations more connected across seeds?" in page
    assert html.escape(lines[0]) in page


def test_measure_measures_exactly_the_trials_the_sweep_measured(finished, tmp_path, capsys):
    """converged and not_converged trials are measured by the sweep, diverged ones are not;
    `sweeps measure` measures the same set (sweeps.spec.status.MEASURED)."""
    from sweeps.spec.status import MEASURED

    _, address = finished
    root = tmp_path / "statuses"
    config = tiny_config().with_point(
        {
            "name": "statuses",
            # a loss target of 5.0 is met after the first epoch (at lr 1e6 by a net whose ReLUs all died), 1e-9
            # never: at lr 0.1 the trial ends not_converged, at lr 1e6 its exploding loss is seen (diverged)
            "search": {
                "sampler": "grid",
                "space": {"train.lr": {"values": [0.1, 1e6]}, "train.stop.train_loss": {"values": [5.0, 1e-9]}},
            },
        }
    )
    summary = run_sweep(config, results_dir=root, quiet=True, max_concurrent=2, report=False, address=address)
    assert summary.counts == {"converged": 2, "not_converged": 1, "diverged": 1}
    flags = ["--results-dir", str(root), "--address", address, "--no-report"]
    assert main(["measure", "statuses", "--metric", "path_norm", *flags]) == 0
    assert "measured 3 trial(s), skipped 0" in capsys.readouterr().out
    frame = sweeps.results("statuses", results_dir=root).set_index("trial_number")
    by_sweep = set(frame.index[frame["param_norm"].notna()])  # what the sweep measured after training
    by_measure = set(frame.index[frame["path_norm"].notna()])
    assert by_measure == by_sweep == set(frame.index[frame["status"].isin(MEASURED)])
    assert sorted(frame.loc[sorted(by_measure), "status"]) == ["converged", "converged", "not_converged"]
    for number in by_measure:  # the stored weights of a not_converged trial too, measured as a trial measures
        row = frame.loc[number]
        point = {"train.lr": row["train.lr"], "seed": row["seed"], "run_id": row["run_id"]}
        assert row["path_norm"] == direct(root, point, ["path_norm"])["path_norm"]


def test_flatness_vs_connectivity_is_kendall_tau_over_configurations():
    from sweeps.analysis import tau_with_interval
    from sweeps.posthoc.connectivity import connectivity_lines, flatness_vs_connectivity, summarize

    frame = pd.DataFrame(
        {
            "trial_number": range(6),
            "status": "converged",
            "train.lr": [0.1, 0.1, 0.2, 0.2, 0.4, 0.4],
            "seed": [0, 1] * 3,
            "hessian_top_eig": [1.0, 3.0, 5.0, 7.0, 9.0, 11.0],  # config means 2, 6, 10
        }
    )
    pairs = pd.DataFrame(
        {
            "trial_a": [0, 2, 4],
            "trial_b": [1, 3, 5],
            "train.lr": [0.1, 0.2, 0.4],
            "loss_barrier": [0.1, 0.3, 0.2],
            "error_barrier": [0.0, 0.01, 0.05],
            "connected": [True, True, False],
        }
    )
    summary = summarize(pairs, ["train.lr"])
    assert summary["n_pairs"].tolist() == [1, 1, 1] and summary["connected_fraction"].tolist() == [1.0, 1.0, 0.0]
    row = flatness_vs_connectivity(frame, summary, ["train.lr"]).set_index("measure").loc["hessian_top_eig"]
    assert row["n_configs"] == 3 and row["larger_is"] == "sharper"
    assert row["tau_loss"] == pytest.approx(1 / 3)  # pairs of configs: 2 concordant, 1 discordant
    assert row["tau_error"] == pytest.approx(1.0)
    for barrier in ("loss", "error"):  # the interval: sweeps.analysis's bootstrap over the 3 configurations
        means, barriers = np.array([2.0, 6.0, 10.0]), summary[f"{barrier}_barrier_mean"].to_numpy()
        expected = tau_with_interval(means, barriers, n_boot=1000, seed=0, confidence=0.95)
        assert [row[f"tau_{barrier}"], row[f"tau_{barrier}_ci_low"], row[f"tau_{barrier}_ci_high"]] == [
            expected["tau"],
            expected["tau_ci_low"],
            expected["tau_ci_high"],
        ]
    assert row["tau_error_ci_low"] > 0  # every resample with two distinct configurations orders them the same
    assert row["tau_loss_ci_low"] < 0 < row["tau_loss_ci_high"]

    # the sentences: oriented so that + means "sharper => higher barrier", verdict from the interval
    flat = frame.rename(columns={"hessian_top_eig": "flatness_radius"})  # the same numbers read as "flatter"
    (sharp,) = connectivity_lines(flatness_vs_connectivity(frame, summary, ["train.lr"]))
    (flatter,) = connectivity_lines(flatness_vs_connectivity(flat, summary, ["train.lr"]))
    lo, hi = row["tau_loss_ci_low"], row["tau_loss_ci_high"]
    assert sharp.startswith("hessian_top_eig (3 configurations;")
    assert f"loss barrier +0.33 [{lo:+.2f}, {hi:+.2f}]: inconclusive (the interval holds 0)" in sharp
    assert "error barrier +1.00 [" in sharp and sharp.endswith("]: flatter configurations more connected")
    assert f"loss barrier -0.33 [{-hi:+.2f}, {-lo:+.2f}]: inconclusive" in flatter
    assert flatter.endswith("]: flatter configurations less connected")


def test_a_stochastic_measure_is_within_its_stated_error_of_the_exact_value(finished, capsys):
    """Hutchinson's trace through `sweeps measure`: the stored value is the trial's seeded estimate
    (equal to a direct call with the same options), which reports a standard error; the exact trace
    (full Hessian, float64) is within 4 of those standard errors, and the relative standard error
    met the requested rtol."""
    root, address = finished
    flags = ["--results-dir", str(root), "--address", address, "--no-report"]
    options = {"method": "hutchinson", "rtol": 0.1, "max_hvp": 4000}
    sets = [f"--set=measure_options.hessian_trace.{k}={v}" for k, v in options.items()]
    assert main(["measure", NAME, "--metric", "hessian_trace", *sets, *flags]) == 0
    assert "measured 4 trial(s)" in capsys.readouterr().out
    for row in sweeps.results(NAME, results_dir=root).to_dict("records"):
        artifacts: dict = {}
        expected = direct(root, row, ["hessian_trace"], options={"hessian_trace": options}, artifacts=artifacts)
        assert row["hessian_trace"] == expected["hessian_trace"]  # seeded: the same probes
        result = artifacts["hessian_trace"]
        assert result.method == "hutchinson" and result.converged and result.n_probes >= 2
        assert result.std_err <= 0.1 * abs(result.value)
        exact = exact_hessian_trace(root, row)
        assert abs(row["hessian_trace"] - exact) <= 4 * result.std_err, (row["hessian_trace"], exact, result.std_err)
        assert result.std_err > 0  # an estimate, not the exact value by construction
