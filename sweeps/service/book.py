"""The driver's study book on Optuna: which points run next, what each trial is told, the best.

Wraps the sweep's study (:mod:`sweeps.service.search` holds the storage-level rules) and its
:class:`~sweeps.service.batching.PointQueue`; keeps the counts per status and the best trials (the
Pareto front for several objectives) up to date as trials are told, so recording a trial reads
no other trial.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna

from ..adapters.optuna_adapter import UpdateFinishedTrialError
from ..spec.status import TrialStatus
from . import search
from .batching import AskedTrial, PointQueue


def is_pruning_epoch(epoch: int) -> bool:
    """Whether the objective after ``epoch`` is reported to the pruner: epochs 1-8, then four
    per doubling (10, 12, 14, 16, 20, 24, ...). Each report is a storage write and each pruning
    decision reads every trial's reports, so reporting every epoch of a fast model would make
    the driver the bottleneck; the epochs are the same for every trial, as the median pruner
    needs (it compares trials at equal steps)."""
    return epoch >= 1 and epoch % max(1, 2 ** (epoch.bit_length() - 1) // 4) == 0


def best_trials(study: optuna.Study) -> list[dict[str, Any]]:
    """The study's best trials (``number``, ``values``, ``params``): one, or the Pareto front."""
    try:  # single objective: one indexed query; several: the Pareto front (reads all trials)
        trials = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    except ValueError:
        return []
    return [{"number": t.number, "values": list(t.values), "params": dict(t.params)} for t in trials]


def with_completed(
    best: list[dict[str, Any]], trial: dict[str, Any], directions: Sequence[optuna.study.StudyDirection]
) -> list[dict[str, Any]]:
    """``best`` (as :func:`best_trials` returns it) after ``trial`` (``number``, ``values``,
    ``params``) completed: what :func:`best_trials` would read from the study then. A tie keeps
    the earlier trial best (single objective); equal values share the front."""
    signs = [1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in directions]

    def cost(entry: dict[str, Any]) -> list[float]:
        return [s * v for s, v in zip(signs, entry["values"])]

    def dominates(a: list[float], b: list[float]) -> bool:
        return a != b and all(x <= y for x, y in zip(a, b))

    new = cost(trial)
    if len(signs) == 1:
        return [trial] if not best or new[0] < cost(best[0])[0] else best
    if any(dominates(cost(b), new) for b in best):
        return best
    return [b for b in best if not dominates(new, cost(b))] + [trial]


def describe_best(best: list[dict[str, Any]], metrics: Sequence[str]) -> str:
    """One line for the best trial(s), as the progress view and the log show it."""
    if not best:
        return "-"
    first = best[0]
    values = " ".join(f"{m}={v:.4g}" for m, v in zip(metrics, first["values"]))
    more = f" (+{len(best) - 1} on the Pareto front)" if len(best) > 1 else ""
    return f"#{first['number']} {values}{more}"


class StudyBook:
    """The sweep's study as the driver's loop uses it.

    Args:
        study: the sweep's study (:func:`sweeps.service.search.open_study`), its pruner set.
        config: the sweep's config.
        slots: the sweep's task slots (populations of a grid shape split over them).
        on_conflict: called when a trial to tell was finished by someone else (the lease check:
            another driver took the sweep over while this one was paused).
    """

    def __init__(self, study: optuna.Study, config: Any, slots: int, on_conflict: Callable[[], None]) -> None:
        self.study, self.on_conflict = study, on_conflict
        self.objective = list(config.objective.metrics)
        self.points = PointQueue(study, config, slots=slots)
        self.finished = len(search.finished_trials(study))
        self.counts = search.status_counts(study)
        self.front = best_trials(study)
        self.best = describe_best(self.front, self.objective)
        self._trials: dict[int, optuna.Trial] = {}

    @property
    def pending(self) -> list[AskedTrial]:
        """Trials asked (RUNNING in the study) but not launched yet."""
        return self.points.pending

    def take(self, size: int, can_ask: int) -> list[AskedTrial]:
        group = self.points.take(size, can_ask)
        for asked in group:
            self._trials[asked.trial.number] = asked.trial
        return group

    def stack_reason(self, asked: AskedTrial) -> str | None:
        return self.points.stack_reason(asked)

    def note_run(self, number: int, run_id: str) -> None:
        """Put the trial's MLflow run id on it (``mlflow_run_id``: what a restarted driver follows)."""
        self._trials[number].set_user_attr("mlflow_run_id", run_id)

    def report(self, number: int, value: float, step: int) -> bool:
        """Report an intermediate objective value; whether the pruner stops the trial."""
        trial = self._trials[number]
        trial.report(value, step)
        return trial.should_prune()

    def tell(self, number: int, status: TrialStatus, metrics: Mapping[str, float], point: Mapping[str, Any]) -> None:
        try:
            told = search.tell(self.study, number, status, metrics, self.objective)
        except UpdateFinishedTrialError:
            self.on_conflict()  # raises LeaseLostError when that is why
            raise
        self._trials.pop(number, None)
        self.finished += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        if told.state == optuna.trial.TrialState.COMPLETE:
            trial = {"number": number, "values": told.values, "params": dict(point)}
            self.front = with_completed(self.front, trial, self.study.directions)
            self.best = describe_best(self.front, self.objective)

    def interrupt(self, number: int) -> None:
        """Mark the trial interrupted and re-enqueue its point."""
        self._trials.pop(number, None)
        search.interrupt(self.study, number)


__all__ = ["StudyBook", "best_trials", "describe_best", "is_pruning_epoch", "with_completed"]
