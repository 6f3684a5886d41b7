"""Integration: real local Ray (2 CPUs), real MLflow sqlite store, real Optuna sqlite storage,
real trials (tiny MLPs on 256 digits, a few epochs, cheap measures).

Ray is started once for the module; ``run_sweep`` reuses it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import sqlite3
from pathlib import Path

import optuna
import pytest
import ray
import torch
from mlflow import MlflowClient
from torch import nn

import sweeps
from sweeps.analysis import tau_table
from sweeps.runner import run_sweep
from sweeps.service import search
from sweeps.service.live import LIVE_BOOTSTRAP
from sweeps.spec.config import load_config

pytestmark = pytest.mark.slow

TESTS_DIR = str(Path(__file__).parent)
FINAL_KEYS = {
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "gen_gap",
    "epochs",
    "steps",
    "train_seconds",
    "n_train",
    "n_test",
    "num_params",
    "hessian_top_eig",
    "hessian_top_eig_seconds",
}


def exploding_mlp(input_shape, num_classes, explode=False):
    """A custom model factory (``model.name: test_runner:exploding_mlp``) that raises on request."""
    if explode:
        raise RuntimeError("exploding model factory, as requested by model.kwargs.explode")
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 8), nn.ReLU(), nn.Linear(8, num_classes))


def tiny_config(name, space, **extra):
    data = {
        "name": name,
        "dataset": {"name": "digits", "train_size": 256},
        "model": {"name": "mlp", "width": 8, "depth": 1},
        "train": {
            "lr": 0.1,
            "batch_size": 64,
            "max_epochs": 3,
            "stop": {"train_loss": 0.01},
            "track": {"every_steps": 4, "subset": 64, "metrics": ["hessian_top_eig"]},
        },
        "measure": ["hessian_top_eig"],
        "measure_subset": 128,
        "search": {"sampler": "grid", "space": space},
        "resources": {"cpus_per_trial": 1},
    }
    for key, value in extra.items():
        data[key] = value
    return load_config(data)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # workers import this module for the custom model factory
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        runtime_env={"env_vars": {"PYTHONPATH": TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}},
    )
    yield
    ray.shutdown()


def children(client, summary):
    experiment = client.get_run(summary.parent_run_id).info.experiment_id
    return client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'", max_results=1000
    )


def test_grid_of_8_records_parent_children_and_typed_results(tmp_path):
    space = {"train.lr": {"values": [0.05, 0.2]}, "model.width": {"values": [8, 16]}, "seed": {"values": [0, 1]}}
    config = tiny_config("grid8", space)
    summary = run_sweep(config, results_dir=tmp_path, quiet=True, max_concurrent=2)
    assert summary.finished == summary.budget == 8 and not summary.interrupted

    client = MlflowClient(summary.connections.tracking_uri)
    experiment = client.get_experiment_by_name("grid8")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweeps.role") == "parent"]
    kids = children(client, summary)
    assert len(runs) == 9 and len(parents) == 1 and len(kids) == 8
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["sweeps.sweep"] == "grid8" and "sweeps.versions.torch" in parents[0].data.tags
    parent_files = {a.path for a in client.list_artifacts(summary.parent_run_id)}
    assert {"config.yaml", "resolved_config.json", "flat_config.json"} <= parent_files
    for run in kids:
        assert run.info.status == "FINISHED"
        assert run.data.tags["status"] in ("converged", "not_converged")
        assert run.data.tags["sweeps.node_id"] == ray.get_runtime_context().get_node_id()  # one-node cluster
        assert FINAL_KEYS <= set(run.data.metrics), FINAL_KEYS - set(run.data.metrics)
        assert run.data.params["train.lr"] in ("0.05", "0.2")
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert len({m.step for m in history}) >= 3  # per-epoch curve with steps
        tracked = client.get_metric_history(run.info.run_id, "track.hessian_top_eig")
        assert len(tracked) >= 2  # in-training landscape metrics, streamed under track.<name>
        assert "track.eos_ratio" in run.data.metrics and "eos_ratio" not in run.data.metrics  # the whole record
        assert len(client.get_metric_history(run.info.run_id, "hessian_top_eig")) == 1  # the final measure
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"history.json", "hessian_top_eig.npz"} <= files

    # two concurrent trials really overlapped (and nothing locked the sqlite store)
    spans = sorted((r.info.start_time, r.info.end_time) for r in kids)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))

    frame = sweeps.results("grid8", results_dir=tmp_path)
    assert len(frame) == 8 and frame["trial_number"].tolist() == list(range(8))
    assert frame["train.lr"].dtype == "float64" and frame["model.width"].dtype == "int64"
    assert frame["seed"].dtype == "int64" and frame["train.batch_size"].dtype == "int64"
    assert frame["model.batch_norm"].dtype == bool
    assert frame["test_acc"].dtype == "float64" and frame["n_test"].dtype == "Int64"
    assert list(frame.columns[:7]) == ["sweep", "trial_number", "status", "run_id", "train.lr", "model.width", "seed"]
    points = set(zip(frame["train.lr"], frame["model.width"], frame["seed"]))
    assert points == set(itertools.product([0.05, 0.2], [8, 16], [0, 1]))
    # the study agrees with MLflow, value for value
    study = optuna.load_study(study_name="grid8", storage=summary.connections.storage)
    by_number = {t.number: t.values[0] for t in study.trials}
    for number, acc in zip(frame["trial_number"], frame["test_acc"]):
        assert by_number[number] == pytest.approx(acc, rel=1e-12)
    for store in ("mlflow.db", "optuna.db"):  # the driver's SQLite files log ahead (connections.use_wal)
        with contextlib.closing(sqlite3.connect(tmp_path / store)) as con:
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_diverged_and_raising_trials_are_recorded_and_the_sweep_completes(tmp_path):
    space = {"train.lr": {"values": [0.1, 1000.0]}, "model.kwargs.explode": {"values": [False, True]}}
    config = tiny_config("faults", space, model={"name": "test_runner:exploding_mlp"})
    summary = run_sweep(config, results_dir=tmp_path, quiet=True, max_concurrent=2)
    assert summary.finished == 4
    assert summary.counts["failed"] == 2 and summary.counts["diverged"] == 1

    client = MlflowClient(summary.connections.tracking_uri)
    by_status = {}
    for run in children(client, summary):
        by_status.setdefault(run.data.tags["status"], []).append(run)
    assert {r.info.status for r in by_status["failed"]} == {"FAILED"}
    for run in by_status["failed"]:
        assert run.data.params["model.kwargs.explode"] == "True"
        path = client.download_artifacts(run.info.run_id, "traceback.txt", str(tmp_path))
        text = Path(path).read_text()
        assert "Traceback (most recent call last)" in text and "exploding model factory" in text
    (diverged,) = by_status["diverged"]
    assert diverged.info.status == "FINISHED" and diverged.data.params["train.lr"] == "1000.0"

    study = optuna.load_study(study_name="faults", storage=summary.connections.storage)
    states = {search.trial_status(t): t.state for t in study.trials}
    assert states["diverged"] == optuna.trial.TrialState.FAIL and states["failed"] == optuna.trial.TrialState.FAIL

    frame = sweeps.results("faults", results_dir=tmp_path)
    assert sorted(frame["status"]) == ["diverged", "failed", "failed", "not_converged"] or sorted(frame["status"]) == [
        "converged",
        "diverged",
        "failed",
        "failed",
    ]
    diverged_row = frame.loc[frame["status"] == "diverged"].iloc[0]
    assert math.isnan(diverged_row["hessian_top_eig"])  # no measure, and no tracked value standing in
    assert diverged_row["track.hessian_top_eig"] > 0


def test_trials_get_their_cpus_as_torch_threads(tmp_path):
    """A trial function sees torch.get_num_threads() == cpus_per_trial (1 here) and the tracking URI."""

    def probe(config, *, log=None, out_dir=None, device=None):
        from sweeps.trial.run import run_trial

        result = run_trial(config, log=log, out_dir=out_dir, device=device)
        result.metrics["torch_threads"] = float(torch.get_num_threads())
        result.metrics["uri_is_sweep_store"] = float(os.environ["MLFLOW_TRACKING_URI"].endswith("mlflow.db"))
        return result

    config = tiny_config("threads", {"seed": {"values": [0]}})
    run_sweep(config, results_dir=tmp_path, quiet=True, trial_fn=probe)
    frame = sweeps.results("threads", results_dir=tmp_path)
    assert frame.loc[0, "torch_threads"] == 1.0 and frame.loc[0, "uri_is_sweep_store"] == 1.0


def slow_constant_trial(config, *, log=None, out_dir=None, device=None):
    """A trial whose test accuracy is its learning rate at every step; 10 steps of 0.25 s (the
    worker flushes its metrics every 2 s, so the driver sees them before the trial ends)."""
    import time as _time

    from sweeps.trial.run import TrialResult

    for step in range(10):
        log({"test_acc": config.train.lr}, step)
        _time.sleep(0.25)
    return TrialResult("converged", {"test_acc": config.train.lr, "steps": 10.0}, [], {}, config)


def test_pruning_stops_bad_trials_and_is_refused_where_measures_are_needed(tmp_path):
    space = {"train.lr": {"low": 0.01, "high": 1.0, "log": True}}
    config = tiny_config("prune", space, search={"sampler": "random", "n_trials": 8, "seed": 1, "space": space})
    summary = run_sweep(
        config, results_dir=tmp_path, quiet=True, max_concurrent=1, prune=True, trial_fn=slow_constant_trial
    )
    frame = sweeps.results("prune", results_dir=tmp_path)
    assert len(frame) == 8 and summary.finished == 8
    pruned = frame[frame["status"] == "pruned"]
    assert len(pruned) >= 1
    # MedianPruner: a pruned trial was below the median of the earlier ones at its step
    for _, row in pruned.iterrows():
        earlier = frame[(frame["trial_number"] < row["trial_number"]) & (frame["status"] == "converged")]
        assert row["train.lr"] < earlier["train.lr"].median()
    study = optuna.load_study(study_name="prune", storage=summary.connections.storage)
    assert {t.state for t in study.trials if t.user_attrs["status"] == "pruned"} == {optuna.trial.TrialState.PRUNED}

    # Without prune=True nothing is pruned, though Optuna gives a new study a MedianPruner
    same = tiny_config("no-prune", space, search={"sampler": "random", "n_trials": 6, "seed": 1, "space": space})
    unpruned = run_sweep(same, results_dir=tmp_path, quiet=True, max_concurrent=1, trial_fn=slow_constant_trial)
    assert unpruned.counts == {"converged": 6}

    with pytest.raises(ValueError, match="prune: not allowed with the grid sampler"):
        run_sweep(tiny_config("prune-grid", {"seed": {"values": [0, 1]}}), results_dir=tmp_path, prune=True)
    measured = tiny_config(
        "prune-eig",
        space,
        search={"sampler": "random", "n_trials": 3, "space": space},
        objective={"metric": "hessian_top_eig", "direction": "minimize"},
    )
    with pytest.raises(ValueError, match="measured after convergence"):
        run_sweep(measured, results_dir=tmp_path, prune=True)


def test_pruning_in_a_population_stops_one_member_and_the_others_train_on(tmp_path):
    """Two populations of 4 (random lr): the first completes (the pruner's start-up trials); in
    the second the pruner stops members below the median while their task trains the rest."""
    space = {"train.lr": {"low": 1e-4, "high": 0.5, "log": True}}
    EPOCHS = 1000  # long enough (seconds) for the driver's stop to reach the task: it polls once a second  # noqa: N806
    config = tiny_config(
        "prune-population",
        space,
        search={"sampler": "random", "n_trials": 8, "seed": 3, "space": space},
        train={"lr": 0.1, "batch_size": 16, "max_epochs": EPOCHS, "stop": {}},
        resources={"cpus_per_trial": 1, "population_size": 4, "max_concurrent": 1},
    )
    summary = run_sweep(config, results_dir=tmp_path, quiet=True, prune=True)
    assert summary.finished == 8
    frame = sweeps.results("prune-population", results_dir=tmp_path).set_index("trial_number")
    second = frame.loc[4:7]
    pruned, kept = second[second["status"] == "pruned"], second[second["status"] != "pruned"]
    assert len(pruned) >= 1 and len(kept) >= 1, second[["status", "train.lr", "epochs"]]
    assert (frame.loc[0:3, "status"] != "pruned").all()  # start-up trials are never pruned
    assert pruned["hessian_top_eig"].isna().all() and kept["hessian_top_eig"].notna().all()  # no measures when pruned
    assert (pruned["epochs"] < EPOCHS).all() and (
        kept["epochs"] == EPOCHS
    ).all()  # the task trained on after its member left
    assert pruned["train.lr"].max() < frame.loc[0:3, "train.lr"].max()
    study = optuna.load_study(study_name="prune-population", storage=summary.connections.storage)
    assert {t.state for t in study.trials if t.number in pruned.index} == {optuna.trial.TrialState.PRUNED}
    # the live tau on the parent run ends at the table of the converged trials (pruned ones excluded)
    parent = MlflowClient(summary.connections.tracking_uri).get_run(summary.parent_run_id).data.metrics
    table = tau_table(frame.reset_index(), "test_acc", n_boot=LIVE_BOOTSTRAP)
    assert parent["live.n_models"] == table.attrs["n_models"] == len(frame) - len(pruned)
    assert parent["live.tau.hessian_top_eig"] == pytest.approx(table.loc["hessian_top_eig", "tau"], abs=1e-12)


def dies_once_trial(config, *, log=None, out_dir=None, device=None):
    """Kills its own worker process the first time it runs for a given marker file, then trains."""
    from sweeps.trial.run import run_trial

    marker = Path(config.description)
    if not marker.exists():
        marker.write_text("died once")
        os._exit(1)  # a worker crash, as when a node dies: no exception reaches Ray
    return run_trial(config, log=log, out_dir=out_dir, device=device)


def test_a_dying_worker_is_retried_then_failed_when_retries_run_out(tmp_path):
    config = tiny_config("retry", {"seed": {"values": [0]}}, description=str(tmp_path / "marker-a"))
    summary = run_sweep(config, results_dir=tmp_path, quiet=True, trial_fn=dies_once_trial, max_retries=2)
    assert summary.counts == {"not_converged": 1} or summary.counts == {"converged": 1}
    assert (tmp_path / "marker-a").read_text() == "died once"  # it did die, and the retry finished it

    config = tiny_config("no-retry", {"seed": {"values": [0]}}, description=str(tmp_path / "marker-b"))
    summary = run_sweep(config, results_dir=tmp_path, quiet=True, trial_fn=dies_once_trial, max_retries=0)
    assert summary.counts == {"failed": 1}
    client = MlflowClient(summary.connections.tracking_uri)
    (run,) = children(client, summary)
    text = Path(client.download_artifacts(run.info.run_id, "traceback.txt", str(tmp_path))).read_text()
    assert "WorkerCrashedError" in text or "died" in text.lower()


class DiesOnceInTraining(nn.Module):
    """MLP whose training forward kills its worker process at the ``die_at``-th call, once per
    ``marker`` file (``model.name: test_runner:DiesOnceInTraining``)."""

    def __init__(self, input_shape, num_classes, marker="", die_at=12):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(input_shape), 8), nn.Tanh(), nn.Linear(8, num_classes)
        )
        self.marker, self.die_at, self.calls = Path(marker), die_at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls >= self.die_at and not self.marker.exists():
                self.marker.write_text("died once")
                os._exit(1)
        return self.net(x)


def test_a_population_whose_worker_dies_reruns_only_its_unrecorded_members(tmp_path, capfd):
    """The max_epochs 2 members leave the stack (and are recorded) at step 8; the worker dies at
    step 12; the retry trains the other two alone, and nothing is recorded twice."""
    marker = tmp_path / "died"
    config = tiny_config(
        "population-retry",
        {"train.max_epochs": {"values": [2, 6]}, "seed": {"values": [0, 1]}},
        model={"name": "test_runner:DiesOnceInTraining", "kwargs": {"marker": str(marker), "die_at": 12}},
        resources={"cpus_per_trial": 1, "population_size": 4, "max_concurrent": 1},
    )
    summary = run_sweep(config, results_dir=tmp_path, quiet=True, max_retries=1)
    assert marker.read_text() == "died once"
    assert summary.finished == 4 and set(summary.counts) <= {"converged", "not_converged"}, summary.counts
    study = optuna.load_study(study_name="population-retry", storage=summary.connections.storage)
    assert len(study.trials) == 4  # every trial asked and told once
    short = sorted(t.number for t in study.trials if t.params["train.max_epochs"] == 2)
    long = sorted(t.number for t in study.trials if t.params["train.max_epochs"] == 6)
    lost = re.search(r"trials (\[[\d, ]*\]): task lost", capfd.readouterr().err)
    assert lost, "the worker's death must be seen and its task re-launched"
    relaunched = set(json.loads(lost.group(1)))
    # the long members were never recorded before the death; a short one is re-run only if its
    # record had not reached the driver yet (os._exit can beat the generator's report)
    assert set(long) <= relaunched <= set(short + long)
    client = MlflowClient(summary.connections.tracking_uri)
    runs = children(client, summary)
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == sorted(short + long)  # one run per trial
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "hessian_top_eig")) == 1  # final metrics once
        epochs = int(run.data.params["train.max_epochs"])
        assert 1 <= run.data.metrics["epochs"] <= epochs


def test_progress_budget_counts_finished_trials_only():
    """After a resume the study also holds interrupted attempts and their re-enqueued (queued)
    points: the budget column must still read finished/total (it showed 10/8)."""
    from rich.console import Console

    from sweeps.service.progress import ProgressView, Snapshot

    counts = {"converged": 5, "diverged": 1, "interrupted": 2, "queued": 2, "running": 1}
    snap = Snapshot("s", 8, counts, [], "-", 1.0, 2, 3.0)
    assert snap.finished == 6
    console = Console(record=True, width=120)
    console.print(ProgressView._render(snap))
    assert " 6/8 " in console.export_text()


class CountsStepsDiesOnce(nn.Module):
    """MLP that appends a line to ``steps`` at every training forward (one per optimizer step in
    a population of one, across all attempts and workers) and kills its worker at its
    ``die_at``-th training forward, once per ``marker`` file."""

    def __init__(self, input_shape, num_classes, steps="", marker="", die_at=0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(input_shape), 8), nn.Tanh(), nn.Linear(8, num_classes)
        )
        self.steps, self.marker, self.die_at, self.calls = Path(steps), Path(marker), die_at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            with open(self.steps, "a") as f:
                f.write("1\n")
            if self.die_at and self.calls >= self.die_at and not self.marker.exists():
                self.marker.write_text("died once")
                os._exit(1)
        return self.net(x)


def test_a_trial_whose_worker_dies_continues_from_its_checkpoint_and_ends_as_uninterrupted(tmp_path):
    """4 steps per epoch, 6 epochs, a checkpoint after every epoch: the worker dies at the 14th
    step of the first trial (inside epoch 4); the retry continues after epoch 3, so across its
    attempts that trial trains 2 steps more than uninterrupted (not 14), and every number, curve
    and measure equals the uninterrupted sweep's."""
    die_at, per_epoch = 14, 4

    def sweep(name, die):
        model = {
            "name": "test_runner:CountsStepsDiesOnce",
            "kwargs": {
                "steps": str(tmp_path / f"{name}.steps"),
                "marker": str(tmp_path / f"{name}.died"),
                "die_at": die_at if die else 0,
            },
        }
        train = {
            "lr": 0.1,
            "batch_size": 64,
            "max_epochs": 6,
            "stop": {},
            "checkpoint": {"every_epochs": 1, "every_seconds": 0},
            "track": {"every_steps": 3, "subset": 64, "metrics": ["hessian_top_eig"]},
        }
        config = tiny_config(
            name,
            {"seed": {"values": [0, 1]}},
            model=model,
            train=train,
            resources={"cpus_per_trial": 1, "population_size": 1, "max_concurrent": 1},
        )
        summary = run_sweep(config, results_dir=tmp_path / name, quiet=True, max_retries=1, report=False)
        assert summary.finished == 2 and summary.counts == {"converged": 2}, summary.counts
        steps = len((tmp_path / f"{name}.steps").read_text().splitlines())
        assert not (summary.connections.checkpoint_dir / name).exists()  # removed once the sweep completed
        return sweeps.results(name, results_dir=tmp_path / name).set_index("seed"), steps, summary

    reference, reference_steps, _ = sweep("ckpt-reference", die=False)
    resumed, steps, summary = sweep("ckpt-died", die=True)
    assert (tmp_path / "ckpt-died.died").exists()
    assert reference_steps == 2 * 6 * per_epoch
    assert steps == reference_steps + (die_at - 3 * per_epoch)  # lost: the steps after the epoch-3 checkpoint
    assert sorted(resumed["resumes"].fillna(0).tolist()) == [0, 1] and "resumes" not in reference
    assert len(resumed) == 2  # one row per point
    numbers = [
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "gen_gap",
        "epochs",
        "steps",
        "hessian_top_eig",
        "track.hessian_top_eig",
        "track.eos_ratio",
    ]
    pd_equal = resumed[numbers].to_numpy().tolist() == reference[numbers].to_numpy().tolist()
    assert pd_equal, (resumed[numbers], reference[numbers])
    client = MlflowClient(summary.connections.tracking_uri)
    ref_client = MlflowClient(f"sqlite:///{tmp_path / 'ckpt-reference' / 'mlflow.db'}")
    for seed in (0, 1):  # the whole curve, each step once, in the run that finished
        for key in ("train_loss", "test_acc", "track.hessian_top_eig"):
            curve = sorted((m.step, m.value) for m in client.get_metric_history(resumed.loc[seed, "run_id"], key))
            ref_curve = sorted(
                (m.step, m.value) for m in ref_client.get_metric_history(reference.loc[seed, "run_id"], key)
            )
            assert curve == ref_curve, (seed, key)
