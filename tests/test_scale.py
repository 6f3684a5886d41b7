"""Reading a large sweep back (issue #15): ``sweeps.results``, ``sweep_status`` and ``list_sweeps``
on sweeps of 200 and 2,000 trials written by ``benchmarks/bench_scale.py``'s generator.

The cost bounds are ratios (time at 2,000 / time at 200), never seconds: 10x the trials may cost
about 10x, not the 100x of a read whose per-trial cost grows with the sweep.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import itertools
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from sweeps.posthoc import queries
from sweeps.posthoc.queries import list_sweeps, results, sweep_status
from sweeps.service import connections, search
from sweeps.service.tracking import Tracker

pytestmark = pytest.mark.slow

SMALL, LARGE = 200, 2_000
FLAT = 25.0  # time(LARGE) / time(SMALL) at most: linear reads ~10x or less, quadratic ones ~100x


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


@pytest.fixture(scope="module")
def sweeps_dir(tmp_path_factory):
    """One results directory holding the sweeps ``scale-200`` and ``scale-2000``."""
    root = tmp_path_factory.mktemp("scale")
    conn = connections.resolve(results_dir=root, env={})
    for n in (SMALL, LARGE):
        bench.build_sweep(f"scale-{n}", n, conn)
    return root


def _best_of(call, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def test_one_typed_row_per_finished_trial_at_scale(sweeps_dir):
    frame = results(f"scale-{LARGE}", results_dir=sweeps_dir)
    status = sweep_status(f"scale-{LARGE}", results_dir=sweeps_dir)
    assert len(frame) == LARGE == status["finished"] == status["budget"]
    assert frame["trial_number"].is_unique and frame["trial_number"].is_monotonic_increasing
    assert frame["run_id"].is_unique
    assert {k: v for k, v in status["counts"].items() if k != "interrupted"} == frame["status"].value_counts().to_dict()
    assert status["counts"]["interrupted"] == LARGE // 500  # the generator's interrupted attempts
    assert list(frame.columns[:8]) == [
        "sweep",
        "trial_number",
        "status",
        "run_id",
        "train.lr",
        "model.width",
        "train.weight_decay",
        "seed",
    ]
    dtypes = frame.dtypes.astype(str).to_dict()
    assert dtypes["trial_number"] == "int64" and dtypes["train.lr"] == "float64"
    assert dtypes["model.width"] == "int64" and dtypes["seed"] == "int64" and dtypes["train.nesterov"] == "bool"
    assert dtypes["test_acc"] == "float64" and dtypes["hessian_top_eig"] == "float64"
    assert dtypes["n_test"] == "Int64" and dtypes["epochs"] == "Int64"
    assert frame.attrs["search_space"] == ["train.lr", "model.width", "train.weight_decay", "seed"]
    diverged = frame[frame["status"] == "diverged"]
    assert len(diverged) and diverged["hessian_top_eig"].isna().all()  # no measures on a diverged trial
    assert frame.loc[frame["status"] == "failed", "test_acc"].isna().all()
    # every grid point exactly once
    assert not frame.duplicated(["train.lr", "model.width", "train.weight_decay", "seed"]).any()
    everything = results(f"scale-{LARGE}", results_dir=sweeps_dir, include_interrupted=True)
    assert len(everything) == LARGE + LARGE // 500


def test_sql_read_equals_search_runs(sweeps_dir, monkeypatch):
    """The SQL read of a database store returns what MLflow's search_runs returns."""
    by_sql = results(f"scale-{SMALL}", results_dir=sweeps_dir, include_interrupted=True)
    read = queries._trial_runs
    monkeypatch.setattr(queries, "_trial_runs", lambda *a, **k: read(*a, use_sql=False))
    by_search = results(f"scale-{SMALL}", results_dir=sweeps_dir, include_interrupted=True)
    pd.testing.assert_frame_equal(by_sql, by_search)
    assert by_sql.attrs == by_search.attrs


@pytest.mark.parametrize("query", ["results", "status", "list"])
def test_read_cost_is_flat_in_the_number_of_trials(sweeps_dir, query):
    calls = {
        "results": lambda n: results(f"scale-{n}", results_dir=sweeps_dir),
        "status": lambda n: sweep_status(f"scale-{n}", results_dir=sweeps_dir),
        # lists both sweeps: time it against a store holding the small one alone
        "list": None,
    }
    if query == "list":
        small_dir = sweeps_dir.parent / "scale-list-small"
        if not small_dir.exists():
            bench.build_sweep(f"scale-{SMALL}", SMALL, connections.resolve(results_dir=small_dir, env={}))
        small = _best_of(lambda: list_sweeps(results_dir=small_dir))
        large = _best_of(lambda: list_sweeps(results_dir=sweeps_dir))  # SMALL + LARGE trials
    else:
        calls[query](SMALL)  # imports and connections are not what is measured
        small, large = _best_of(lambda: calls[query](SMALL)), _best_of(lambda: calls[query](LARGE))
    assert large / small <= FLAT, f"{query}: {large:.2f} s at {LARGE} trials vs {small:.2f} s at {SMALL}"


# --- the generator writes what MLflow and Optuna write -------------------------------------------


def test_bulk_runs_read_back_as_runs_written_by_mlflow(tmp_path):
    conn = connections.resolve(results_dir=tmp_path, env={})
    tracker = Tracker(conn.tracking_uri, conn.artifact_root)
    parent = tracker.start_parent("same", flat_config={"a": 1}, resolved_config={}, config_yaml="")
    bulk = bench.BulkRuns(conn.tracking_uri, tracker.client)
    fake = Tracker(conn.tracking_uri)
    fake.client = bulk
    fake._experiment_of[parent] = tracker._experiment(parent)
    metrics = {"test_acc": 0.5, "train_loss": float("inf"), "hessian_top_eig": float("nan"), "n_test": 100}
    ids = []
    for number, writer in enumerate((tracker, fake)):
        run = writer.start_child("same", parent, number, {"train.lr": 0.1, "model.width": 8})
        writer.log_metrics(run, [({"test_acc": 0.1}, 3, 1), ({"test_acc": 0.2}, 5, 2)])
        writer.finish_child(run, "failed", metrics, step=7, traceback="boom\n", tags={"sweeps.node_ip": "1.2.3.4"})
        ids.append(run)
    bulk.write()
    client = MlflowClient(conn.tracking_uri)
    real, copy = (client.get_run(i) for i in ids)
    assert {k: v for k, v in copy.data.tags.items() if k not in ("mlflow.runName", "optuna.trial_number")} == {
        k: v for k, v in real.data.tags.items() if k not in ("mlflow.runName", "optuna.trial_number")
    }
    assert copy.data.tags["mlflow.runName"] == "same-0001" and real.data.tags["mlflow.runName"] == "same-0000"
    assert copy.data.params == real.data.params
    assert str(copy.data.metrics) == str(real.data.metrics)  # NaN == NaN as text
    for field in ("status", "lifecycle_stage", "user_id", "experiment_id"):
        assert getattr(copy.info, field) == getattr(real.info, field), field
    assert copy.info.artifact_uri == real.info.artifact_uri.replace(ids[0], ids[1])
    assert [a.path for a in client.list_artifacts(ids[1])] == [a.path for a in client.list_artifacts(ids[0])]
    history = [[(m.step, m.value) for m in client.get_metric_history(i, "test_acc")] for i in ids]
    assert history[0] == history[1]
    found = client.search_runs([real.info.experiment_id], "tags.`sweeps.role` = 'trial'")
    assert {r.info.run_id for r in found} == set(ids)


def test_bulk_trials_read_back_as_trials_added_by_optuna(tmp_path):
    space = {"x": CategoricalDistribution([0.1, 1.0]), "n": CategoricalDistribution([8, 16])}
    start = dt.datetime(2026, 1, 1)

    def trials():
        return [
            FrozenTrial(
                number=i,
                state=state,
                value=None,
                values=values,
                datetime_start=start,
                datetime_complete=start + dt.timedelta(seconds=i),
                params={"x": 1.0, "n": 8 * (i + 1)},
                distributions=space,
                user_attrs={"status": s, "mlflow_run_id": f"r{i}"},
                system_attrs={"fixed_params": {"x": 1.0, "n": 8 * (i + 1)}},
                intermediate_values={},
                trial_id=i,
            )
            for i, (state, values, s) in enumerate(
                [(TrialState.COMPLETE, [0.5], "converged"), (TrialState.FAIL, None, "diverged")]
            )
        ]

    storage = search.make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    real = optuna.create_study(storage=storage, study_name="real", directions=["maximize"])
    real.add_trials(trials())
    copy = optuna.create_study(storage=storage, study_name="copy", directions=["maximize"])
    bench.add_trials_in_bulk(copy, trials())

    def fields(study):
        return [
            (
                t.number,
                t.state,
                t.values,
                t.params,
                t.distributions,
                t.user_attrs,
                t.system_attrs,
                t.datetime_start,
                t.datetime_complete,
            )
            for t in optuna.load_study(study_name=study, storage=storage).get_trials()
        ]

    assert fields("copy") == fields("real")


# --- the driver at scale (trivial trials: the driver's bookkeeping alone) ----------------------------
DRIVER_GRID, WINDOW = 2_000, 200
DRIVER_FLAT = 1.5  # seconds per trial over the last WINDOW / over the first WINDOW, at most


@pytest.fixture(scope="module")
def ray_address():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _assert_every_point_once(name: str, conn: connections.Connections) -> None:
    frame = results(name, results_dir=conn.results_dir)
    points = list(zip(*(frame[k] for k in frame.attrs["search_space"])))
    grid = bench.grid_for(DRIVER_GRID)
    assert len(points) == len(set(points)) == DRIVER_GRID
    assert set(points) == set(itertools.product(*(dim["values"] for dim in grid.values())))
    study = optuna.load_study(study_name=name, storage=search.make_storage(conn.storage))
    counted = [tuple(t.params[k] for k in grid) for t in search.finished_trials(study)]
    assert len(counted) == len(set(counted)) == DRIVER_GRID
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))


def test_driver_cost_is_flat_and_every_point_runs_once_after_sigkill_and_resume_at_2000(tmp_path, ray_address):
    """A driver of a 2,000-point trivial grid is SIGKILLed half-way; the next driver recovers
    what it left running and finishes the grid. The seconds per recorded trial over the resumed
    driver's last 200 are at most 1.5x the first driver's first 200 (a cost that grew with the
    study, e.g. a sampler rescanning it, would read about 10x), the resumed driver launches
    within a minute (it reads the study once), and every point ran exactly once, in MLflow and
    in Optuna. One sweep for the three checks: it is the slowest test of the suite."""
    conn = connections.resolve(results_dir=tmp_path, env={})
    measured = bench.kill_and_resume("killed", DRIVER_GRID, DRIVER_GRID // 2, conn, ray_address)
    assert DRIVER_GRID // 2 <= measured["killed_at"] < DRIVER_GRID
    assert measured["to_first_launch_s"] < 60
    times = bench.completion_times("killed", conn.storage)
    early, late, late_n = bench.seconds_per_trial(times, WINDOW, measured["resumed_at"])
    assert late_n == WINDOW and late / early <= DRIVER_FLAT, (early, late)
    _assert_every_point_once("killed", conn)
