"""The Optuna side of a sweep: samplers, one study per sweep name, and the rules for resuming it.

The study on its persistent storage is the single source of truth of a sweep: which points
were asked, which finished and how. The driver asks and tells; Ray tasks do the work.

Rules:

* One study per sweep name, created with the objective's direction(s). The sweep's resolved
  config and a fingerprint of it are kept as study user attrs (``config``, ``fingerprint``), so
  ``sweeps resume NAME`` needs no file. Reusing a name with another config is a
  :class:`StudyConflictError` (CLI exit code 2). The fingerprint ignores ``resources``,
  ``search.n_trials`` and ``train.checkpoint``: a sweep may be resumed on other hardware, extended,
  or checkpointed at another cadence (and a study made before checkpoints existed keeps its
  fingerprint).
* Every trial carries a user attr ``status``, one of :class:`sweeps.spec.status.TrialStatus` (that
  module says which Optuna state each is told as and why).
* The budget counts *finished* trials: for a grid, each point is finished exactly once.
* A driver that was killed leaves trials RUNNING; the next driver (it takes over the sweep's
  lease, :mod:`sweeps.service.lease`) marks them ``interrupted`` (:func:`interrupt`) and re-enqueues their
  points. One driver per sweep at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..adapters import optuna_adapter
from ..spec.status import TrialStatus, is_finished
from .connections import is_journal_storage, journal_path, redact, sync_on_checkpoint, use_wal

SAMPLERS = ("grid", "random", "tpe", "cmaes", "nsga2")

# Fields that may change between runs of the same sweep (hardware, budget extension, checkpoint
# cadence: a trial continued from a checkpoint ends as one never interrupted).
_FINGERPRINT_EXCLUDES = (("resources",), ("search", "n_trials"), ("train", "checkpoint"))


class StudyConflictError(ValueError):
    """A study of this name exists with another config (or does not exist when resuming)."""


# One storage per (process, database-server URL); see make_storage.
_SERVER_STORAGES: dict[tuple[int, str], optuna.storages.RDBStorage] = {}


def make_storage(storage: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL (sqlite/PostgreSQL/...) or a journal file path.

    A database-server URL (PostgreSQL, MySQL) gives the same storage object on every call in one
    process: Optuna's ``RDBStorage`` releases its connection pool only when garbage-collected, so
    a new storage per call (a status poll, a re-run notebook cell) piles up idle server
    connections until the server refuses new clients ("too many clients already").
    """
    if is_journal_storage(storage):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = journal_path(storage)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if storage.startswith("sqlite"):
        # Only the driver writes, but optuna-dashboard or `sweeps status` may read concurrently.
        store = _rdb_storage(storage, {"connect_args": {"timeout": 60}})
        if use_wal(storage):
            sync_on_checkpoint(store.engine)
        return store
    key = (os.getpid(), storage)
    if key not in _SERVER_STORAGES:
        _SERVER_STORAGES[key] = _rdb_storage(storage, {"pool_pre_ping": True})
    return _SERVER_STORAGES[key]


def _rdb_storage(url: str, engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as err:  # another process created the schema at the same moment: it exists now
        if "already exists" not in str(err):
            raise
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def config_fingerprint(config_dict: Mapping[str, Any]) -> str:
    """SHA-256 of the resolved config (JSON-able dict), ignoring resources and ``search.n_trials``."""
    data = json.loads(json.dumps(config_dict, sort_keys=True, default=str))
    for path in _FINGERPRINT_EXCLUDES:
        node = data
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _is_int_dim(config: Any, name: str, dim: Any) -> bool:
    """True if the range ``dim`` sets an integer config field (probed with a fractional value)."""
    low, high = float(dim.low), float(dim.high)
    if not (low.is_integer() and high.is_integer()):
        return False
    probe = (low + high) / 2 + (0.25 if ((low + high) / 2).is_integer() else 0.0)
    try:
        value = config.with_point({name: probe}).flat().get(name)
    except ValueError:
        return True
    return isinstance(value, int) and not isinstance(value, bool)


def grid_space(config: Any) -> dict[str, list[Any]]:
    """The complete factorial grid of ``config.search.space``: ``{dotted key: values}``."""
    try:
        return {name: dim.grid() for name, dim in config.search.space.items()}
    except ValueError as err:
        raise ValueError(f"search.space: {err}") from None


def grid_size(config: Any) -> int:
    return math.prod(len(v) for v in grid_space(config).values())


def n_trials(config: Any) -> int:
    """The sweep's budget: ``search.n_trials``, or the grid size for a grid without one."""
    if config.search.n_trials is not None:
        return int(config.search.n_trials)
    if config.search.sampler == "grid":
        return grid_size(config)
    raise ValueError(f"search.n_trials: required for sampler {config.search.sampler!r} (got None)")


def build_sampler(config: Any) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named by ``config.search.sampler``, seeded by ``config.search.seed``.

    A grid's order depends on the seed, so resuming a grid needs the same seed: the
    fingerprint guarantees it.
    """
    kind, seed = config.search.sampler, config.search.seed
    if kind == "grid":
        return optuna_adapter.AskTellGridSampler(grid_space(config), seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":  # constant liar: the trials asked for a population are not all the same guess
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise ValueError(f"search.sampler: unknown sampler {kind!r}; use one of {', '.join(SAMPLERS)}")


def grid_distributions(config: Any) -> dict[str, optuna.distributions.CategoricalDistribution]:
    """The distribution of each grid dimension, as :func:`suggest_point` suggests it on a grid."""
    return {name: optuna.distributions.CategoricalDistribution(values) for name, values in grid_space(config).items()}


def suggest_point(trial: optuna.Trial, config: Any) -> dict[str, Any]:
    """Ask ``trial`` for one value per dimension of the search space; returns ``{dotted key: value}``.

    Integer-typed config fields get ``suggest_int``, float fields ``suggest_float``, and
    dimensions given as ``values`` (or any dimension of a grid) ``suggest_categorical``.
    """
    grid = grid_space(config) if config.search.sampler == "grid" else None
    point = {}
    for name, dim in config.search.space.items():
        if grid is not None:
            point[name] = trial.suggest_categorical(name, grid[name])
        elif getattr(dim, "values", None) is not None:
            point[name] = trial.suggest_categorical(name, list(dim.values))
        elif _is_int_dim(config, name, dim):
            point[name] = trial.suggest_int(
                name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=bool(dim.log)
            )
        else:
            step = None if dim.log else dim.step
            point[name] = trial.suggest_float(name, float(dim.low), float(dim.high), step=step, log=bool(dim.log))
    return point


def validate_search(config: Any) -> None:
    """Raise ``ValueError`` (naming the field) if the search cannot run as configured."""
    n_trials(config)
    if config.search.sampler == "grid":
        grid_space(config)
    metrics, directions = list(config.objective.metrics), list(config.objective.directions)
    if len(metrics) != len(directions):
        raise ValueError(f"objective.directions: one per metric ({len(metrics)} metrics, got {len(directions)})")
    if len(metrics) > 1 and config.search.sampler == "cmaes":
        raise ValueError("search.sampler: cmaes is single-objective; use nsga2, tpe or random for several metrics")


def name_taken(name: str, storage: str, stored: str | None, fingerprint: str) -> str:
    """The message of a sweep name taken by a study of another config."""
    return (
        f"name: a sweep named {name!r} already exists in {redact(storage)} with another config "
        f"(fingerprint {stored} != {fingerprint}); continue it with `sweeps resume {name}` "
        "or choose a new name with --name NEW_NAME"
    )


def open_study(
    config: Any, storage: str, *, resume: bool = False, retry: Callable[..., Any] | None = None
) -> optuna.Study:
    """Create the sweep's study, or load it when it exists with the same config fingerprint.

    Args:
        config: the sweep's :class:`~sweeps.spec.config.SweepConfig`.
        storage: Optuna storage URL or journal path (see :mod:`sweeps.service.connections`).
        resume: if True the study must already exist.
        retry: every storage call made as ``retry(method, *args, **kwargs)`` (a driver's
            :meth:`sweeps.service.outages.StoreGuard.call`), or ``None``.

    Raises:
        StudyConflictError: the name is taken by a study of another config, or ``resume`` and
            there is no such study.
    """
    store = make_storage(storage)
    if retry is not None:
        store = optuna_adapter.retrying_storage(store, retry)
    name = config.name
    exists = name in {s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)}
    resolved = config.model_dump(mode="json")
    fingerprint = config_fingerprint(resolved)
    if exists:
        study = optuna.load_study(study_name=name, storage=store, sampler=build_sampler(config))
        stored = study.user_attrs.get("fingerprint")
        if stored != fingerprint:
            raise StudyConflictError(name_taken(name, storage, stored, fingerprint))
        # n_trials may be extended: keep the latest resolved config for `sweeps resume`.
        study.set_user_attr("config", resolved)
        return study
    if resume:
        raise StudyConflictError(
            f"name: no sweep named {name!r} in {redact(storage)}; start it with `sweeps run CONFIG.yaml`"
        )
    study = optuna.create_study(
        study_name=name,
        storage=store,
        sampler=build_sampler(config),
        directions=list(config.objective.directions),
    )
    study.set_user_attr("config", resolved)
    study.set_user_attr("fingerprint", fingerprint)
    study.set_user_attr("objective", list(config.objective.metrics))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(config.objective.metrics))
    return study


def stored_config(name: str, storage: str) -> dict[str, Any]:
    """The resolved config dict kept in the study ``name`` (for ``sweeps resume NAME``)."""
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(storage))
    except KeyError:
        raise StudyConflictError(f"name: no sweep named {name!r} in {redact(storage)}; see `sweeps list`") from None
    return dict(study.user_attrs["config"])


def trial_status(trial: FrozenTrial) -> str:
    """The sweep status of a trial: its recorded ``status``; else ``running`` (RUNNING), ``queued``
    (WAITING: asked for or re-enqueued, not started) or ``failed`` (finished without a status,
    e.g. told by hand)."""
    status = trial.user_attrs.get("status")
    if status is not None:
        return status
    if trial.state == TrialState.RUNNING:
        return TrialStatus.RUNNING
    return TrialStatus.QUEUED if trial.state == TrialState.WAITING else TrialStatus.FAILED


def status_counts(study: optuna.Study) -> dict[str, int]:
    """Trials per sweep status (:func:`trial_status`) over the whole study."""
    return dict(Counter(trial_status(t) for t in study.get_trials(deepcopy=False)))


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count towards the budget: finished with a status other than ``interrupted``."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.is_finished() and t.user_attrs.get("status") != TrialStatus.INTERRUPTED
    ]


class Told(NamedTuple):
    """What :func:`tell` told the study: the trial's ``state`` and, when COMPLETE, its objective
    ``values`` (one per objective metric, in the study's order; ``None`` otherwise)."""

    state: TrialState
    values: list[float] | None


def objective_names(study: optuna.Study) -> list[str]:
    """The objective metrics of the sweep's study, in the order of its directions."""
    return list(study.user_attrs.get("objective") or study.metric_names or [])


def tell(
    study: optuna.Study,
    trial_number: int,
    status: str,
    metrics: Mapping[str, float],
    objective: Sequence[str] | None = None,
) -> Told:
    """Tell the study how trial ``trial_number`` ended.

    A converged/not-converged trial whose objective metric is missing or not finite is told
    FAIL (Optuna would otherwise leave it RUNNING or learn from NaN) with status unchanged and a
    ``fail_reason`` user attr. ``objective`` is :func:`objective_names` of the study, read from
    it when not given (the driver passes it: a study read per trial costs a query).
    """
    state = TrialStatus(status).optuna_state if is_finished(status) else TrialState.FAIL
    storage, trial_id = optuna_adapter.trial_storage(study, trial_number)
    values = None
    if state == TrialState.COMPLETE:
        names = objective_names(study) if objective is None else list(objective)
        raw = [metrics.get(name) for name in names]
        if all(v is not None and math.isfinite(float(v)) for v in raw):
            values = [float(v) for v in raw if v is not None]
        else:
            missing = [n for n, v in zip(names, raw) if v is None or not math.isfinite(float(v))]
            storage.set_trial_user_attr(
                trial_id, "fail_reason", f"objective metric(s) missing or not finite: {missing}"
            )
            state = TrialState.FAIL
    storage.set_trial_user_attr(trial_id, "status", status)
    if not optuna_adapter.finish_grid_trial(study, trial_id, state, values):
        study.tell(trial_number, values, state=state, skip_if_finished=True)
    return Told(state, values)


def start_trial(
    study: optuna.Study, point: Mapping[str, Any], distributions: Mapping[str, optuna.distributions.BaseDistribution]
) -> optuna.Trial:
    """A RUNNING trial at ``point``, written in one storage transaction.

    Asking for a grid point the public way (``enqueue_trial``, ``ask``, one ``suggest_*`` per
    parameter) costs a transaction each, the larger part of the driver's time per trial on a
    trivial grid. The trial written here holds what those calls would have left: the params with
    their ``distributions`` (those :func:`suggest_point` uses) and the ``fixed_params`` system
    attr of an enqueued trial, so the grid sampler never scans the study for it (its
    ``before_trial`` returns at once) and :func:`interrupt` re-enqueues it whole.
    """
    return optuna_adapter.create_running_trial(study, point, distributions)


def interrupt(study: optuna.Study, trial: FrozenTrial | int) -> bool:
    """Mark a RUNNING trial ``interrupted`` (told FAIL) and re-enqueue its point for a later run.

    Returns ``False`` when there was no point to re-enqueue (see :func:`sweeps.adapters.optuna_adapter.assigned_point`)."""
    number = trial if isinstance(trial, int) else trial.number
    storage, trial_id = optuna_adapter.trial_storage(study, number)
    frozen = storage.get_trial(trial_id) if isinstance(trial, int) else trial
    storage.set_trial_user_attr(trial_id, "status", TrialStatus.INTERRUPTED.value)
    if frozen.state == TrialState.RUNNING:
        study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
    point = optuna_adapter.assigned_point(study, frozen)
    if point is not None:
        study.enqueue_trial(point, user_attrs={"retry_of": frozen.number}, skip_if_exists=False)
    return point is not None


def stale_trials(study: optuna.Study) -> list[FrozenTrial]:
    """RUNNING trials: on a driver's start they belong to a driver that died (one driver per sweep)."""
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def grid_points_done(study: optuna.Study, names: Sequence[str]) -> list[tuple[Any, ...]]:
    """The points of finished trials as tuples in the order of ``names`` (for tests and status)."""
    return [tuple(t.params[n] for n in names) for t in finished_trials(study)]


__all__ = [
    "SAMPLERS",
    "StudyConflictError",
    "build_sampler",
    "config_fingerprint",
    "finished_trials",
    "grid_points_done",
    "grid_size",
    "grid_space",
    "interrupt",
    "make_storage",
    "n_trials",
    "open_study",
    "stale_trials",
    "status_counts",
    "stored_config",
    "suggest_point",
    "tell",
    "trial_status",
    "validate_search",
]
