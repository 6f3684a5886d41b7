"""Trial statuses: the one place where their names, and what each means to Optuna and MLflow, live.

A trial of a sweep is in exactly one of these statuses. Optuna, MLflow, the progress view,
``sweeps status`` and the results DataFrame all read them from here.

==================  =========  ================  =========  ============================================
status              finished   Optuna state      MLflow     meaning
==================  =========  ================  =========  ============================================
``converged``       yes        COMPLETE          FINISHED   the training target was met
``not_converged``   yes        COMPLETE          FINISHED   ``max_epochs`` without the target (measured)
``diverged``        yes        FAIL              FINISHED   non-finite or exploding loss (no measures)
``failed``          yes        FAIL              FAILED     the trial raised (traceback in MLflow)
``pruned``          yes        PRUNED            FINISHED   stopped early by the pruner
``interrupted``     no         FAIL              KILLED     stopped by Ctrl-C or a lost driver; re-run
``running``         no         RUNNING           RUNNING    being trained now
``queued``          no         WAITING           -          asked for, not started (e.g. re-enqueued)
==================  =========  ================  =========  ============================================

*Finished* statuses count towards the budget; a grid point is finished exactly once.
``diverged`` and ``failed`` trials are told FAIL so that samplers never learn from a number
that does not exist. A COMPLETE trial whose objective metric is missing or not finite is told
FAIL too (see :func:`sweeps.service.search.tell`).
"""

from __future__ import annotations

from enum import StrEnum

from optuna.trial import TrialState


class TrialStatus(StrEnum):
    """The status of one trial (compares equal to its name: ``TrialStatus.CONVERGED == "converged"``)."""

    CONVERGED = "converged"
    NOT_CONVERGED = "not_converged"
    DIVERGED = "diverged"
    FAILED = "failed"
    PRUNED = "pruned"
    INTERRUPTED = "interrupted"
    RUNNING = "running"
    QUEUED = "queued"

    @property
    def finished(self) -> bool:
        """True if the trial counts towards the budget (it will not be run again)."""
        return self in _FINISHED

    @property
    def measured(self) -> bool:
        """True if a trial that ends in this status gets its landscape measures: the sweep
        measures it after training, and ``sweeps measure`` measures it later (``converged`` and
        ``not_converged``; a diverged or pruned model has no minimum to measure)."""
        return self in MEASURED

    @property
    def optuna_state(self) -> TrialState:
        """The state the trial is told (finished and interrupted) or has (running, queued) in Optuna."""
        return _OPTUNA_STATE[self]

    @property
    def mlflow_status(self) -> str:
        """The MLflow run status a child run of this trial ends with."""
        return {TrialStatus.FAILED: "FAILED", TrialStatus.INTERRUPTED: "KILLED"}.get(self, "FINISHED")


_FINISHED = frozenset(
    {TrialStatus.CONVERGED, TrialStatus.NOT_CONVERGED, TrialStatus.DIVERGED, TrialStatus.FAILED, TrialStatus.PRUNED}
)
_OPTUNA_STATE = {
    TrialStatus.CONVERGED: TrialState.COMPLETE,
    TrialStatus.NOT_CONVERGED: TrialState.COMPLETE,
    TrialStatus.DIVERGED: TrialState.FAIL,
    TrialStatus.FAILED: TrialState.FAIL,
    TrialStatus.PRUNED: TrialState.PRUNED,
    TrialStatus.INTERRUPTED: TrialState.FAIL,
    TrialStatus.RUNNING: TrialState.RUNNING,
    TrialStatus.QUEUED: TrialState.WAITING,
}

#: Statuses whose trials are measured (:attr:`TrialStatus.measured`): by the sweep after
#: training and by ``sweeps measure`` later, the one rule both follow.
MEASURED = frozenset({TrialStatus.CONVERGED, TrialStatus.NOT_CONVERGED})

#: Finished statuses in table order (results, counts, reports).
FINISHED = tuple(s for s in TrialStatus if s.finished)


def is_finished(status: str | None) -> bool:
    """True for the name of a finished status (``None`` or an unknown name: False)."""
    return status in _FINISHED


__all__ = ["FINISHED", "MEASURED", "TrialStatus", "is_finished"]
