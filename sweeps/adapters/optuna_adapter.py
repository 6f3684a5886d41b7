"""What the sweep service needs of Optuna beyond its public API (Optuna >= 4.0, < 6).

* The study's storage (``Study._storage``: no public accessor) and the ids of a study and of a
  trial in it, to set user attrs on a trial known by number only and to write a grid trial in
  one transaction (:func:`create_running_trial`). The storage methods used on it are the public
  :class:`optuna.storages.BaseStorage` ones.
* ``optuna.Trial(study, trial_id)`` for a trial written that way (the constructor is public but
  undocumented for this use).
* The grid sampler's system attrs (``grid_id``, ``search_space``) and its
  ``sample_independent``, to recover the point of a grid trial whose driver died mid-ask
  (:func:`assigned_point`).
* A storage whose every call goes through a retry policy (:func:`retrying_storage`): a
  :class:`~optuna.storages.BaseStorage` that forwards each method to the real one, under
  Optuna's private ``_CachedStorage`` for a database (what Optuna itself puts over an
  ``RDBStorage``), which calls a few private ``RDBStorage`` methods (forwarded as well).
"""

from __future__ import annotations

import datetime
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

#: What a write to a finished trial raises: ``UpdateFinishedTrialError`` (a ``RuntimeError``) in the
#: Optuna releases that have it, a plain ``RuntimeError`` in the older ones.
UpdateFinishedTrialError: type[RuntimeError] = getattr(optuna.exceptions, "UpdateFinishedTrialError", RuntimeError)


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler for ask/tell: its ``after_trial`` calls ``study.stop()``, which raises outside
    ``study.optimize``; the driver counts the budget itself, so that hook is dropped."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        return None


# The id of a study in its storage, per Study object: fixed for the object's life, and a query
# to look up (the driver needs it at every trial).
_STUDY_IDS: weakref.WeakKeyDictionary[optuna.Study, int] = weakref.WeakKeyDictionary()


def study_storage(study: optuna.Study) -> tuple[optuna.storages.BaseStorage, int]:
    """The study's storage and the study's id in it (see :func:`trial_storage` for why)."""
    storage = study._storage  # private: no public accessor of a study's storage
    if study not in _STUDY_IDS:
        _STUDY_IDS[study] = storage.get_study_id_from_name(study.study_name)
    return storage, _STUDY_IDS[study]


def trial_storage(study: optuna.Study, trial_number: int) -> tuple[optuna.storages.BaseStorage, int]:
    """The study's storage and its id of trial ``trial_number``: to set user attrs on a trial that
    the caller knows by number only.

    Optuna has no public API for that. User attrs are set through ``optuna.Trial.set_user_attr``
    on the ``Trial`` that ``study.ask()`` returned, but the driver passes trial numbers, and a
    RUNNING trial left by a killed driver has no ``Trial`` object at all (``optuna.Trial``'s
    constructor would run the sampler's ``before_trial`` again); ``Study.tell`` takes a number but
    no user attrs, and a finished trial can no longer be changed.
    """
    storage, study_id = study_storage(study)
    return storage, storage.get_trial_id_from_study_id_trial_number(study_id, trial_number)


def create_running_trial(
    study: optuna.Study, point: Mapping[str, Any], distributions: Mapping[str, optuna.distributions.BaseDistribution]
) -> optuna.Trial:
    """A RUNNING trial holding ``point`` (params with their ``distributions``, and the
    ``fixed_params`` system attr of an enqueued trial), written in one storage transaction."""
    storage, study_id = study_storage(study)
    template = FrozenTrial(
        number=0,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=datetime.datetime.now(),
        datetime_complete=None,
        params=dict(point),
        distributions=dict(distributions),
        user_attrs={},
        system_attrs={"fixed_params": dict(point)},
        intermediate_values={},
        trial_id=0,
    )
    return optuna.Trial(study, storage.create_new_trial(study_id, template_trial=template))


def finish_grid_trial(study: optuna.Study, trial_id: int, state: TrialState, values: list[float] | None) -> bool:
    """Finish a trial of a study sampled by :class:`AskTellGridSampler` with one storage write;
    ``False`` (nothing done) for other samplers and for PRUNED.

    ``Study.tell`` reads the whole trial back (params, values, attrs, intermediate values) for
    the sampler's ``after_trial`` and its checks; the ask/tell grid sampler's ``after_trial`` does
    nothing and the driver has checked the values, so for a grid the read is skipped.
    ``BaseStorage.set_trial_state_values`` raises ``UpdateFinishedTrialError`` for a finished
    trial, as the status user attr written before it does.
    """
    if not isinstance(study.sampler, AskTellGridSampler) or state == TrialState.PRUNED:
        return False
    storage, _ = study_storage(study)
    storage.set_trial_state_values(trial_id, state, values)
    return True


def assigned_point(study: optuna.Study, frozen: FrozenTrial) -> dict[str, Any] | None:
    """The point a trial was given, also when its driver died between ``ask`` and the last
    ``suggest_*`` (the params stored so far are then a part of it).

    An enqueued point is whole in the ``fixed_params`` system attribute; the grid sampler fixes
    the point at ``ask`` (``grid_id``, stored after ``search_space``) and gives the rest of it
    again. ``None`` for a grid trial that had no point yet: nothing to re-run, and a partial point
    would make the grid sampler raise at the next ``ask``. Other samplers draw missing params afresh.
    """
    attrs = frozen.system_attrs
    point = {**attrs.get("fixed_params", {}), **frozen.params}
    if not isinstance(study.sampler, optuna.samplers.GridSampler):
        return point
    if "grid_id" not in attrs:  # enqueued (whole in fixed_params) or no point yet
        return point or None
    for name, values in attrs["search_space"].items():
        if name not in point:
            distribution = optuna.distributions.CategoricalDistribution(values)
            point[name] = study.sampler.sample_independent(study, frozen, name, distribution)
    return point


class _RetryingStorage(optuna.storages.BaseStorage):
    """Every method of ``backend``, called as ``call(method, *args, **kwargs)``."""

    def __init__(self, backend: optuna.storages.BaseStorage, call: Callable[..., Any]) -> None:
        self._backend, self._call = backend, call

    def __getattr__(self, name: str) -> Any:  # what _CachedStorage uses beyond BaseStorage (_get_trials, ...)
        value = getattr(self._backend, name)
        return (lambda *args, **kwargs: self._call(value, *args, **kwargs)) if callable(value) else value

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        tries = 0

        def finish() -> bool:
            nonlocal tries
            tries += 1
            try:
                return self._backend.set_trial_state_values(trial_id, state, values)
            except UpdateFinishedTrialError:
                # a try after a lost connection: the one before may have been written, its answer lost
                if tries > 1 and self._backend.get_trial(trial_id).state == state:
                    return True
                raise

        return self._call(finish)


def _forward(name: str) -> Callable[..., Any]:
    def method(self: _RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        return self._call(getattr(self._backend, name), *args, **kwargs)

    method.__name__ = name
    return method


for _name in dir(optuna.storages.BaseStorage):
    if not _name.startswith("_") and _name not in vars(_RetryingStorage):
        setattr(_RetryingStorage, _name, _forward(_name))
_RetryingStorage.__abstractmethods__ = frozenset()


def retrying_storage(storage: optuna.storages.BaseStorage, call: Callable[..., Any]) -> optuna.storages.BaseStorage:
    """``storage`` with each of its calls made as ``call(method, *args, **kwargs)`` (a retry
    policy: :meth:`sweeps.service.outages.StoreGuard.call`), for a study opened on it. A database
    storage keeps Optuna's cache of finished trials above the retries, as Optuna gives it when
    it opens a study on a URL. A retried ``set_trial_state_values`` that finds the trial already
    in the state it writes (the try before was written, its answer lost) succeeds."""
    from optuna.storages._cached_storage import _CachedStorage  # private: the cache Optuna puts over an RDBStorage

    retrying = _RetryingStorage(storage, call)  # type: ignore[abstract]  # its methods are set above
    if isinstance(storage, optuna.storages.RDBStorage):
        return _CachedStorage(retrying)  # type: ignore[arg-type]
    return retrying


__all__ = [
    "AskTellGridSampler",
    "UpdateFinishedTrialError",
    "assigned_point",
    "create_running_trial",
    "finish_grid_trial",
    "retrying_storage",
    "study_storage",
    "trial_storage",
]
