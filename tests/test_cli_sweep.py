"""The sweep commands as a user runs them: `sweeps run` in a subprocess, interrupted by SIGINT or
SIGKILL mid-sweep, then resumed; bad configs and reused names; results/status/list output.

Real Ray (one 2-CPU cluster for the module; each `sweeps run` subprocess joins it with
--address), real MLflow and Optuna sqlite stores, real trials.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

import sweeps
from sweeps.analysis import tau_table
from sweeps.cli import main
from sweeps.service import search
from sweeps.service.lease import current_holder
from sweeps.service.live import LIVE_BOOTSTRAP, live_target
from sweeps.spec.config import load_config

# Two shapes (widths), four trials each: with population_size auto and two task slots, each
# shape is split into two populations of two (sweeps.service.batching), whose max_epochs 4 members finish
# while the long ones train (for a second or more: a signal sent once two trials have finished
# finds launched trials running).
SHORT, LONG = 4, 100
SPACE = {
    "train.lr": {"values": [0.05, 0.2]},
    "model.width": {"values": [8, 16]},
    "train.max_epochs": {"values": [SHORT, LONG]},
}
GRID = set(itertools.product([0.05, 0.2], [8, 16], [SHORT, LONG]))


def write_config(path: Path, name: str, max_epochs: int = 12, **train) -> Path:
    data = {
        "name": name,
        "dataset": {"name": "digits", "train_size": 256},
        "model": {"name": "mlp", "width": 8, "depth": 1},
        "train": {"lr": 0.1, "batch_size": 32, "max_epochs": max_epochs, "stop": {}, **train},
        "measure": ["hessian_top_eig"],
        "measure_subset": 128,
        "search": {"sampler": "grid", "space": SPACE},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def sweeps_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """The CLI in this process (no interpreter start-up): same parser, same exit codes."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def study_of(results_dir: Path, name: str, storage: str | None = None) -> optuna.Study:
    storage = storage or f"sqlite:///{results_dir / 'optuna.db'}"
    return optuna.load_study(study_name=name, storage=search.make_storage(storage))


def _psycopg2_dsn(url: str) -> str:
    return url.replace("postgresql+psycopg2://", "postgresql://")


def wait_for_running_trial(
    results_dir: Path, name: str, proc: subprocess.Popen, min_finished: int, storage: str | None = None
) -> None:
    """Block until >= min_finished trials finished and a launched trial is RUNNING (training: a
    trial of this grid runs for seconds). Launched: it has its MLflow run; a trial asked ahead for
    a population is RUNNING in Optuna before it has one.

    Reads the study database with plain SQL, read-only (opening an Optuna storage here would race
    the driver's schema creation): ``results_dir/optuna.db``, or the PostgreSQL ``storage``."""
    import psycopg2

    query = (
        "select state, exists(select 1 from trial_user_attributes a where a.trial_id = t.trial_id"
        " and a.key = 'mlflow_run_id') from trials t"
    )
    while proc.poll() is None:
        time.sleep(0.1)
        try:
            if storage is None:
                with closing(sqlite3.connect(f"file:{results_dir / 'optuna.db'}?mode=ro", uri=True)) as con:
                    rows = con.execute(query).fetchall()
            else:
                with closing(psycopg2.connect(_psycopg2_dsn(storage))) as con, con.cursor() as cursor:
                    cursor.execute(query)
                    rows = cursor.fetchall()
        except (sqlite3.Error, psycopg2.Error):
            continue
        done = sum(state in ("COMPLETE", "FAIL", "PRUNED") for state, _ in rows)
        if done >= min_finished and any(state == "RUNNING" and launched for state, launched in rows):
            return
    raise AssertionError(f"sweeps run ended before it could be interrupted:\n{proc.stderr.read()}")


def assert_complete_and_clean(results_dir: Path, name: str, storage: str | None = None) -> pd.DataFrame:
    """Every grid point exactly once in the results and in Optuna, nothing RUNNING in either."""
    frame = sweeps.results(name, results_dir=results_dir)
    points = list(zip(*(frame[name] for name in SPACE)))
    assert len(points) == 8 and set(points) == GRID
    assert set(frame["status"]) <= {"converged", "not_converged"}
    study = study_of(results_dir, name, storage)
    assert not search.stale_trials(study)
    assert sorted(search.grid_points_done(study, list(SPACE))) == sorted(GRID)
    client = MlflowClient(f"sqlite:///{results_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if r.data.tags.get("sweeps.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # reopened on resume, not duplicated
    assert_live_series(client, parents[0], frame)
    return frame


def assert_live_series(client: MlflowClient, parent, frame: pd.DataFrame) -> None:
    """The live tau series on the parent run ends at the tau table of every recorded trial (those
    a killed or interrupted driver recorded included: a resumed series continues)."""
    table = tau_table(frame, live_target(["test_acc"]), n_boot=LIVE_BOOTSTRAP)
    history = sorted(
        client.get_metric_history(parent.info.run_id, "live.n_models"), key=lambda m: (m.timestamp, m.step)
    )
    steps = [m.step for m in history]
    assert steps and steps == sorted(steps) and steps[-1] == table.attrs["n_models"], steps
    for column in ("tau", "tau_ci_low", "tau_ci_high"):
        assert parent.data.metrics[f"live.{column}.hessian_top_eig"] == pytest.approx(
            table.loc["hessian_top_eig", column], abs=1e-12
        )


def start_driver(tmp_path, name, ray_address, storage=None, lease_seconds=None, quiet=True):
    """``sweeps run`` of a fresh 8-point grid as a separate driver process; returns
    ``(process, config path, results_dir, common flags)``."""
    config = write_config(tmp_path / "sweep.yaml", name)
    results_dir = tmp_path / "results"
    common = ["--results-dir", str(results_dir), "--address", ray_address] + (["--quiet"] if quiet else [])
    common += ["--storage", storage] if storage else []
    env = {**os.environ, **({"SWEEPS_LEASE_SECONDS": str(lease_seconds)} if lease_seconds else {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeps.cli", "run", str(config), "--max-concurrent", "2", *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    return proc, config, results_dir, common


@pytest.mark.slow
def test_sigint_then_resume(tmp_path, ray_address, capsys):
    proc, _, results_dir, common = start_driver(tmp_path, "cli-int", ray_address)
    wait_for_running_trial(results_dir, "cli-int", proc, min_finished=2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    assert f"`sweeps resume cli-int --results-dir {results_dir}`" in err  # the real name and flags

    during = json.loads(sweeps_main(capsys, "status", "cli-int", "--results-dir", str(results_dir), "--json").stdout)
    assert "running" not in during["counts"] and during["driver"] is None
    assert during["counts"]["queued"] == during["counts"]["interrupted"]  # the re-enqueued points

    study = study_of(results_dir, "cli-int")
    assert not search.stale_trials(study)  # the running trials were marked, not left RUNNING
    statuses = [search.trial_status(t) for t in study.trials]
    assert "interrupted" in statuses
    assert len(study.get_trials(states=(TrialState.WAITING,))) == statuses.count("interrupted")  # re-enqueued
    client = MlflowClient(f"sqlite:///{results_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cli-int").experiment_id], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in runs if r.data.tags.get("status") == "interrupted"]
    assert killed and {r.info.status for r in killed} == {"KILLED"}
    finished_before = {t.number for t in search.finished_trials(study)}

    resumed = sweeps_main(capsys, "resume", "cli-int", *common)  # in this process: joins the same Ray
    assert resumed.returncode == 0, resumed.stderr
    frame = assert_complete_and_clean(results_dir, "cli-int")
    assert finished_before <= set(frame["trial_number"])  # finished trials were kept, not re-run

    # results / status / list on the finished sweep
    csv = sweeps_main(capsys, "results", "cli-int", "--results-dir", str(results_dir), "--format", "csv")
    assert csv.returncode == 0, csv.stderr
    from_csv = pd.read_csv(io.StringIO(csv.stdout))
    assert from_csv["run_id"].tolist() == frame["run_id"].tolist()
    assert from_csv["test_acc"].tolist() == pytest.approx(frame["test_acc"].tolist())
    parquet = tmp_path / "r.parquet"
    out = sweeps_main(
        capsys, "results", "cli-int", "--results-dir", str(results_dir), "--format", "parquet", "--out", str(parquet)
    )
    assert out.returncode == 0, out.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), frame, check_dtype=False)
    status = sweeps_main(capsys, "status", "cli-int", "--results-dir", str(results_dir), "--json")
    info = json.loads(status.stdout)
    assert (
        info["finished"] == 8 and info["budget"] == 8 and info["counts"]["interrupted"] == statuses.count("interrupted")
    )
    live = tau_table(frame, "test_acc", n_boot=LIVE_BOOTSTRAP).loc["hessian_top_eig"]
    assert info["live"]["target"] == "test_acc" and info["live"]["measures"][0]["tau"] == pytest.approx(live["tau"])
    shown = sweeps_main(capsys, "status", "cli-int", "--results-dir", str(results_dir)).stdout
    assert "live correlation with test_acc" in shown and f"tau={live['tau']:+.3f}" in shown, shown
    listing = sweeps_main(capsys, "list", "--results-dir", str(results_dir))
    assert "cli-int" in listing.stdout and " 8 " in listing.stdout
    table = sweeps_main(capsys, "results", "cli-int", "--results-dir", str(results_dir))
    header = table.stdout.splitlines()[0].split()
    assert header[:3] == ["trial_number", "status", "test_acc"] and header[6:] == ["hessian_top_eig"]
    assert set(header[3:6]) == set(SPACE)  # the varied hyperparameters, in the config's order
    wide = sweeps_main(capsys, "results", "cli-int", "--results-dir", str(results_dir), "--all")
    assert "train.momentum" in wide.stdout.splitlines()[0]


@pytest.mark.lowest  # the one real sweep (Ray, Optuna, MLflow) that .ci/lowest runs
def test_a_finished_sweep_run_again_returns_without_starting_ray(tmp_path, ray_address, capsys, monkeypatch):
    config = write_config(tmp_path / "sweep.yaml", "cli-done", max_epochs=2)
    common = ["--results-dir", str(tmp_path / "results"), "--address", ray_address, "--no-report"]
    first = sweeps_main(capsys, "run", str(config), *common)
    assert first.returncode == 0, first.stderr

    def no_ray(*args, **kwargs):
        raise AssertionError("a finished sweep must not connect to Ray")

    monkeypatch.setattr("sweeps.runner.connect_ray", no_ray)
    again = sweeps_main(capsys, "run", str(config), *common)
    assert again.returncode == 0, again.stderr
    assert "already finished (8/8 trials); nothing to run" in again.stderr
    assert "sweeps report cli-done" in again.stderr


@pytest.mark.slow
def test_sigkill_then_run_again_continues(tmp_path, ray_address, capsys, monkeypatch):
    lease = 4.0
    monkeypatch.setenv("SWEEPS_LEASE_SECONDS", str(lease))
    proc, config, results_dir, common = start_driver(tmp_path, "cli-kill", ray_address, lease_seconds=lease)
    wait_for_running_trial(results_dir, "cli-kill", proc, min_finished=1)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    left_running = {t.number for t in search.stale_trials(study_of(results_dir, "cli-kill"))}
    assert left_running  # a killed driver cannot clean up: the next one must

    holder = current_holder(f"sqlite:///{results_dir / 'optuna.db'}", "cli-kill")
    assert holder.pid == proc.pid
    if holder.alive(lease):  # its last heartbeat is still fresh: refused, naming the dead driver
        refused = sweeps_main(capsys, "run", str(config), *common)
        assert refused.returncode == 2 and f"pid {proc.pid}" in refused.stderr, refused.stderr
        assert {t.number for t in search.stale_trials(study_of(results_dir, "cli-kill"))} == left_running
    time.sleep(max(0.0, holder.heartbeat + lease + 0.5 - time.time()))
    again = sweeps_main(capsys, "run", str(config), *common)  # same config: continues the sweep
    assert again.returncode == 0, again.stderr
    assert "took over the lease of a driver that stopped heart-beating" in again.stderr
    assert "left running by a stopped driver" in again.stderr or "recovered as" in again.stderr
    assert_complete_and_clean(results_dir, "cli-kill")
    study = study_of(results_dir, "cli-kill")
    for number in left_running:
        assert search.trial_status(study.trials[number]) in ("interrupted", "converged", "not_converged")


def test_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    config = write_config(tmp_path / "bad.yaml", "bad")
    results_dir = tmp_path / "results"
    for field, value, expected in (
        ("train.lr", -1, "train.lr: must be > 0"),
        ("search.space.train.lrr", {"values": [1]}, "search.space.train.lrr"),
    ):
        data = yaml.safe_load(config.read_text())
        if field == "train.lr":
            data["train"]["lr"] = value
        else:
            data["search"]["space"]["train.lrr"] = value
        bad = tmp_path / "bad-now.yaml"
        bad.write_text(yaml.safe_dump(data))
        done = sweeps_main(capsys, "run", str(bad), "--results-dir", str(results_dir))
        assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert not results_dir.exists()  # nothing started, nothing written

    missing = sweeps_main(capsys, "resume", "nope", "--results-dir", str(results_dir))
    assert missing.returncode == 2 and "no sweep named 'nope'" in missing.stderr
    parquet = sweeps_main(capsys, "results", "nope", "--format", "parquet")
    assert parquet.returncode == 2 and "--out" in parquet.stderr


def test_reused_name_with_other_config_exits_2_before_any_trial(tmp_path, capsys):
    results_dir = tmp_path / "results"
    first = write_config(tmp_path / "a.yaml", "taken")
    results_dir.mkdir()
    search.open_study(load_config(first), f"sqlite:///{results_dir / 'optuna.db'}")
    other = write_config(tmp_path / "b.yaml", "taken", max_epochs=13)
    done = sweeps_main(capsys, "run", str(other), "--results-dir", str(results_dir), "--quiet")
    assert done.returncode == 2
    assert "sweeps resume taken" in done.stderr and "--name" in done.stderr
    assert not (results_dir / "mlflow.db").exists()  # refused before MLflow or Ray were touched
    assert len(study_of(results_dir, "taken").trials) == 0


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.fixture
def ray_head(tmp_path):
    """A separate Ray head with the Jobs API (dashboard on 127.0.0.1), on free ports; its
    processes (found by their unique temp dir) are killed by pid afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are length-limited
    gcs, dashboard, client, agent_http, agent_grpc, metrics, env_agent, node, objects = _free_ports(9)
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={env_agent}",
        f"--node-manager-port={node}",
        f"--object-manager-port={objects}",
        "--disable-usage-stats",
    ]
    started = subprocess.run(command, capture_output=True, text=True)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        for pid in _pids_mentioning(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submit_runs_the_sweep_as_a_ray_job(tmp_path, ray_head, capsys):
    from ray.job_submission import JobStatus, JobSubmissionClient

    project = tmp_path / "project"
    project.mkdir()
    path = write_config(project / "sweep.yaml", "submitted", max_epochs=1)
    data = yaml.safe_load(path.read_text())
    data["search"]["space"] = {"train.lr": {"values": [0.05, 0.2]}}
    path.write_text(yaml.safe_dump(data))
    results_dir = tmp_path / "results"
    cwd = os.getcwd()
    os.chdir(project)
    try:
        done = sweeps_main(
            capsys,
            "submit",
            "sweep.yaml",
            "--address",
            ray_head,
            "--results-dir",
            str(results_dir),
            "--set",
            "train.batch_size=64",
        )
    finally:
        os.chdir(cwd)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert f"ray job logs --address {ray_head} --follow {job_id}" in done.stderr

    token = Path("~/.ray/auth_token").expanduser()
    headers = {"Authorization": f"Bearer {token.read_text().strip()}"} if token.is_file() else None
    client = JobSubmissionClient(ray_head, headers=headers)
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(1)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
    frame = sweeps.results("submitted", results_dir=results_dir)
    assert sorted(frame["train.lr"]) == [0.05, 0.2] and set(frame["status"]) <= {"converged", "not_converged"}


# --- one driver per sweep --------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgres"])
def study_storage(request):
    """``None`` (the embedded SQLite default) or a fresh PostgreSQL database URL."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_url")


QUIET_BANNED = (
    "A new study created",
    "Creating initial MLflow database tables",
    "Token authentication",
    "Started a local Ray instance",
)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["together", "second-while-first-runs"])
def test_two_drivers_of_one_sweep_one_runs(tmp_path, ray_address, study_storage, order):
    first, config, results_dir, common = start_driver(tmp_path, "two", ray_address, storage=study_storage, quiet=False)
    paused = order == "second-while-first-runs"
    if paused:  # held mid-sweep (well within its lease) so that it cannot finish before the second starts
        wait_for_running_trial(results_dir, "two", first, min_finished=1, storage=study_storage)
        databases = [results_dir / "mlflow.db"] + ([results_dir / "optuna.db"] if study_storage is None else [])
        pause_outside_transactions(first, databases, postgres=study_storage)
    second = subprocess.Popen(
        [sys.executable, "-m", "sweeps.cli", "run", str(config), "--max-concurrent", "2", *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        second_out = second.communicate(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)  # a no-op unless paused
    first_out = first.communicate(timeout=300)
    outcomes = {second.returncode: second_out, first.returncode: first_out}
    assert sorted(outcomes) == [0, 2], outcomes  # exactly one ran
    out, err = outcomes[2]
    assert "is being run by another driver" in err and "since" in err and out == ""
    winner_err = outcomes[0][1]
    assert not [banned for banned in QUIET_BANNED if banned in winner_err], winner_err  # quiet by default
    assert "│" not in winner_err and "best: " not in winner_err  # not a terminal: plain lines, no live table
    assert_complete_and_clean(results_dir, "two", study_storage)


def pause_outside_transactions(
    proc: subprocess.Popen, databases: list[Path], postgres: str | None = None, tries: int = 50
) -> None:
    """SIGSTOP ``proc`` at a moment when it holds no SQLite lock on ``databases`` and no open
    transaction on the PostgreSQL database ``postgres``: a process stopped inside a transaction
    (even an SQLite read) blocks other writers of what it touched (the databases' rule, not the
    sweep's), so the test re-pauses until it holds none."""
    import psycopg2

    def in_transaction() -> bool:
        with closing(psycopg2.connect(_psycopg2_dsn(postgres))) as con, con.cursor() as cursor:
            cursor.execute(
                "select count(*) from pg_stat_activity where datname = current_database()"
                " and pid <> pg_backend_pid() and state <> 'idle'"
            )
            return cursor.fetchone()[0] > 0

    for _ in range(tries):
        proc.send_signal(signal.SIGSTOP)
        try:
            for db in databases:
                with closing(sqlite3.connect(db, timeout=0.2)) as con:
                    con.execute("BEGIN EXCLUSIVE")  # no other reader or writer holds a lock
                    con.rollback()
            if postgres is None or not in_transaction():
                return
        except sqlite3.OperationalError:
            pass
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("the driver held a database lock at every pause")


@pytest.mark.slow
def test_a_driver_paused_past_its_lease_stops_without_writing(tmp_path, ray_address):
    """A driver paused (SIGSTOP) past its lease period is taken over by a second one, which
    recovers its running trials; woken up, the first finds its lease taken and stops without
    writing (its tasks, which hold the cluster's CPUs, are cancelled so the second can go on)."""
    lease = 3.0
    paused, config, results_dir, common = start_driver(tmp_path, "paused", ray_address, lease_seconds=lease)
    storage = f"sqlite:///{results_dir / 'optuna.db'}"
    wait_for_running_trial(results_dir, "paused", paused, min_finished=1)
    pause_outside_transactions(paused, [results_dir / "optuna.db", results_dir / "mlflow.db"])
    taker = None
    try:
        left = {t.number for t in search.stale_trials(study_of(results_dir, "paused"))}
        assert left
        time.sleep(lease + 1)
        taker = subprocess.Popen(
            [sys.executable, "-m", "sweeps.cli", "run", str(config), *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "SWEEPS_LEASE_SECONDS": str(lease)},
        )

        def waiting() -> None:  # the taker cannot finish while the paused driver's tasks hold the CPUs
            assert time.monotonic() < deadline, "the second driver did not take over in time"
            assert taker.poll() is None, f"the second driver exited {taker.returncode}"
            time.sleep(0.2)

        deadline = time.monotonic() + 120
        while (holder := current_holder(storage, "paused")) is None or holder.pid != taker.pid:
            waiting()
        while not all((study := study_of(results_dir, "paused")).trials[n].state.is_finished() for n in left):
            waiting()  # the taker recovers the paused driver's trials
        # interrupted, or (paused between its MLflow record and its Optuna tell) recovered from
        # MLflow; a trial asked ahead but not launched has no MLflow run
        recovered = {
            n: attrs["mlflow_run_id"]
            for n in left
            if (attrs := study.trials[n].user_attrs)["status"] == "interrupted" and "mlflow_run_id" in attrs
        }
        assert recovered
    except BaseException:
        if taker is not None:
            taker.kill()
        raise
    finally:
        paused.send_signal(signal.SIGCONT)
    _, err = paused.communicate(timeout=120)
    assert paused.returncode == 4, err
    assert "lost its lease" in err and "Stopped without writing" in err
    woke = err[err.index("lost its lease") :]
    assert not [n for n in recovered if f"trial {n}: " in woke]
    _, taker_err = taker.communicate(timeout=300)
    assert taker.returncode == 0, taker_err
    assert "took over the lease" in taker_err and "left running by a stopped driver" in taker_err
    client = MlflowClient(f"sqlite:///{results_dir / 'mlflow.db'}")
    for number, run_id in recovered.items():  # the woken driver did not finish them
        run = client.get_run(run_id)
        assert (run.info.status, run.data.tags["status"]) == ("KILLED", "interrupted"), number
    assert_complete_and_clean(results_dir, "paused")


# --- exit codes and checked flags --------------------------------------------------------------
def test_a_sweep_whose_trials_all_diverge_exits_3_and_its_report_says_why(tmp_path, ray_address, capsys):
    config = write_config(tmp_path / "sweep.yaml", "all-diverge", max_epochs=2, lr=1e6)
    data = yaml.safe_load(config.read_text())
    data["search"]["space"] = {"seed": {"values": [0, 1]}}
    config.write_text(yaml.safe_dump(data))
    common = ["--results-dir", str(tmp_path / "results"), "--address", ray_address]
    done = sweeps_main(capsys, "run", str(config), *common)
    assert done.returncode == 3, done.stderr
    assert "2/2 trials finished (diverged=2)" in done.stdout
    assert "no trial of sweep all-diverge produced the objective" in done.stderr
    report = sweeps_main(capsys, "report", "all-diverge", "--results-dir", str(tmp_path / "results"))
    assert report.returncode == 2
    assert "nothing to analyse (diverged=2)" in report.stderr and "Traceback" not in report.stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--max-concurrent", "-1"], "--max-concurrent, overrides resources.max_concurrent): must be > 0 (got -1)"),
        (["--max-concurrent", "0"], "must be > 0 (got 0)"),
        (["--max-retries", "-1"], "max_retries (--max-retries): must be an integer >= 0 (got -1)"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag_before_anything_runs(tmp_path, capsys, flags, expected):
    config = write_config(tmp_path / "sweep.yaml", "flags")
    results_dir = tmp_path / "results"
    done = sweeps_main(capsys, "run", str(config), "--results-dir", str(results_dir), *flags)
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert not results_dir.exists()


def test_an_unknown_metric_option_exits_2_naming_it(tmp_path, capsys):
    config = write_config(tmp_path / "sweep.yaml", "options")
    done = sweeps_main(
        capsys,
        "run",
        str(config),
        "--results-dir",
        str(tmp_path / "results"),
        "--set",
        "measure=[hessian_trace]",
        "--set",
        "measure_options={hessian_trace: {rtoll: 0.05}}",
    )
    assert done.returncode == 2, done.stderr
    assert "measure_options.hessian_trace" in done.stderr and "rtoll" in done.stderr and "rtol" in done.stderr
    assert not (tmp_path / "results").exists()


def test_exit_codes_are_in_the_help(capsys):
    from sweeps.exit_codes import EXIT_CODES

    shown = sweeps_main(capsys, "run", "--help").stdout
    for code in EXIT_CODES:
        assert f"\n  {code} " in shown


def test_readme_states_every_exit_code():
    from sweeps.exit_codes import EXIT_CODES

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    stated = readme[readme.index("**Exit codes**") :]
    for code in EXIT_CODES:
        assert f" {code} " in stated.replace("\n", " "), code


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_interrupted_trials_from_their_checkpoints(
    tmp_path, ray_address, capsys, monkeypatch
):
    """Two long trials checkpointing after every epoch; the driver is SIGKILLed once a checkpoint
    is past epoch 3; `sweeps resume` re-runs the interrupted points, each from its checkpoint
    (``resumes`` 1), and the results are one row per point, with the numbers of an uninterrupted
    sweep of the same config."""
    from sweeps.runner import run_sweep
    from sweeps.trial import checkpoint

    lease = 4.0
    monkeypatch.setenv("SWEEPS_LEASE_SECONDS", str(lease))
    name = "cli-ckpt"
    data = {
        "name": name,
        "dataset": {"name": "digits", "train_size": 256},
        "model": {"name": "mlp", "width": 8, "depth": 1},
        "train": {
            "lr": 0.1,
            "batch_size": 32,
            "max_epochs": 150,
            "stop": {},
            "checkpoint": {"every_epochs": 1, "every_seconds": 0},
        },
        "measure": ["hessian_top_eig"],
        "measure_subset": 128,
        "search": {"sampler": "grid", "space": {"seed": {"values": [0, 1]}}},
        "resources": {"population_size": 1},
    }
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(data))
    results_dir = tmp_path / "results"
    common = ["--results-dir", str(results_dir), "--address", ray_address, "--quiet", "--no-report"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeps.cli", "run", str(config), "--max-concurrent", "2", *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    folder = results_dir / "checkpoints" / name

    def epochs_saved() -> list[int]:
        found = []
        for path in folder.glob("*.pt"):
            state = checkpoint.load(path)
            found += [] if state is None else [state["epoch"]]
        return found

    while proc.poll() is None and not (len(epochs_saved()) == 2 and min(epochs_saved()) >= 3):
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    assert len(search.stale_trials(study_of(results_dir, name))) == 2

    holder = current_holder(f"sqlite:///{results_dir / 'optuna.db'}", name)
    time.sleep(max(0.0, holder.heartbeat + lease + 0.5 - time.time()))
    resumed = sweeps_main(capsys, "resume", name, *common)
    assert resumed.returncode == 0, resumed.stderr
    frame = sweeps.results(name, results_dir=results_dir).set_index("seed")
    assert sorted(frame.index) == [0, 1] and frame["resumes"].tolist() == [1, 1]  # one row per point, marked
    every = sweeps.results(name, results_dir=results_dir, include_interrupted=True)
    assert sorted(every["status"]) == ["converged", "converged", "interrupted", "interrupted"]
    assert not folder.exists()  # the sweep completed: its checkpoints are gone

    reference = run_sweep(
        load_config({**data, "name": "cli-ckpt-ref"}),
        results_dir=tmp_path / "ref",
        address=ray_address,
        quiet=True,
        report=False,
    )
    assert reference.counts == {"converged": 2}
    expected = sweeps.results("cli-ckpt-ref", results_dir=tmp_path / "ref").set_index("seed")
    numbers = ["train_loss", "train_acc", "test_loss", "test_acc", "epochs", "steps", "hessian_top_eig"]
    assert frame.loc[[0, 1], numbers].to_numpy().tolist() == expected.loc[[0, 1], numbers].to_numpy().tolist()
    client = MlflowClient(f"sqlite:///{results_dir / 'mlflow.db'}")
    ref_client = MlflowClient(f"sqlite:///{tmp_path / 'ref' / 'mlflow.db'}")
    for seed in (0, 1):  # the finishing run holds the whole curve: epochs 0..150, each once
        curve = sorted((m.step, m.value) for m in client.get_metric_history(frame.loc[seed, "run_id"], "train_loss"))
        ref = sorted(
            (m.step, m.value) for m in ref_client.get_metric_history(expected.loc[seed, "run_id"], "train_loss")
        )
        assert curve == ref and len({step for step, _ in curve}) == 151  # (+ the final value, logged at the last step)
