"""sweeps.service.tracking (MLflow parent/child runs) and sweeps.service.connections (resolution, redaction,
reachability), on a real sqlite MLflow store; no Ray."""

from __future__ import annotations

import math
import socket

import pytest

from sweeps.service import connections
from sweeps.service.tracking import Tracker


@pytest.fixture
def tracker(tmp_path):
    conn = connections.resolve(results_dir=tmp_path, env={})
    return Tracker(conn.tracking_uri, conn.artifact_root)


def make_parent(tracker, name="exp"):
    return tracker.start_parent(
        name, flat_config={"train.lr": 0.1, "seed": 0}, resolved_config={"name": name}, config_yaml="name: exp\n"
    )


def test_parent_once_and_reopened(tracker, tmp_path):
    parent = make_parent(tracker)
    client = tracker.client
    run = client.get_run(parent)
    assert run.data.tags["sweeps.role"] == "parent" and run.data.tags["sweeps.sweep"] == "exp"
    assert run.data.tags["sweeps.versions.torch"] and run.data.tags["sweeps.git_commit"]
    assert run.data.params == {"train.lr": "0.1", "seed": "0"}
    assert {a.path for a in client.list_artifacts(parent)} == {
        "config.yaml",
        "resolved_config.json",
        "flat_config.json",
    }
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())  # not ./mlruns of the cwd
    tracker.end_parent(parent, "KILLED", {"trials_converged": 3.0, "bad": math.nan})
    again = tracker.start_parent("exp", flat_config={}, resolved_config={}, config_yaml="", run_id=parent)
    assert again == parent and client.get_run(parent).info.status == "RUNNING"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_child_lifecycle_metrics_steps_and_artifacts(tracker, tmp_path):
    parent = make_parent(tracker)
    child = tracker.start_child("exp", parent, 7, {"train.lr": 0.5, "model.width": 16})
    client = tracker.client
    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["optuna.trial_number"] == "7"
    assert run.data.tags["status"] == "running" and run.info.status == "RUNNING"
    assert tracker.active_children(parent) == [child]

    tracker.log_metrics(
        child, [({"train_loss": 2.0, "epoch": 0}, 0, 1000), ({"train_loss": 1.0, "note": "x"}, 10, 2000)]
    )
    tracker.finish_child(
        child,
        "failed",
        {"train_loss": 0.5},
        step=10,
        artifacts={"a/b.txt": b"hi"},
        traceback="Traceback ...\nValueError: x",
    )
    run = client.get_run(child)
    assert run.info.status == "FAILED" and run.data.tags["status"] == "failed"
    history = [(m.step, m.value) for m in client.get_metric_history(child, "train_loss")]
    assert sorted(history) == [(0, 2.0), (10, 0.5), (10, 1.0)]
    assert run.data.metrics["train_loss"] == 0.5  # the final value is the latest
    paths = {a.path for a in client.list_artifacts(child)} | {a.path for a in client.list_artifacts(child, "a")}
    assert {"traceback.txt", "a/b.txt"} <= paths
    assert tracker.active_children(parent) == []

    other = tracker.start_child("exp", parent, 8, {})
    tracker.end(other, "interrupted")
    assert client.get_run(other).info.status == "KILLED"
    done = tracker.start_child("exp", parent, 9, {})
    tracker.finish_child(done, "diverged", {"train_loss": math.inf})
    assert client.get_run(done).info.status == "FINISHED"
    assert tracker.run_info(done)[1] == "diverged"


def test_many_params_are_batched(tracker):
    parent = make_parent(tracker)
    params = {f"k{i:03d}": i for i in range(250)}  # MLflow takes at most 100 per request
    child = tracker.start_child("exp", parent, 0, params)
    assert len(tracker.client.get_run(child).data.params) == 250


@pytest.mark.parametrize(
    "secret, shown",
    [
        ("postgresql://sweeper:hunter2@db:5432/optuna", "postgresql://sweeper:***@db:5432/optuna"),
        ("https://user:p%40ss@mlflow.example.org", "https://user:***@mlflow.example.org"),
        ("http://host:5000/?token=abc123&x=1", "http://host:5000/?token=***&x=1"),
        ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
        ("redis://:onlypassword@cache:6379/0", "redis://:***@cache:6379/0"),
    ],
)
def test_redact(secret, shown):
    assert connections.redact(secret) == shown
    assert connections.redact(f"cannot reach {secret} (refused)") == f"cannot reach {shown} (refused)"


def test_resolution_order(tmp_path, monkeypatch):
    env = {
        "SWEEPS_RESULTS_DIR": str(tmp_path / "env-dir"),
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "SWEEPS_STORAGE": "postgresql://u@db/optuna",
        "RAY_ADDRESS": "ray://head:10001",
    }
    from_env = connections.resolve(env=env)
    assert from_env.results_dir == tmp_path / "env-dir"
    assert (from_env.tracking_uri, from_env.storage, from_env.address) == (
        "http://mlflow:5000",
        "postgresql://u@db/optuna",
        "ray://head:10001",
    )
    assert from_env.artifact_root is None  # an HTTP server decides where artifacts go
    flags = connections.resolve(
        results_dir=tmp_path / "flag",
        tracking_uri="sqlite:////x/m.db",
        storage=str(tmp_path / "s.log"),
        address="auto",
        env=env,
    )
    assert flags.results_dir == tmp_path / "flag" and flags.tracking_uri == "sqlite:////x/m.db"
    assert flags.is_journal and flags.address == "auto"
    monkeypatch.chdir(tmp_path)
    default = connections.resolve(env={})
    assert default.results_dir == tmp_path / "sweeps-results"
    assert default.tracking_uri == f"sqlite:///{tmp_path / 'sweeps-results' / 'mlflow.db'}"
    assert default.storage == f"sqlite:///{tmp_path / 'sweeps-results' / 'optuna.db'}"
    assert default.address is None
    assert default.checkpoint_dir == tmp_path / "sweeps-results" / "checkpoints"
    shared = connections.resolve(results_dir=tmp_path / "flag", env={"SWEEPS_CHECKPOINT_DIR": str(tmp_path / "nfs")})
    assert shared.checkpoint_dir == tmp_path / "nfs"  # a folder every node mounts, apart from the results
    with pytest.raises(ValueError, match="--tracking-uri: unsupported URI"):
        connections.resolve(tracking_uri="mlflow.db", env={})
    with pytest.raises(ValueError, match=r"--storage: unsupported URI 'postgres://u:\*\*\*@h/d'"):
        connections.resolve(storage="postgres://u:pw@h/d", env={})


def test_unreachable_store_fails_fast_and_redacted(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conn = connections.resolve(results_dir=tmp_path, storage=f"postgresql://u:secretpw@127.0.0.1:{port}/db", env={})
    with pytest.raises(ConnectionError) as err:
        connections.check_reachable(conn, timeout=2)
    assert "--storage" in str(err.value) and "secretpw" not in str(err.value) and "***" in str(err.value)
    connections.check_reachable(connections.resolve(results_dir=tmp_path, env={}))  # local files: fine


@pytest.mark.parametrize("terminated", [True, False], ids=["run-terminated", "killed-before-set-terminated"])
def test_recover_settles_a_trial_whose_result_reached_mlflow_only(tracker, tmp_path, terminated):
    """A driver killed after recording a trial's result in MLflow but before telling Optuna (and,
    in the narrower window, before terminating the run) leaves a RUNNING Optuna trial: the next
    driver takes the result from MLflow, and the run ends FINISHED, not KILLED."""
    import optuna

    from sweeps.runner import _recover
    from sweeps.service.progress import ProgressView

    study = optuna.create_study(
        study_name="exp", storage=f"sqlite:///{tmp_path / 'optuna.db'}", directions=["maximize"]
    )
    study.set_user_attr("objective", ["test_acc"])
    parent = make_parent(tracker)
    trial = study.ask()
    child = tracker.start_child("exp", parent, trial.number, {"train.lr": 0.1})
    trial.set_user_attr("mlflow_run_id", child)
    if terminated:
        tracker.finish_child(child, "converged", {"test_acc": 0.75}, step=3)
    else:
        tracker.log_metrics(child, [({"test_acc": 0.75}, 3, 1000)], tags={"status": "converged"})

    with open(tmp_path / "driver.log", "w") as log:
        _recover(study, tracker, parent, ProgressView(quiet=True, stream=log))
    assert "recovered as converged" in (tmp_path / "driver.log").read_text()

    (frozen,) = study.get_trials()
    assert frozen.state == optuna.trial.TrialState.COMPLETE and frozen.values == [0.75]
    run = tracker.client.get_run(child)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "converged"
    assert tracker.active_children(parent) == []
