"""`sweeps run` next to a Ray cluster of the same machine, and `sweeps submit`'s store locations.

Real processes on loopback (tests/_cluster.py): a `ray start --head` whose temp dir is the
default one of the processes under test (``RAY_TMPDIR``), so that its ``ray_current_cluster``
file is the one `sweeps run` would find; a head with the Jobs API shared by the submit tests,
started with one store setting of its own in its environment.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from _cluster import RayNodes, make_ray_root
from mlflow import MlflowClient

from sweeps.cli import main
from sweeps.service import search

ROOT = Path(__file__).resolve().parents[1]


def tiny_sweep(path: Path, name: str, lrs=(0.1,)) -> Path:
    data = {
        "name": name,
        "dataset": {"name": "digits", "train_size": 128},
        "model": {"name": "mlp", "width": 8, "depth": 1},
        "train": {"lr": 0.1, "batch_size": 32, "max_epochs": 1, "stop": {}},
        "measure": [],
        "search": {"sampler": "grid", "space": {"train.lr": {"values": list(lrs)}}},
    }
    path.write_text(yaml.safe_dump(data))
    return path


# --- 9. a Ray cluster started on the same machine ----------------------------------------------
@pytest.mark.slow
def test_run_without_address_leaves_a_local_cluster_alone_and_survives_its_stale_file(tmp_path):
    root = make_ray_root()
    nodes = RayNodes(root)
    try:
        head = nodes.start_head(num_cpus=1, name="ray")  # temp dir root/ray: RAY_TMPDIR=root's default cluster
        current = root / "ray" / "ray_current_cluster"
        address = current.read_text().strip()  # the node's IP as Ray sees it, the head's port
        assert address.endswith(f":{nodes.port}")
        env = nodes.env(RAY_TMPDIR=str(root), PYTHONPATH=str(ROOT))

        def run(name: str) -> subprocess.CompletedProcess:
            config = tiny_sweep(tmp_path / f"{name}.yaml", name)
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "sweeps.cli",
                    "run",
                    str(config),
                    "--results-dir",
                    str(tmp_path / "results"),
                    "--quiet",
                    "--no-report",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )

        live = run("next-to-live")
        assert live.returncode == 0, live.stderr[-3000:]
        assert f"the Ray cluster at {address} on this machine is left alone: --address auto uses it" in live.stderr
        assert nodes.tasks("population_task") == []  # it ran on its private Ray, not on the live cluster

        nodes.kill_node(head)  # killed without `ray stop`: its file stays behind
        assert current.read_text().strip() == address
        stale = run("after-stale")
        assert stale.returncode == 0, stale.stderr[-3000:]
        assert "ray=local (started by this process)" in stale.stderr
    finally:
        nodes.shutdown()
        shutil.rmtree(root, ignore_errors=True)


# --- 8. sweeps submit records where the submitter or the cluster says ----------------------------
@pytest.fixture(scope="module")
def jobs_cluster(tmp_path_factory):
    """A head with the Jobs API and 2 CPUs whose own environment names the MLflow tracking URI
    (not the storage); yields ``(nodes, that tracking URI)``."""
    root = make_ray_root()
    cluster_tracking = f"sqlite:///{tmp_path_factory.mktemp('cluster-stores') / 'mlflow.db'}"
    nodes = RayNodes(root)
    original = nodes.env

    def env(**extra: str) -> dict[str, str]:  # every process of the cluster sees this setting
        return original(SWEEPS_TRACKING_URI=cluster_tracking, PYTHONPATH=str(ROOT), **extra)

    nodes.env = env
    try:
        nodes.start_head(num_cpus=2)
        yield nodes, cluster_tracking
    finally:
        nodes.shutdown()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def submitter(jobs_cluster, monkeypatch, tmp_path, capsys):
    """``submit(*flags, **environment)``: `sweeps submit` of a 2-trial sweep from ``tmp_path`` with
    only the given store settings exported in the submitting shell (and the cluster's token)."""
    nodes, _ = jobs_cluster
    monkeypatch.setenv("RAY_AUTH_TOKEN", nodes.token)
    monkeypatch.chdir(tmp_path)
    tiny_sweep(tmp_path / "sweep.yaml", "submitted", lrs=(0.05, 0.2))

    def submit(*flags: str, **environment: str) -> subprocess.CompletedProcess:
        for key in (
            "SWEEPS_TRACKING_URI",
            "MLFLOW_TRACKING_URI",
            "SWEEPS_STORAGE",
            "SWEEPS_RESULTS_DIR",
            "RAY_ADDRESS",
        ):
            monkeypatch.delenv(key, raising=False)
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = main(["submit", "sweep.yaml", "--address", nodes.dashboard_url, *flags])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(flags, code, out.out, out.err)

    return submit


def job_client(nodes: RayNodes):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(nodes.dashboard_url, headers={"Authorization": f"Bearer {nodes.token}"})


def sweep_jobs(nodes: RayNodes) -> list:
    return [job for job in job_client(nodes).list_jobs() if (job.metadata or {}).get("sweep")]


@pytest.mark.slow
def test_submit_records_into_the_submitters_exported_stores(jobs_cluster, submitter, tmp_path):
    from ray.job_submission import JobStatus

    nodes, _ = jobs_cluster
    stores = tmp_path / "stores"
    stores.mkdir()
    tracking, storage = f"sqlite:///{stores / 'mlflow.db'}", f"sqlite:///{stores / 'optuna.db'}"
    done = submitter(MLFLOW_TRACKING_URI=tracking, SWEEPS_STORAGE=storage)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
    job_id = done.stdout.strip()
    client = job_client(nodes)
    info = client.get_job_info(job_id)
    assert f"--tracking-uri {tracking}" in info.entrypoint and f"--storage {storage}" in info.entrypoint
    deadline = time.monotonic() + 400
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
    study = optuna.load_study(study_name="submitted", storage=search.make_storage(storage))
    assert len([t for t in study.trials if t.state.is_finished()]) == 2
    mlflow = MlflowClient(tracking)
    experiment = mlflow.get_experiment_by_name("submitted")
    runs = mlflow.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["sweeps.role"] for r in runs) == ["parent", "trial", "trial"]


def test_submit_refuses_when_no_one_names_the_storage(jobs_cluster, submitter):
    nodes, _ = jobs_cluster
    before = len(sweep_jobs(nodes))
    done = submitter()
    assert done.returncode == 2 and done.stdout == "", done.stderr
    line = done.stderr.strip().splitlines()[-1]
    # the cluster's environment names the tracking URI, nobody names the storage
    assert line.startswith("sweeps submit: --storage: named neither here nor in the cluster's environment")
    assert "Ray's temporary working directory" in line and "--results-dir with an absolute path" in line
    assert "--tracking-uri" not in line.split(";")[0]
    relative = submitter("--results-dir", "results")
    assert relative.returncode == 2 and "('results' is relative: inside it)" in relative.stderr
    assert len(sweep_jobs(nodes)) == before  # nothing submitted


def test_submit_takes_the_rest_from_the_clusters_environment_or_an_absolute_results_dir(
    jobs_cluster, submitter, tmp_path
):
    nodes, _ = jobs_cluster
    client = job_client(nodes)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for flags, env, expected, absent in (
        ((), {"SWEEPS_STORAGE": storage}, f"--storage {storage}", "--tracking-uri"),  # tracking: the cluster's
        (("--results-dir", str(tmp_path / "abs")), {}, f"--results-dir {tmp_path / 'abs'}", "--storage"),
    ):
        done = submitter(*flags, **env)
        assert done.returncode == 0, done.stderr
        job_id = done.stdout.strip()
        entrypoint = client.get_job_info(job_id).entrypoint
        client.stop_job(job_id)
        assert expected in entrypoint and absent not in entrypoint, entrypoint


def test_the_submit_rule_flag_then_shell_then_cluster_then_an_absolute_results_dir():
    from sweeps.service.connections import job_locations
    from sweeps.spec.errors import UsageError

    def not_asked() -> dict:
        raise AssertionError("the cluster's environment was asked although nothing depended on it")

    shell = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "SWEEPS_STORAGE": "postgresql://db/optuna"}
    assert job_locations(tracking_uri=None, storage=None, results_dir=None, env=shell, cluster_env=not_asked) == {
        "tracking_uri": "http://mlflow:5000",
        "storage": "postgresql://db/optuna",
    }
    flags = job_locations(tracking_uri="http://other", storage=None, results_dir=None, env=shell, cluster_env=not_asked)
    assert flags["tracking_uri"] == "http://other"
    assert job_locations(
        tracking_uri=None, storage=None, results_dir="/srv/results", env={}, cluster_env=not_asked
    ) == {"results_dir": "/srv/results"}
    cluster = {"SWEEPS_TRACKING_URI": "http://mlflow:5000", "SWEEPS_STORAGE": "postgresql://db/optuna"}
    assert job_locations(tracking_uri=None, storage=None, results_dir=None, env={}, cluster_env=lambda: cluster) == {}
    assert (
        job_locations(
            tracking_uri=None,
            storage=None,
            results_dir=None,
            env={},
            cluster_env=lambda: {"SWEEPS_RESULTS_DIR": "/srv/results"},
        )
        == {}
    )
    for results_dir, remote in ((None, {}), ("results", {}), (None, {"SWEEPS_RESULTS_DIR": "results"})):
        with pytest.raises(UsageError, match="Ray's temporary working directory"):
            job_locations(
                tracking_uri=None,
                storage=None,
                results_dir=results_dir,
                env={},
                cluster_env=lambda remote=remote: remote,
            )
