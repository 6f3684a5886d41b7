"""A sweep at study scale (issue #15): what reading a 10,000-trial sweep back costs.

Parts (``--part``):

* ``queries``: a finished grid sweep of ``--trials`` trials is *written*, not run: the Optuna
  study and the MLflow runs a driver would have left (see :func:`build_sweep`), then
  ``sweeps.results``, ``sweep_status``, ``list_sweeps`` and ``report_sweep`` are timed on it, at
  ``--small`` trials and at ``--trials`` trials. The table gives seconds and the ratio
  large / small (10x the trials: a flat per-trial cost reads about 10x, a quadratic one 100x).
* ``driver``: driver seconds per trial at the start and the end of a trivial grid, and the time
  to resume a SIGKILLed sweep. Not written yet: another part of issue #15 adds it here
  (:func:`bench_driver`).

Stores: SQLite files under a temporary results directory (default), or with ``--postgres`` a
fresh PostgreSQL database per size (``--pg-url``, default the CI server on 127.0.0.1:5432, trust
auth) for Optuna and for MLflow, MLflow behind a real ``mlflow server`` started here.

The written sweep is indistinguishable, to the queries, from one the driver recorded: the
parent run comes from :meth:`sweeps.service.tracking.Tracker.start_parent`, each child run from
``Tracker.start_child`` and ``Tracker.finish_child`` (or ``Tracker.end`` for an interrupted
attempt), the study from :func:`sweeps.service.search.open_study` and the study attributes the driver
sets, and every trial carries what the driver's grid asks and :func:`sweeps.service.search.tell`
writes (``fixed_params``, categorical distributions over the grid's values, the
``mlflow_run_id`` and ``status`` user attributes, the objective value). Only the training is
left out: the metrics are made-up, deterministic numbers of the right names and kinds.

Run ``python benchmarks/bench_scale.py`` (``--trials 10000 --small 1000``; ``--postgres``).
Figures: ``docs/benchmarks.md``, "Queries at 10,000 trials".
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import func as sa_func
from sqlalchemy import select as sa_select

from sweeps.service import connections, search
from sweeps.service.tracking import Tracker
from sweeps.spec.config import load_config
from sweeps.spec.status import TrialStatus

# ---------------------------------------------------------------------------------------------
# The sweep generator (also used by tests/test_scale.py)
# ---------------------------------------------------------------------------------------------

GRID_DIMS = ("train.lr", "model.width", "train.weight_decay")  # then "seed" for the rest
_DIM_VALUES: dict[str, Callable[[int], list[Any]]] = {
    "train.lr": lambda k: [round(0.001 * 1.6**i, 6) for i in range(k)],
    "model.width": lambda k: [16 * (i + 1) for i in range(k)],
    "train.weight_decay": lambda k: [0.0] + [round(1e-5 * 3**i, 8) for i in range(k - 1)],
    "seed": lambda k: list(range(k)),
}


def grid_for(trials: int) -> dict[str, dict[str, list[Any]]]:
    """A search space whose full grid has exactly ``trials`` points: each of :data:`GRID_DIMS`
    takes the largest divisor <= 10 of what is left, ``seed`` the rest (10,000 = 10 x 10 x 10 x 10
    seeds; 2,000 = 10 x 10 x 10 x 2; 200 = 10 x 10 x 2 x 1)."""
    left, sizes = trials, {}
    for name in GRID_DIMS:
        sizes[name] = max(d for d in range(1, 11) if left % d == 0)
        left //= sizes[name]
    sizes["seed"] = left
    return {name: {"values": _DIM_VALUES[name](k)} for name, k in sizes.items()}


def sweep_config(name: str, trials: int) -> Any:
    """The config of a finished grid sweep of ``trials`` points on MNIST-1D (two measures)."""
    return load_config(
        {
            "name": name,
            "dataset": {"name": "mnist1d"},
            "model": {"name": "mlp", "depth": 2},
            "measure": ["hessian_top_eig", "hessian_trace"],
            "objective": {"metrics": ["test_acc"], "directions": ["maximize"]},
            "search": {"sampler": "grid", "space": grid_for(trials)},
        }
    )


def _outcome(number: int, point: dict[str, Any], measures: list[str]) -> tuple[str, dict[str, float]]:
    """A made-up but plausible (status, final metrics) of a trial: most converge, some do not,
    a few diverge (no measures) or fail (no metrics); every trial of seed 0 converges, so that the
    grid is complete and the report computes everything (psi, CMI)."""
    rng = random.Random(number)
    draw = rng.random() if point["seed"] else 1.0  # seed 0 converges: every grid cell has a model
    if draw < 0.01:
        return TrialStatus.FAILED, {}
    lr, width = float(point["train.lr"]), float(point["model.width"])
    steps = 32 * rng.randint(5, 40)
    base = {
        "epochs": float(steps // 32),
        "steps": float(steps),
        "train_seconds": rng.uniform(2, 9),
        "track_seconds": rng.uniform(0, 0.5),
        "n_train": 4000.0,
        "n_test": 1000.0,
        "num_params": float(40 * width + width * width + 10 * width + 2 * width + 10),
    }
    if draw < 0.05:
        return TrialStatus.DIVERGED, {**base, "train_loss": math.inf, "test_acc": 0.1, "train_acc": 0.1}
    train_acc = min(1.0, 0.6 + 0.05 * math.log1p(width) + rng.gauss(0, 0.03))
    test_acc = max(0.1, train_acc - 0.1 - 2 * lr + rng.gauss(0, 0.02))
    metrics = {
        **base,
        "train_loss": rng.uniform(0.01, 0.5),
        "train_acc": train_acc,
        "test_loss": rng.uniform(0.2, 1.2),
        "test_acc": test_acc,
        "gen_gap": (1 - test_acc) - (1 - train_acc),
    }
    for m in measures:
        metrics[m] = (1 / lr) * (1 + rng.random()) * (10 if m == "hessian_trace" else 1)
        metrics[f"{m}_seconds"] = rng.uniform(0.1, 2)
    return (TrialStatus.NOT_CONVERGED if draw < 0.12 else TrialStatus.CONVERGED), metrics


def build_sweep(
    name: str,
    trials: int,
    conn: connections.Connections,
    *,
    mlflow_db: str | None = None,
    epochs_logged: int = 3,
    interrupted_every: int = 500,
) -> dict[str, Any]:
    """Write a finished grid sweep ``name`` of ``trials`` points into ``conn``'s stores.

    The experiment and the parent run are written through ``conn.tracking_uri``; the child
    runs and the Optuna trials in bulk (:class:`BulkRuns`, :func:`add_trials_in_bulk`).

    Args:
        conn: where the sweep lives (Optuna storage, MLflow tracking URI, artifact root).
        mlflow_db: the database URL behind ``conn.tracking_uri`` (default: the tracking URI
            itself, a database URL for the file stores; an ``mlflow server``'s backend store).
        epochs_logged: per-epoch metric records streamed before the final ones (as the driver
            does while a trial trains).
        interrupted_every: one trial in this many is an interrupted attempt re-run at the end
            (0: none).

    Returns ``{"trials": optuna trials written, "runs": child runs, "seconds": time taken}``.
    """
    start = time.perf_counter()
    config = sweep_config(name, trials)
    resolved = config.model_dump(mode="json")
    tracker = Tracker(conn.tracking_uri, conn.artifact_root)
    parent = tracker.start_parent(
        name, flat_config=config.flat(), resolved_config=resolved, config_yaml=yaml.safe_dump(resolved, sort_keys=False)
    )
    study = search.open_study(config, conn.storage)
    # what runner._drive sets on the study when it starts
    study.set_user_attr("budget", search.n_trials(config))
    study.set_user_attr("mlflow_parent_run_id", parent)
    study.set_user_attr("tracking_uri", connections.redact(conn.tracking_uri))
    study.set_user_attr("config_yaml", yaml.safe_dump(resolved, sort_keys=False))

    bulk = BulkRuns(mlflow_db or conn.tracking_uri, tracker.client)
    children = Tracker(conn.tracking_uri)
    children.client = bulk  # the Tracker's own calls, recorded and written in one transaction
    children._experiment_of[parent] = tracker._experiment(parent)

    space = search.grid_space(config)
    names = list(space)
    points = [dict(zip(names, values)) for values in itertools.product(*space.values())]
    random.Random(config.search.seed).shuffle(points)
    distributions = {n: CategoricalDistribution(values) for n, values in space.items()}
    measures = list(config.measure)
    interrupted = set(range(0, trials, interrupted_every)) if interrupted_every else set()
    reruns = [(trials + j, number) for j, number in enumerate(sorted(interrupted))]
    frozen, t0 = [], dt.datetime.now()
    for number, point in [(n, points[n]) for n in range(trials)] + [(n, points[of]) for n, of in reruns]:
        run_id = children.start_child(name, parent, number, config.with_point(point).flat())
        attrs: dict[str, Any] = {"mlflow_run_id": run_id}
        if number >= trials:
            attrs["retry_of"] = reruns[number - trials][1]
        if number in interrupted:
            children.end(run_id, TrialStatus.INTERRUPTED)
            status, state, values = TrialStatus.INTERRUPTED, TrialState.FAIL, None
        else:
            status, metrics = _outcome(number, point, measures)
            history = [
                ({"train_loss": 1.0 / (e + 1), "test_acc": 0.5 + 0.1 * e}, 32 * (e + 1), _now_ms())
                for e in range(epochs_logged)
            ]
            if history and metrics:
                children.log_metrics(run_id, history)
            children.finish_child(
                run_id,
                status,
                metrics,
                step=int(metrics.get("steps", 0)),
                traceback="Traceback: made up by benchmarks/bench_scale.py\n" if status == TrialStatus.FAILED else None,
            )
            state = TrialStatus(status).optuna_state
            values = [metrics["test_acc"]] if state == TrialState.COMPLETE else None
        frozen.append(
            FrozenTrial(
                number=number,
                state=state,
                value=None,
                values=values,
                datetime_start=t0,
                datetime_complete=t0 + dt.timedelta(seconds=1),
                params=dict(point),
                distributions=distributions,
                user_attrs={**attrs, "status": str(status)},
                system_attrs={"fixed_params": dict(point)},
                intermediate_values={},
                trial_id=number,
            )
        )
    bulk.write()
    add_trials_in_bulk(study, frozen)
    counts = search.status_counts(study)
    tracker.end_parent(parent, "FINISHED", {f"trials_{k}": float(v) for k, v in counts.items()})
    return {"trials": len(frozen), "runs": len(bulk.runs), "seconds": time.perf_counter() - start}


def _now_ms() -> int:
    return int(time.time() * 1000)


class BulkRuns:
    """Stands in for the ``MlflowClient`` of a :class:`~sweeps.service.tracking.Tracker`: records the
    calls the Tracker makes (``create_run``, ``log_batch``, ``set_tag``, ``set_terminated``,
    ``log_artifacts``) and :meth:`write` turns them into the rows MLflow's SQL store would have
    written, in one transaction (MLflow's own store commits 5-13 times per child run: ~30 ms
    each on this machine, 5 minutes for 10,000 runs). Artifacts go through ``artifact_client``
    after the rows exist. ``tests/test_scale.py`` checks that a run written here reads back
    exactly as one written by MLflow.

    The rules copied from ``mlflow.store.tracking.sqlalchemy_store``: a run starts RUNNING with
    a ``mlflow.runName`` tag, artifact URI ``<experiment location>/<run id>/artifacts``, user
    ``unknown``; a tag set twice keeps its last value; NaN is stored as 0 with ``is_nan``, +-inf
    as +-``sys.float_info.max``; the latest metric of a key is the largest (step, timestamp, value).
    """

    def __init__(self, db_url: str, artifact_client: Any) -> None:
        import sqlalchemy as sa

        self.engine = sa.create_engine(db_url)
        self.artifact_client = artifact_client
        self.runs: dict[str, dict[str, Any]] = {}
        self.tags: dict[str, dict[str, str]] = {}
        self.params: list[dict[str, Any]] = []
        self.metrics: list[dict[str, Any]] = []
        self.files: list[tuple[str, dict[str, bytes]]] = []
        self._location: dict[str, str] = {}

    def create_run(
        self,
        experiment_id: str,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        start_time: int | None = None,
    ) -> Any:
        from types import SimpleNamespace

        from mlflow.utils.uri import append_to_uri_path

        if experiment_id not in self._location:
            self._location[experiment_id] = self.artifact_client.get_experiment(experiment_id).artifact_location
        run_id = uuid.uuid4().hex
        self.runs[run_id] = {
            "run_uuid": run_id,
            "name": run_name,
            "source_type": "UNKNOWN",
            "source_name": "",
            "entry_point_name": "",
            "user_id": (tags or {}).get("mlflow.user", "unknown"),
            "status": "RUNNING",
            "start_time": start_time or _now_ms(),
            "end_time": None,
            "deleted_time": None,
            "source_version": "",
            "lifecycle_stage": "active",
            "experiment_id": int(experiment_id),
            "artifact_uri": append_to_uri_path(self._location[experiment_id], run_id, "artifacts"),
        }
        self.tags[run_id] = {**(tags or {}), "mlflow.runName": run_name}
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, experiment_id=experiment_id))

    def log_batch(
        self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = (), synchronous: bool = True
    ) -> None:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        self.params += [{"run_uuid": run_id, "key": p.key, "value": p.value} for p in params]
        for m in metrics:
            is_nan, value = SqlAlchemyStore.sanitize_metric_value(None, m.value)  # uses no state
            self.metrics.append(
                {
                    "run_uuid": run_id,
                    "key": m.key,
                    "value": value,
                    "timestamp": m.timestamp,
                    "step": m.step,
                    "is_nan": is_nan,
                }
            )
        self.tags[run_id].update({t.key: t.value for t in tags})

    def set_tag(self, run_id: str, key: str, value: Any, synchronous: bool = True) -> None:
        self.tags[run_id][key] = str(value)

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        self.runs[run_id].update(status=status or "FINISHED", end_time=end_time or _now_ms())

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        root = Path(local_dir)
        self.files.append((run_id, {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}))

    def write(self) -> None:
        """Insert every recorded row in one transaction, then upload the artifacts."""
        from mlflow.store.tracking.dbmodels.models import (
            SqlLatestMetric,
            SqlMetric,
            SqlParam,
            SqlRun,
            SqlTag,
        )

        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for m in self.metrics:
            key = (m["run_uuid"], m["key"])
            if key not in latest or (m["step"], m["timestamp"], m["value"]) > tuple(
                latest[key][k] for k in ("step", "timestamp", "value")
            ):
                latest[key] = m
        tags = [{"run_uuid": r, "key": k, "value": v} for r, kv in self.tags.items() for k, v in kv.items()]
        with self.engine.begin() as db:
            for model, rows in (
                (SqlRun, list(self.runs.values())),
                (SqlTag, tags),
                (SqlParam, self.params),
                (SqlMetric, self.metrics),
                (SqlLatestMetric, list(latest.values())),
            ):
                for start in range(0, len(rows), 20_000):
                    db.execute(model.__table__.insert(), rows[start : start + 20_000])
        self.engine.dispose()
        for run_id, files in self.files:
            with tempfile.TemporaryDirectory() as tmp:
                for name, content in files.items():
                    Path(tmp, name).parent.mkdir(parents=True, exist_ok=True)
                    Path(tmp, name).write_bytes(content)
                self.artifact_client.log_artifacts(run_id, tmp)


def add_trials_in_bulk(study: optuna.Study, trials: list[FrozenTrial]) -> None:
    """``study.add_trials(trials)`` for an RDB storage, in one transaction: the rows Optuna's
    ``RDBStorage._create_new_trial`` writes for a template trial (Optuna commits per trial: ~7 ms
    each here). Numbers follow the trials already in the study, in list order."""
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models

    storage = getattr(study._storage, "_backend", study._storage)  # under Optuna's cache
    engine = getattr(storage, "engine", None)
    if engine is None:  # a journal or in-memory storage: the ordinary way
        study.add_trials(trials)
        return
    with engine.begin() as db:
        table = models.TrialModel.__table__
        base = db.execute(
            sa_select(sa_func.count()).select_from(table).where(table.c.study_id == study._study_id)
        ).scalar_one()
        db.execute(
            table.insert(),
            [
                {
                    "number": base + i,
                    "study_id": study._study_id,
                    "state": t.state,
                    "datetime_start": t.datetime_start,
                    "datetime_complete": t.datetime_complete,
                }
                for i, t in enumerate(trials)
            ],
        )
        ids = dict(
            db.execute(
                sa_select(table.c.number, table.c.trial_id).where(table.c.study_id == study._study_id)
            ).fetchall()
        )
        params, values, user, system = [], [], [], []
        for i, t in enumerate(trials):
            trial_id = ids[base + i]
            for name, value in t.params.items():
                dist = t.distributions[name]
                params.append(
                    {
                        "trial_id": trial_id,
                        "param_name": name,
                        "param_value": dist.to_internal_repr(value),
                        "distribution_json": distribution_to_json(dist),
                    }
                )
            for objective, value in enumerate(t.values or []):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                values.append({"trial_id": trial_id, "objective": objective, "value": stored, "value_type": kind})
            user += [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in t.user_attrs.items()]
            system += [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in t.system_attrs.items()]
        for model, rows in (
            (models.TrialParamModel, params),
            (models.TrialValueModel, values),
            (models.TrialUserAttributeModel, user),
            (models.TrialSystemAttributeModel, system),
        ):
            if rows:
                db.execute(model.__table__.insert(), rows)


# ---------------------------------------------------------------------------------------------
# Stores: SQLite files, or PostgreSQL + a real `mlflow server`
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def sqlite_stores(root: Path) -> Iterator[Callable[[str], tuple[connections.Connections, str | None]]]:
    """``stores(label)``: the default file stores of a results directory ``root/label``."""

    def stores(label: str) -> tuple[connections.Connections, str | None]:
        return connections.resolve(results_dir=root / label, env={}), None

    yield stores


@contextlib.contextmanager
def postgres_stores(
    root: Path, admin_url: str
) -> Iterator[Callable[[str], tuple[connections.Connections, str | None]]]:
    """``stores(label)``: a fresh PostgreSQL database for Optuna and one for MLflow, MLflow behind
    an ``mlflow server`` started here (stopped and the databases dropped on exit)."""
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    created: list[str] = []
    servers: list[subprocess.Popen] = []

    def database(name: str) -> str:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return admin.url.set(database=name).render_as_string(hide_password=False)

    def stores(label: str) -> tuple[connections.Connections, str | None]:
        tag = f"bench_scale_{label}_{os.getpid()}"
        optuna_url, mlflow_url = database(f"{tag}_optuna"), database(f"{tag}_mlflow")
        port = _free_port()
        log = open(root / f"mlflow-server-{label}.log", "wb")  # noqa: SIM115 (closed with the process)
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                mlflow_url,
                "--default-artifact-root",
                (root / f"artifacts-{label}").as_uri(),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        servers.append(server)
        uri = f"http://127.0.0.1:{port}"
        _wait_for(uri, server, root / f"mlflow-server-{label}.log")
        conn = connections.resolve(results_dir=root / label, tracking_uri=uri, storage=optuna_url, env={})
        return conn, mlflow_url

    try:
        yield stores
    finally:
        for server in servers:
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(20)
            if server.poll() is None:
                server.kill()
        search._SERVER_STORAGES.clear()  # release Optuna's pooled connections before the drop
        import gc

        gc.collect()
        with admin.connect() as c:
            for name in created:
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _wait_for(uri: str, server: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({server.returncode}); see {log}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
            if answer.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer within {timeout:.0f} s; see {log}")


# ---------------------------------------------------------------------------------------------
# Part "queries"
# ---------------------------------------------------------------------------------------------


def time_queries(
    name: str, conn: connections.Connections, *, repeats: int = 1, report: bool = True, out_dir: Path | None = None
) -> dict[str, float]:
    """Seconds of each read (best of ``repeats``), in this process: ``results``, ``status``, ``list``
    and ``report`` (``report_sweep`` without the upload, ``n_boot=1000`` as the CLI's default)."""
    from sweeps.posthoc.queries import list_sweeps, results, sweep_status
    from sweeps.posthoc.report import report_sweep

    calls: dict[str, Callable[[], Any]] = {
        "results": lambda: results(name, conn.tracking_uri, results_dir=conn.results_dir),
        "status": lambda: sweep_status(
            name, storage=conn.storage, tracking_uri=conn.tracking_uri, results_dir=conn.results_dir
        ),
        "list": lambda: list_sweeps(storage=conn.storage, results_dir=conn.results_dir),
    }
    if report:
        calls["report"] = lambda: report_sweep(
            name, conn.tracking_uri, out_dir or conn.results_dir / "report", log=False, results_dir=conn.results_dir
        )
    times = {}
    for key, call in calls.items():
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        times[key] = best
    return times


def bench_queries(
    sizes: list[int],
    *,
    postgres: bool = False,
    pg_url: str | None = None,
    repeats: int = 1,
    keep: Path | None = None,
    report: bool = True,
) -> dict[int, dict[str, float]]:
    """Build one sweep per size and time the reads on it; prints a Markdown table."""
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    manager = (
        postgres_stores(root, pg_url or "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
        if postgres
        else sqlite_stores(root)
    )
    measured: dict[int, dict[str, float]] = {}
    store = "PostgreSQL + mlflow server" if postgres else "SQLite files"
    try:
        with manager as stores:
            for n in sizes:
                conn, direct = stores(f"n{n}")
                marker = conn.results_dir / "built.json"
                if postgres or not marker.exists():  # --keep DIR: a SQLite sweep built there before is reused
                    built = build_sweep(f"scale-{n}", n, conn, mlflow_db=direct)
                    marker.write_text(json.dumps(built))
                    print(
                        f"built scale-{n}: {built['trials']} trials, {built['runs']} child runs in "
                        f"{built['seconds']:.0f} s",
                        flush=True,
                    )
                measured[n] = time_queries(f"scale-{n}", conn, repeats=repeats, report=report)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    keys = list(next(iter(measured.values())))
    small, large = min(sizes), max(sizes)
    print(
        f"\n{store}; python {platform.python_version()}, optuna {optuna.__version__}, "
        f"{os.cpu_count()} CPUs; seconds, best of {repeats}"
    )
    print("| query | " + " | ".join(f"{n:,} trials (s)" for n in sizes) + f" | ratio {large:,} / {small:,} |")
    print("|---|" + "---:|" * (len(sizes) + 1))
    for key in keys:
        cells = " | ".join(f"{measured[n][key]:.2f}" for n in sizes)
        print(f"| {key} | {cells} | {measured[large][key] / measured[small][key]:.1f}x |")
    return measured


# ---------------------------------------------------------------------------------------------
# Part "driver": what running a 10,000-trial sweep costs the driver
# ---------------------------------------------------------------------------------------------


def trivial_trial(config: Any, *, log: Any = None, out_dir: Any = None, device: Any = None) -> Any:
    """A trial that trains nothing: the made-up outcome (:func:`_outcome`) of its point, at once.
    With it a sweep's wall time is the driver's (and the cluster's) bookkeeping alone."""
    import zlib

    from sweeps.trial.run import TrialResult

    flat = config.flat()
    point = {k: flat[k] for k in (*GRID_DIMS, "seed")}
    status, metrics = _outcome(zlib.crc32(json.dumps(point, sort_keys=True).encode()), point, list(config.measure))
    return TrialResult(status, metrics, [], {}, config)


def drive(name: str, trials: int, conn: connections.Connections, address: str, quiet: bool = True) -> Any:
    """Run (or continue) the trivial grid sweep ``name`` of ``trials`` points to the end."""
    from sweeps.runner import run_sweep

    return run_sweep(
        sweep_config(name, trials),
        results_dir=conn.results_dir,
        tracking_uri=conn.tracking_uri,
        storage=conn.storage,
        address=address,
        quiet=quiet,
        trial_fn=trivial_trial,
        report=False,
    )


def completion_times(name: str, storage: str) -> list[float]:
    """POSIX seconds at which the sweep's trials were recorded (Optuna ``datetime_complete``), sorted."""
    study = optuna.load_study(study_name=name, storage=search.make_storage(storage))
    done = [t.datetime_complete for t in search.finished_trials(study) if t.datetime_complete is not None]
    return sorted(d.timestamp() for d in done)


def seconds_per_trial(times: list[float], window: int, resumed_at: float | None = None) -> tuple[float, float, int]:
    """Mean seconds between recorded trials over the first and the last ``window`` trials, and
    how many trials the last window holds. With ``resumed_at`` (POSIX seconds at which a
    resumed driver started) the last window holds only that driver's trials, so that the time
    between the kill and the resume is not counted as time per trial."""
    late = [t for t in times if resumed_at is None or t >= resumed_at][-window:]
    return (times[window - 1] - times[0]) / (window - 1), (late[-1] - late[0]) / (len(late) - 1), len(late)


def _finished_count(storage: str, name: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(storage)
    try:
        with engine.connect() as c:
            return int(
                c.execute(
                    sa.text(
                        "select count(*) from trials t join studies s on s.study_id = t.study_id "
                        "where s.study_name = :n and t.state in ('COMPLETE', 'FAIL', 'PRUNED')"
                    ),
                    {"n": name},
                ).scalar()
            )
    except (sa.exc.OperationalError, sa.exc.ProgrammingError):  # no tables yet (SQLite, PostgreSQL)
        return 0
    finally:
        engine.dispose()


#: The child drivers' lease (s): the resumed driver starts once a killed one's lease has expired,
#: as a user would after `sweeps run` refused (the default lease is 30 s).
KILLED_LEASE_S = 5.0


def _driver_process(
    name: str, trials: int, conn: connections.Connections, address: str, stderr: Any = subprocess.PIPE
) -> subprocess.Popen:
    """``drive`` in a child process (it can be SIGKILLed), logging each trial's start on ``stderr``
    (a pipe the caller must read as it goes: a full pipe blocks the driver's next log line)."""
    args = [
        sys.executable,
        __file__,
        "--part",
        "drive",
        "--name",
        name,
        "--trials",
        str(trials),
        "--results-dir",
        str(conn.results_dir),
        "--tracking-uri",
        conn.tracking_uri,
        "--storage",
        conn.storage,
        "--address",
        address,
    ]
    env = {**os.environ, "SWEEPS_LEASE_SECONDS": str(KILLED_LEASE_S)}
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=env)


def kill_and_resume(
    name: str, trials: int, kill_at: int, conn: connections.Connections, address: str
) -> dict[str, float]:
    """Run the trivial grid in a child driver, SIGKILL it once ``kill_at`` trials are recorded,
    wait for its lease to expire (:data:`KILLED_LEASE_S`), start a second driver and time it from
    its start to its first launch (``trial N: started``); then let it finish. Returns ``{"killed_at", "to_first_launch_s", "resumed_total_s"}``."""
    log = Path(conn.results_dir) / "killed-driver.log"
    with open(log, "w") as first_err:
        first = _driver_process(name, trials, conn, address, stderr=first_err)
        try:
            while (done := _finished_count(conn.storage, name)) < kill_at:
                if first.poll() is not None:
                    raise RuntimeError(f"the driver ended before {kill_at} trials: {log.read_text()[-3000:]}")
                time.sleep(0.5)
        finally:
            first.kill()
            first.wait()
    time.sleep(KILLED_LEASE_S + 1)
    start, resumed_at = time.monotonic(), time.time()
    second = _driver_process(name, trials, conn, address)
    to_first, tail = math.nan, collections.deque(maxlen=40)
    for line in second.stderr:
        tail.append(line)
        if ": started " in line and math.isnan(to_first):
            to_first = time.monotonic() - start
    second.wait()
    if second.returncode != 0:
        raise RuntimeError(f"the resumed driver exited {second.returncode}:\n{''.join(tail)}")
    return {
        "killed_at": float(done),
        "to_first_launch_s": to_first,
        "resumed_total_s": time.monotonic() - start,
        "resumed_at": resumed_at,
    }


@contextlib.contextmanager
def counting_sql() -> Iterator[dict[str, collections.Counter]]:
    """Count the SQL statements and commits of every SQLAlchemy engine in this process (Optuna's
    storage, MLflow's store on a local database, the lease), by the statement's first words."""
    import sqlalchemy as sa

    counts: dict[str, collections.Counter] = {"statements": collections.Counter(), "commits": collections.Counter()}

    def statement(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        counts["statements"][" ".join(sql.split()[:3])[:60]] += 1

    def commit(conn: Any) -> None:
        counts["commits"]["commit"] += 1

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", statement)
    sa.event.listen(sa.engine.Engine, "commit", commit)
    try:
        yield counts
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", statement)
        sa.event.remove(sa.engine.Engine, "commit", commit)


def bench_driver(
    trials: int,
    window: int,
    kill_at: int | None,
    *,
    postgres: bool = False,
    pg_url: str | None = None,
    keep: Path | None = None,
) -> dict[str, float]:
    """Driver seconds per trial over the first and the last ``window`` trials of a ``trials``-point
    trivial grid, and (with ``kill_at``) the time to resume it after a SIGKILL at ``kill_at``
    trials; prints a Markdown table."""
    import ray

    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench-driver-"))
    root.mkdir(parents=True, exist_ok=True)
    manager = (
        postgres_stores(root, pg_url or "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
        if postgres
        else sqlite_stores(root)
    )
    store = "PostgreSQL + mlflow server" if postgres else "SQLite files"
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    try:
        with manager as stores:
            conn, _ = stores("driver")
            name = f"driver-{trials}"
            start = time.monotonic()
            if kill_at:
                measured = kill_and_resume(name, trials, kill_at, conn, address)
            else:
                with counting_sql() as sql:
                    drive(name, trials, conn, address)
                measured = {
                    "statements_per_trial": sum(sql["statements"].values()) / trials,
                    "commits_per_trial": sum(sql["commits"].values()) / trials,
                }
                top = ", ".join(f"{k!r} {v / trials:.1f}" for k, v in sql["statements"].most_common(12))
                print(
                    f"SQL per trial (in this process): {measured['statements_per_trial']:.1f} statements, "
                    f"{measured['commits_per_trial']:.1f} commits; most frequent: {top}"
                )
            measured["wall_s"] = time.monotonic() - start
            times = completion_times(name, conn.storage)
            assert len(times) == trials, (len(times), trials)
            early, late, late_n = seconds_per_trial(times, window, measured.get("resumed_at"))
            measured.update({"early_ms": 1000 * early, "late_ms": 1000 * late, "ratio": late / early, "late_n": late_n})
    finally:
        ray.shutdown()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"\n{store}; {trials:,}-point trivial grid; python {platform.python_version()}, optuna "
        f"{optuna.__version__}, {os.cpu_count()} CPUs"
    )
    late_n = int(measured["late_n"])
    print(
        f"| trials 1-{window:,} (ms/trial) | trials {trials - late_n + 1:,}-{trials:,} (ms/trial) | ratio | "
        "wall (s) | resume: to first launch (s) |"
    )
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {measured['early_ms']:.1f} | {measured['late_ms']:.1f} | {measured['ratio']:.2f}x | {measured['wall_s']:.0f} | "
        + (f"{measured['to_first_launch_s']:.1f} (killed at {measured['killed_at']:,.0f})" if kill_at else "-")
        + " |"
    )
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part",
        choices=("queries", "driver", "drive"),
        default="queries",
        help="drive: one driver of the trivial grid (the child process of --part driver)",
    )
    parser.add_argument("--trials", type=int, default=10_000, help="the large sweep (default 10,000)")
    parser.add_argument("--small", type=int, default=1_000, help="the small sweep (default 1,000)")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL + `mlflow server` instead of SQLite")
    parser.add_argument("--pg-url", help="admin URL of the PostgreSQL server (default: the CI server, database test)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-report", dest="report", action="store_false", help="skip `sweeps report`")
    parser.add_argument("--keep", type=Path, help="keep the stores in this folder (SQLite: reused by the next run)")
    parser.add_argument("--window", type=int, default=1_000, help="driver: trials at the start and at the end compared")
    parser.add_argument(
        "--kill-at", type=int, default=None, help="driver: SIGKILL the driver after this many trials, then resume"
    )
    for flag in ("--name", "--results-dir", "--tracking-uri", "--storage", "--address"):
        parser.add_argument(flag, help=argparse.SUPPRESS)  # --part drive
    args = parser.parse_args()
    if args.part == "drive":
        conn = connections.resolve(
            results_dir=args.results_dir, tracking_uri=args.tracking_uri, storage=args.storage, env={}
        )
        drive(args.name, args.trials, conn, args.address, quiet=False)
        return
    if args.part == "driver":
        bench_driver(args.trials, args.window, args.kill_at, postgres=args.postgres, pg_url=args.pg_url, keep=args.keep)
        return
    bench_queries(
        sorted({args.small, args.trials}),
        postgres=args.postgres,
        pg_url=args.pg_url,
        repeats=args.repeats,
        keep=args.keep,
        report=args.report,
    )


if __name__ == "__main__":
    main()
