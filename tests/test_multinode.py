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
import textwrap

import pytest

from _cluster import MlflowServer, Postgres, RayNodes, make_ray_root

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def postgres():
    Postgres.require()
    pg = Postgres()
    yield pg
    pg.drop_all()


@pytest.fixture(scope="module")
def ray_cluster():
    root = make_ray_root()
    nodes = RayNodes(root)
    try:
        nodes.start_head(num_cpus=0)
        nodes.add_worker(num_cpus=1)
        nodes.add_worker(num_cpus=1)
        yield nodes
    finally:
        nodes.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(postgres.create("mlflow"), tmp / "artifacts", tmp)
    try:
        yield server.start()
    finally:
        server.stop()


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


def test_harness_cluster_refuses_a_wrong_token(ray_cluster):
    import subprocess
    import sys

    env = ray_cluster.env(RAY_ADDRESS=ray_cluster.address, RAY_AUTH_TOKEN="wrong-token")
    done = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(address='auto'); print(ray.cluster_resources())"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "auth" in (done.stdout + done.stderr).lower()


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
