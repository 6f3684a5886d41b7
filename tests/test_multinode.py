"""Sweeps on a real multi-node Ray cluster with a shared MLflow server and Optuna on PostgreSQL.

Everything is a real process on loopback (see tests/_cluster.py): a Ray head (0 CPUs: trials
must go to workers) and two 1-CPU worker nodes started with ``ray start``, token auth on; an
``mlflow server`` with a PostgreSQL backend store and proxied artifacts; a fresh PostgreSQL
database for the Optuna studies. Sweeps run through the ``sweeps`` CLI as a subprocess, exactly
as a user runs them against a cluster.

Outside CI the module is skipped when PostgreSQL is down; in CI (``CI`` set) it fails instead.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from _cluster import MlflowServer, Postgres, Process, RayNodes, make_ray_root, spawn, stop_all
from mlflow import MlflowClient

import sweeps
from sweeps.service import search

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def postgres():
    Postgres.require()
    pg = Postgres()
    yield pg
    pg.drop_all()


@pytest.fixture(scope="module")
def stack(postgres, tmp_path_factory):
    """The MLflow server and the Ray cluster, started side by side (each takes ~10-30 s here)."""
    tmp = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(postgres.create("mlflow"), tmp / "artifacts", tmp)
    nodes = RayNodes(make_ray_root())
    try:
        server.spawn()
        nodes.start_head(num_cpus=0)
        nodes.add_workers(2, num_cpus=1)
        server.wait_healthy()
        yield nodes, server
    finally:
        stop_all([*nodes.processes, *([server.process] if server.process else [])])
        shutil.rmtree(nodes.root, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(stack) -> RayNodes:
    return stack[0]


@pytest.fixture
def mlflow_server(stack) -> MlflowServer:
    """The module's MLflow server, restarted if a test stopped it."""
    server = stack[1]
    if not server.healthy():
        server.start()
    return server


# --------------------------------------------------------------------------- the harness itself

_WHERE = textwrap.dedent(
    """
    import json, ray
    ray.init(address="auto", log_to_driver=False)

    @ray.remote(num_cpus=1)
    def where(i):
        import time
        time.sleep(0.5)
        return ray.get_runtime_context().get_node_id()

    nodes = ray.get([where.options(scheduling_strategy="SPREAD").remote(i) for i in range(4)])
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print(json.dumps({"task_nodes": nodes, "alive": alive, "cpus": ray.cluster_resources().get("CPU")}))
    """
)


def test_harness_runs_tasks_on_two_worker_nodes(ray_cluster):
    result = json.loads(ray_cluster.python(_WHERE).strip().splitlines()[-1])
    assert len(result["alive"]) == 3
    assert result["cpus"] == 2
    assert len(set(result["task_nodes"])) == 2, result
    # The state API (used below to see where trials ran) agrees with the tasks themselves.
    seen = {t["node_id"] for t in ray_cluster.tasks("where") if t["state"] == "FINISHED"}
    assert seen == set(result["task_nodes"])


def test_harness_cluster_has_token_auth_on(ray_cluster):
    url = f"{ray_cluster.dashboard_url}/api/v0/tasks?limit=1"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code in (401, 403)
    wrong = urllib.request.Request(url, headers={"Authorization": "Bearer not-the-token"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=30)
    assert refused.value.code in (401, 403)


def test_harness_mlflow_server_stores_runs_and_artifacts(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.create_experiment(f"harness-{tmp_path.name}")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "x", 1.5)
    client.log_text(run.info.run_id, "hello", "notes/hello.txt")
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics == {"x": 1.5}
    assert client.get_experiment(experiment).artifact_location.startswith("mlflow-artifacts:")
    stored = list(mlflow_server.artifacts_dir.rglob("hello.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "hello"


# --------------------------------------------------------------------------- sweeps on the cluster

TRIAL_TASK = "population_task"  # the Ray task of sweeps.service.worker that trains one population
LEASE_SECONDS = 3.0  # the drivers' lease period here: a killed driver's sweep is free again soon


def write_config(
    directory: Path, name: str, lrs: list[float], max_epochs: int, population_size: int | str = "auto"
) -> Path:
    """A grid sweep of tiny trials (digits subset, 1-hidden-layer MLP, top Hessian eigenvalue).

    The stop rule is out of reach, so a trial trains exactly ``max_epochs`` (8 steps each).
    """
    config = {
        "name": name,
        "dataset": {"name": "digits", "train_size": 512, "test_size": 192},
        "model": {"name": "mlp", "depth": 1, "width": 32},
        "train": {"lr": 0.1, "batch_size": 64, "max_epochs": max_epochs, "stop": {"train_loss": 1e-12}},
        "measure": ["hessian_top_eig"],
        "search": {"sampler": "grid", "space": {"train.lr": {"values": lrs}}},
        "resources": {"cpus_per_trial": 1, "population_size": population_size},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class SweepSetup:
    """One sweep on the module's stack: its own Optuna database, name and results directory."""

    name: str
    config: Path
    storage: str
    results_dir: Path
    ray_cluster: RayNodes
    mlflow_server: MlflowServer

    def flags(self, tracking_uri: str | None = None) -> list[str]:
        return [
            "--address",
            self.ray_cluster.address,
            "--tracking-uri",
            tracking_uri or self.mlflow_server.url,
            "--storage",
            self.storage,
            "--results-dir",
            str(self.results_dir),
            "--quiet",
        ]

    def run_args(self, tracking_uri: str | None = None) -> list[str]:
        return ["run", str(self.config), "--name", self.name, *self.flags(tracking_uri)]

    def cli(self, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sweeps.cli", *args],
            env=self.env(),
            cwd=self.results_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start_cli(self, args: list[str]) -> Process:
        return spawn(f"driver-{self.name}", [sys.executable, "-m", "sweeps.cli", *args], self.env(), self.results_dir)

    def env(self) -> dict[str, str]:
        return {**self.ray_cluster.env(), "SWEEPS_LEASE_SECONDS": str(LEASE_SECONDS)}

    def study(self) -> optuna.Study:
        # make_storage: one connection pool for the test's polling, as the driver has one.
        return optuna.load_study(study_name=self.name, storage=search.make_storage(self.storage))

    def finished_trials(self) -> list[optuna.trial.FrozenTrial]:
        try:
            trials = self.study().get_trials(deepcopy=False)
        except KeyError:  # the driver has not created the study yet
            return []
        return [t for t in trials if t.state.is_finished() and t.user_attrs.get("status") != "interrupted"]


@pytest.fixture
def sweep_setup(request, postgres, ray_cluster, mlflow_server, tmp_path) -> SweepSetup:
    name = f"mn-{request.node.name.removeprefix('test_')[:30]}".replace("_", "-")
    return SweepSetup(
        name=name,
        config=write_config(tmp_path, name, LRS, MAX_EPOCHS),
        storage=postgres.create("optuna"),
        results_dir=tmp_path,
        ray_cluster=ray_cluster,
        mlflow_server=mlflow_server,
    )


LRS = [0.01, 0.02, 0.03, 0.05, 0.07, 0.1]  # 6 grid points = 6 trials, 2 at a time; none diverges
MAX_EPOCHS = 10  # under 1 s warm (a fresh worker adds seconds of imports)
KILL_EPOCHS = 2500  # ~7 s warm on an idle machine: a kill lands mid-trial despite the state API lag
# Trials of the driver-stop tests: they wait on the study, not the state API (no lag), so a trial
# need only outlast the 0.5 s poll: ~2 s warm keeps two rounds (>= 4 s) between the wait's condition
# and the sweep's end. The resume trains what is left at this length too: the tests' main cost.
DRIVER_STOP_EPOCHS = 800


def completed(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}"


def attempts_since(ray_cluster: RayNodes, before: set[tuple[str, int]]) -> list[dict]:
    """Attempts of trial tasks that were not there at ``before`` (a set of (task_id, attempt))."""
    return [t for t in ray_cluster.tasks(TRIAL_TASK) if (t["task_id"], t["attempt_number"]) not in before]


def task_keys(ray_cluster: RayNodes) -> set[tuple[str, int]]:
    return {(t["task_id"], t["attempt_number"]) for t in ray_cluster.tasks(TRIAL_TASK)}


def assert_sweep_complete(setup: SweepSetup) -> dict[int, Any]:
    """The study is complete, every grid point ran exactly once, and MLflow holds every trial with
    its params, metrics and artifacts (stored by the server under --artifacts-destination).

    Returns the child runs of the finished trials by trial number.
    """
    study = setup.study()
    finished = setup.finished_trials()
    assert len(finished) == len(LRS), [(t.number, t.state, t.user_attrs) for t in study.trials]
    assert sorted(t.params["train.lr"] for t in finished) == sorted(LRS), "each grid point exactly once"
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in finished)
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))

    client = MlflowClient(tracking_uri=setup.mlflow_server.url)
    experiment = client.get_experiment_by_name(setup.name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweeps.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("sweeps.role") == "trial"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert not [r for r in children if r.info.status == "RUNNING"]
    artifacts_dir = setup.mlflow_server.artifacts_dir
    assert list(artifacts_dir.rglob(f"{parents[0].info.run_id}/artifacts/config.yaml"))

    by_number: dict[int, list] = {}
    for run in children:
        by_number.setdefault(int(run.data.tags["optuna.trial_number"]), []).append(run)
    for trial in finished:
        (run,) = by_number[trial.number]  # exactly one MLflow run per trial
        assert run.info.status == "FINISHED"
        assert run.data.tags["status"] == trial.user_attrs["status"]
        assert float(run.data.params["train.lr"]) == trial.params["train.lr"]
        assert math.isfinite(run.data.metrics["hessian_top_eig"]) and run.data.metrics["hessian_top_eig"] > 0
        assert run.data.metrics["test_acc"] == pytest.approx(trial.values[0])  # objective: test_acc
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"history.json", "result.json"} <= names, names
        for name in ("history.json", "result.json"):
            (stored,) = artifacts_dir.rglob(f"{run.info.run_id}/artifacts/{name}")
            assert stored.stat().st_size > 0

    frame = sweeps.results(setup.name, tracking_uri=setup.mlflow_server.url)
    assert len(frame) == len(LRS)
    assert set(frame["run_id"]) == {by_number[t.number][0].info.run_id for t in finished}
    assert sorted(frame["train.lr"]) == sorted(LRS)
    return {t.number: by_number[t.number][0] for t in finished}


def test_sweep_runs_on_several_nodes_and_records_everything(sweep_setup):
    setup = sweep_setup
    before = task_keys(setup.ray_cluster)
    result = setup.cli(setup.run_args())
    assert result.returncode == 0, completed(result)
    runs = assert_sweep_complete(setup)

    workers = {setup.ray_cluster.node_ids()[w.name] for w in setup.ray_cluster.workers}
    attempts = [t for t in attempts_since(setup.ray_cluster, before) if t["state"] == "FINISHED"]
    assert len(attempts) == 2  # population_size auto: 6 trials over 2 task slots, 3 models per task
    nodes = {t["node_id"] for t in attempts}
    assert nodes <= workers, "the head has 0 CPUs: no trial may run there"
    assert len(nodes) == 2, f"trials ran on {len(nodes)} node(s)"
    # Where the service records the node of each trial, it must agree with Ray.
    tagged = {r.data.tags.get("sweeps.node_id") for r in runs.values()} - {None}
    assert not tagged or tagged == nodes


def wait_until(predicate, timeout: float, what: str, driver: Process) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert driver.alive, f"the driver exited before {what}:\n{driver.output()}"
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not happen within {timeout} s:\n{driver.output()}")


def stop_driver_mid_sweep(setup: SweepSetup, sig: int, finished: int) -> int:
    """Run the sweep with trials of ~2 s, one per task, and send ``sig`` to the driver once
    ``finished`` trials are recorded and another is running; returns its exit code."""
    write_config(setup.config.parent, setup.name, LRS, DRIVER_STOP_EPOCHS, population_size=1)
    driver = setup.start_cli(setup.run_args())
    try:
        wait_until(
            lambda: (
                len(setup.finished_trials()) >= finished
                and bool(setup.study().get_trials(states=(optuna.trial.TrialState.RUNNING,)))
            ),
            timeout=300,
            what=f"{finished} trial(s) finished and one running",
            driver=driver,
        )
        driver.kill(sig)
        return driver.popen.wait(120)
    finally:
        driver.stop(grace=0)


def test_ctrl_c_leaves_every_trial_written_and_settled_then_resume_completes(sweep_setup):
    """Against a tracking server the driver writes each round's MLflow records concurrently
    (runner.MLFLOW_SERVER_WRITERS); a Ctrl-C ends the round, waits for those writes and records
    the running trials interrupted: after exit 130 no trial or run is left RUNNING, each trial
    the study counts has exactly one finished run with its result, and resume completes."""
    setup = sweep_setup
    assert stop_driver_mid_sweep(setup, signal.SIGINT, finished=2) == 130

    study = setup.study()
    finished = setup.finished_trials()
    assert 2 <= len(finished) < len(LRS), "the stop must land mid-sweep"
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    client = MlflowClient(tracking_uri=setup.mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name(setup.name).experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("sweeps.role") == "trial"]
    assert not [r for r in children if r.info.status == "RUNNING"]
    for trial in finished:
        (run,) = [r for r in children if r.info.run_id == trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["status"] == trial.user_attrs["status"]
        assert run.data.metrics["test_acc"] == pytest.approx(trial.values[0])
    for trial in study.trials:  # the rest: cut by the stop (run KILLED, point re-enqueued) or never started
        assert (
            trial.number in {t.number for t in finished}
            or trial.state == optuna.trial.TrialState.WAITING
            or (
                trial.user_attrs.get("status") == "interrupted"
                and client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "KILLED"
            )
        ), trial

    result = setup.cli(["resume", setup.name, *setup.flags()])
    assert result.returncode == 0, completed(result)
    assert_sweep_complete(setup)


def test_killed_driver_is_resumed_to_completion(sweep_setup):
    setup = sweep_setup
    stop_driver_mid_sweep(setup, signal.SIGKILL, finished=1)
    done_before = len(setup.finished_trials())
    assert done_before < len(LRS), "the driver must be killed mid-sweep"
    time.sleep(LEASE_SECONDS + 0.5)  # the killed driver's lease expires

    result = setup.cli(["resume", setup.name, *setup.flags()])
    assert result.returncode == 0, completed(result)
    runs = assert_sweep_complete(setup)

    study = setup.study()
    interrupted = [t for t in study.trials if t.user_attrs.get("status") == "interrupted"]
    client = MlflowClient(tracking_uri=setup.mlflow_server.url)
    for trial in interrupted:  # attempts cut by the kill: settled, never counted as results
        assert trial.state == optuna.trial.TrialState.FAIL
        if "mlflow_run_id" in trial.user_attrs:  # absent when killed between ask and run creation
            run = client.get_run(trial.user_attrs["mlflow_run_id"])
            assert run.info.status == "KILLED" and run.data.tags["status"] == "interrupted"
    assert len(runs) == len(LRS)


def test_killed_worker_node_still_completes_every_trial_once(sweep_setup):
    setup = sweep_setup
    write_config(setup.config.parent, setup.name, LRS, KILL_EPOCHS, population_size=1)
    cluster = setup.ray_cluster
    node_of = cluster.node_ids()
    before = task_keys(cluster)
    driver = setup.start_cli(setup.run_args())
    victim: list[Process] = []
    first_finish_ms: list[int] = []

    def fresh_trial_running() -> bool:
        """A trial that started after the first one finished is running on a worker: it has
        seconds of work left, so the kill lands mid-trial (the state API lags by ~1 s). The victim
        is the worker hosting the sweep's actors if there is one."""
        if not first_finish_ms:
            if setup.finished_trials():
                first_finish_ms.append(int(time.time() * 1000))
            return False
        started = {
            t["node_id"]
            for t in attempts_since(cluster, before)
            if t["state"] == "RUNNING" and (t.get("start_time_ms") or 0) >= first_finish_ms[0]
        }
        # A worker that also hosts one of the sweep's actors (the driver's metric queue, ...) is the
        # harder case: once it runs a fresh trial, kill that one.
        with_actor = cluster.actor_nodes() & {node_of[w.name] for w in cluster.workers}
        candidates = [w for w in cluster.workers if node_of[w.name] in started]
        victim[:] = [w for w in candidates if not with_actor or node_of[w.name] in with_actor][:1]
        return bool(victim)

    try:
        wait_until(fresh_trial_running, timeout=240, what="a trial started after the first finished", driver=driver)
        kill_ms = int(time.time() * 1000)
        cluster.kill_node(victim[0])
        driver.popen.wait(300)
    finally:
        driver.stop(grace=0)
    assert driver.popen.returncode == 0, driver.output()
    runs = assert_sweep_complete(setup)
    assert len(runs) == len(LRS)

    # Ray's view: the kill cost at least one task (a trial cut mid-run, or a finished trial whose
    # result was lost with the node's object store). The driver re-launched its trials as new
    # tasks, which finished on the surviving node.
    killed = node_of[victim[0].name]
    tasks = attempts_since(cluster, before)
    table = [(t["task_id"][-6:], t["node_id"][-6:], t["state"], (t.get("start_time_ms") or 0) - kill_ms) for t in tasks]
    lost = [t for t in tasks if t["node_id"] == killed and t["state"] != "FINISHED"]
    assert lost, f"the kill (node {killed[-6:]}) hit no task: {table}"
    relaunched = [t for t in tasks if (t.get("start_time_ms") or 0) >= kill_ms]
    assert relaunched and all(t["node_id"] != killed and t["state"] == "FINISHED" for t in relaunched), table
    log = driver.output(tail=10**7)
    assert "task lost" in log and "re-launched" in log, log


# Last in the module: it stops the shared MLflow server (a later test would restart it, slowly).
def test_unreachable_mlflow_server_fails_before_any_trial(sweep_setup):
    setup = sweep_setup
    stopped = setup.mlflow_server
    stopped.stop()
    assert not stopped.healthy()
    before = task_keys(setup.ray_cluster)
    result = setup.cli(setup.run_args())
    assert result.returncode == 2, completed(result)
    assert "--tracking-uri" in result.stderr and f"127.0.0.1:{stopped.port}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert setup.name not in optuna.get_all_study_names(setup.storage), "no study may be created"
    assert attempts_since(setup.ray_cluster, before) == []
