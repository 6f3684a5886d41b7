"""sweeps.service.search: samplers, study creation/resume rules, telling results, re-enqueueing interrupted points.

Real Optuna studies on real storages (sqlite file, journal file, PostgreSQL); no Ray needed.
"""

from __future__ import annotations

import itertools
import math
import random

import optuna
import pytest
from optuna.trial import TrialState

from sweeps.service import search
from sweeps.spec.config import load_config

pytestmark = pytest.mark.lowest  # .ci/lowest runs this module on the lowest versions


def make_config(name="s", sampler="grid", space=None, **extra):
    space = space or {"train.lr": {"values": [0.01, 0.1, 1.0]}, "model.width": {"values": [8, 16]}}
    data = {
        "name": name,
        "dataset": {"name": "digits"},
        "measure": ["hessian_top_eig"],
        "search": {"sampler": sampler, "space": space, **extra.pop("search", {})},
    }
    data.update(extra)
    return load_config(data)


@pytest.fixture
def storage(tmp_path):
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def drive(study, config, budget, stop_after=None, interrupt_running=0):
    """A driver without Ray: ask until ``budget`` trials are finished; returns asked points."""
    asked = []
    while len(search.finished_trials(study)) < budget:
        trial = study.ask()
        point = search.suggest_point(trial, config)
        asked.append(point)
        if stop_after is not None and len(asked) > stop_after:
            if interrupt_running:
                return asked  # leave it RUNNING, as a killed driver would
        search.tell(study, trial.number, "converged", {"test_acc": point["train.lr"]})
    return asked


def test_grid_visits_every_point_exactly_once(storage):
    config = make_config()
    study = search.open_study(config, storage)
    assert search.n_trials(config) == search.grid_size(config) == 6
    drive(study, config, 6)
    names = ["train.lr", "model.width"]
    done = sorted(search.grid_points_done(study, names))
    assert done == sorted(itertools.product([0.01, 0.1, 1.0], [8, 16]))
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_interrupted_points_are_reenqueued_and_finished_once(storage):
    config = make_config()
    study = search.open_study(config, storage)
    drive(study, config, 6, stop_after=2, interrupt_running=1)  # 2 told, the 3rd left RUNNING
    t1 = study.ask()  # a 4th, also RUNNING at the "kill"
    search.suggest_point(t1, config)
    stale = search.stale_trials(study)
    assert len(stale) == 2
    # the next driver: marks them interrupted (FAIL), re-enqueues, and finishes the grid
    study2 = search.open_study(config, storage)
    for trial in search.stale_trials(study2):
        search.interrupt(study2, trial)
    assert not search.stale_trials(study2)
    assert {search.trial_status(t) for t in study2.trials if t.state == TrialState.FAIL} == {"interrupted"}
    drive(study2, config, 6)
    done = search.grid_points_done(study2, ["train.lr", "model.width"])
    assert sorted(done) == sorted(itertools.product([0.01, 0.1, 1.0], [8, 16]))  # each exactly once
    assert len(study2.trials) == 8  # 6 finished + 2 interrupted attempts


@pytest.mark.parametrize("suggested", [0, 1])
@pytest.mark.parametrize("sampler", ["grid", "random"])
def test_point_of_a_driver_killed_between_ask_and_suggest_is_kept(storage, sampler, suggested):
    """A driver killed after ``ask`` but before every ``suggest_*`` was stored leaves a RUNNING
    trial with some or none of its params. The grid sampler assigned the whole point at ``ask``:
    the next driver re-enqueues all of it (a partial point made ``GridSampler`` raise "All
    parameters must be specified" at the next ask), and every grid point still runs once."""
    config = make_config(sampler=sampler, search={"n_trials": 6} if sampler == "random" else {})
    study = search.open_study(config, storage)
    drive(study, config, 6, stop_after=1, interrupt_running=1)  # 1 told, 1 left RUNNING (complete)
    cut = study.ask()  # killed here: `suggested` of the 2 params stored
    if suggested:
        cut.suggest_categorical("model.width", [8, 16])
    for retry in range(2):  # a re-enqueued point killed again before its suggests
        study2 = search.open_study(config, storage)
        for trial in search.stale_trials(study2):
            assert search.interrupt(study2, trial)  # re-enqueued
        if retry == 0:
            study2.ask()
    drive(study2, config, 6)
    done = search.grid_points_done(study2, ["train.lr", "model.width"])
    assert len(done) == 6
    if sampler == "grid":
        assert sorted(done) == sorted(itertools.product([0.01, 0.1, 1.0], [8, 16]))  # each exactly once


def test_a_grid_trial_killed_before_it_had_a_point_is_not_reenqueued(storage):
    config = make_config()
    study = search.open_study(config, storage)
    # the state between creating the trial and the grid sampler's before_trial: no point yet
    # (add_trial stores the trial as given, without the sampler)
    study.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING))
    (number,) = [t.number for t in search.stale_trials(study)]
    assert not search.interrupt(study, number)
    drive(study, config, 6)
    assert sorted(search.grid_points_done(study, ["train.lr", "model.width"])) == sorted(
        itertools.product([0.01, 0.1, 1.0], [8, 16])
    )


def test_same_config_resumes_other_config_conflicts(storage):
    config = make_config()
    search.open_study(config, storage)
    again = search.open_study(make_config(resources={"cpus_per_trial": 2}, search={"n_trials": 6}), storage)
    assert again.study_name == "s"  # resources and n_trials are not part of the fingerprint
    with pytest.raises(search.StudyConflictError, match=r"sweeps resume s.*--name"):
        search.open_study(make_config(train={"lr": 0.2}), storage)
    with pytest.raises(search.StudyConflictError, match="no sweep named 'other'"):
        search.open_study(make_config(name="other"), storage, resume=True)
    stored = load_config(search.stored_config("s", storage))  # the latest compatible config
    assert stored.resources.cpus_per_trial == 2 and stored.search.n_trials == 6
    assert stored.train == config.train and stored.search.space == config.search.space


def test_tell_states_and_nonfinite_objective(storage):
    config = make_config(sampler="random", search={"n_trials": 5})
    study = search.open_study(config, storage)
    outcomes = [
        ("converged", {"test_acc": 0.9}),
        ("not_converged", {"test_acc": 0.5}),
        ("diverged", {"train_loss": math.inf}),
        ("failed", {}),
        ("converged", {"test_acc": math.nan}),
    ]
    for status, metrics in outcomes:
        trial = study.ask()
        search.suggest_point(trial, config)
        search.tell(study, trial.number, status, metrics)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.FAIL]
    assert [search.trial_status(t) for t in study.trials] == [s for s, _ in outcomes]
    assert "not finite" in study.trials[4].user_attrs["fail_reason"]
    assert study.best_value == 0.9
    assert len(search.finished_trials(study)) == 5


@pytest.mark.parametrize("sampler", ["random", "tpe", "cmaes", "nsga2"])
def test_samplers_respect_space_and_types(storage, sampler):
    space = {
        "train.lr": {"low": 1e-3, "high": 1.0, "log": True},
        "model.width": {"low": 4, "high": 64, "log": True},
        "train.momentum": {"low": 0.0, "high": 0.9},
    }
    multi = sampler == "nsga2"
    objective = {"metrics": ["test_acc", "hessian_top_eig"], "directions": ["maximize", "minimize"]} if multi else {}
    config = make_config(
        sampler=sampler, space=space, search={"n_trials": 12, "seed": 3}, objective=objective or {"metric": "test_acc"}
    )
    study = search.open_study(config, storage)
    assert len(study.directions) == (2 if multi else 1)
    for _ in range(12):
        trial = study.ask()
        point = search.suggest_point(trial, config)
        assert 1e-3 <= point["train.lr"] <= 1.0 and isinstance(point["train.lr"], float)
        assert 4 <= point["model.width"] <= 64 and isinstance(point["model.width"], int)
        assert 0.0 <= point["train.momentum"] <= 0.9 and isinstance(point["train.momentum"], float)
        config.with_point(point)  # every point is a valid config
        values = {"test_acc": point["train.lr"], "hessian_top_eig": point["model.width"]}
        search.tell(study, trial.number, "converged", values)
    assert len(search.finished_trials(study)) == 12
    if multi:
        assert all(len(t.values) == 2 for t in study.best_trials)


def test_validation_errors_name_fields(storage):
    with pytest.raises(ValueError, match="cmaes is single-objective"):
        search.validate_search(
            make_config(
                sampler="cmaes",
                space={"train.lr": {"low": 0.01, "high": 1.0}},
                search={"n_trials": 3},
                objective={"metrics": ["test_acc", "hessian_top_eig"], "directions": ["maximize", "minimize"]},
            )
        )
    with pytest.raises(ValueError, match=r"^search.sampler: unknown sampler"):
        config = make_config()
        object.__setattr__(config.search, "sampler", "annealing")
        search.build_sampler(config)


def test_journal_storage(tmp_path):
    config = make_config()
    path = str(tmp_path / "study.log")
    study = search.open_study(config, path)
    drive(study, config, 6)
    reloaded = optuna.load_study(study_name="s", storage=search.make_storage(path))
    assert len(search.finished_trials(reloaded)) == 6


@pytest.mark.postgres
def test_server_storage_is_one_pool_per_process():
    """Polling a PostgreSQL study (as `sweeps status` in a loop or a test does) must not open a
    connection per call: a storage per call keeps its pool until garbage collection, and the
    multi-node test's 0.5 s polls exhausted the server's default 100 connections in CI."""
    from contextlib import closing

    from _cluster import Postgres

    Postgres.require()
    pg = Postgres()
    url = pg.create("optuna")
    try:
        optuna.create_study(study_name="poll", storage=search.make_storage(url))
        assert search.make_storage(url) is search.make_storage(url)
        database = url.rsplit("/", 1)[1]
        with closing(Postgres._connect()) as admin, admin.cursor() as cursor:
            for _ in range(30):
                optuna.load_study(study_name="poll", storage=search.make_storage(url)).get_trials()
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,))
            (open_connections,) = cursor.fetchone()
        assert 1 <= open_connections <= 2, open_connections
    finally:
        pg.drop_all()


def test_a_started_grid_trial_is_an_asked_enqueued_trial():
    """search.start_trial writes in one transaction what enqueue_trial + ask + suggest leave:
    the same params and distributions, fixed_params, RUNNING; interrupt re-enqueues it whole."""
    config = load_config(
        {
            "name": "start",
            "search": {
                "sampler": "grid",
                "space": {"train.lr": {"values": [0.1, 0.2]}, "train.batch_size": {"values": [32, "full"]}},
            },
        }
    )
    study = optuna.create_study(sampler=search.build_sampler(config))
    point = {"train.lr": 0.2, "train.batch_size": "full"}
    started = search.start_trial(study, point, search.grid_distributions(config))
    study.enqueue_trial(point, skip_if_exists=False)
    asked = study.ask()
    assert search.suggest_point(asked, config) == point
    mine, theirs = study.trials[started.number], study.trials[asked.number]
    assert mine.state == theirs.state == TrialState.RUNNING
    assert mine.params == theirs.params == point and mine.distributions == theirs.distributions
    assert mine.system_attrs["fixed_params"] == point
    assert search.suggest_point(started, config) == point  # suggest on it returns the point, no sampling
    assert search.interrupt(study, started.number)
    assert study.trials[-1].state == TrialState.WAITING and study.trials[-1].system_attrs["fixed_params"] == point


@pytest.mark.parametrize(
    "directions", [["maximize"], ["minimize"], ["minimize", "maximize"], ["maximize", "maximize", "minimize"]]
)
def test_the_drivers_running_best_equals_optunas_best_trials(directions):
    """The driver keeps the best trial / Pareto front itself (no study scan per trial): after
    every tell it names the same trials as Optuna's ``best_trial`` / ``best_trials`` (ties and
    duplicate points on the front included)."""
    from sweeps.service.book import best_trials as _best
    from sweeps.service.book import with_completed as _with_completed

    study = optuna.create_study(directions=directions)
    rng = random.Random(0)
    best: list = []
    for _ in range(150):
        values = [rng.choice([0.25, 0.5, 0.75, rng.random()]) for _ in directions]
        trial = study.ask()
        study.tell(trial, values if len(values) > 1 else values[0])
        best = _with_completed(best, {"number": trial.number, "values": values, "params": {}}, study.directions)
        assert [b["number"] for b in best] == [b["number"] for b in _best(study)]
    assert len(directions) == 1 or len(best) > 2  # the multi-objective cases did grow a front


def test_sqlite_studies_log_ahead_and_commit_without_waiting_for_the_disk(tmp_path):
    """``make_storage`` puts an SQLite study file in WAL mode and its connections at
    ``synchronous=NORMAL`` (connections.use_wal / sync_on_checkpoint); other URLs are left alone."""
    import sqlalchemy as sa

    from sweeps.service.connections import use_wal

    storage = search.make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(study_name="wal", storage=storage)
    with storage.engine.connect() as con:
        assert con.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
        assert con.execute(sa.text("PRAGMA synchronous")).scalar() == 1  # NORMAL
    assert optuna.load_study(study_name="wal", storage=search.make_storage(f"sqlite:///{tmp_path / 'optuna.db'}"))
    assert not use_wal("postgresql://user@127.0.0.1:1/none") and not use_wal("sqlite://")
    assert not use_wal(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}") and not (tmp_path / "missing-dir").exists()
