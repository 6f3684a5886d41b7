"""Typed records that pass between the driver's parts (:mod:`sweeps.service`).

A population task reports each member once, as one of the *events* below; the driver's loop
turns each into a :class:`FinalRecord` (or a measure task) and hands it to the recorder and the
study. Trials are named by their Optuna trial ``number`` everywhere.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..spec.status import TrialStatus

#: Tags a final record carries to its MLflow run, when the worker reported them.
NODE_TAGS = ("node_id", "node_ip")


@dataclass(frozen=True)
class FinalRecord:
    """What is recorded for a finished trial: the MLflow run's final metrics, artifacts and
    status tag, and what the study is told.

    Attributes:
        status: how the trial ended.
        metrics: final metrics (finite or not; the study decides what a missing objective means).
        artifacts: file name -> bytes, written under the trial's MLflow run.
        traceback: the failure's traceback (``failed``) or why the trial was settled without one.
        node: ``node_id`` / ``node_ip`` of the worker that ran it (empty when unknown).
    """

    status: TrialStatus
    metrics: Mapping[str, float] = field(default_factory=dict)
    artifacts: Mapping[str, bytes] = field(default_factory=dict)
    traceback: str | None = None
    node: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def settled(
        cls, status: TrialStatus, why: str | None = None, metrics: Mapping[str, float] | None = None
    ) -> FinalRecord:
        """A record the driver writes itself (task lost or ended, trial pruned)."""
        return cls(TrialStatus(status), dict(metrics or {}), {}, why)

    @property
    def reason(self) -> str:
        """The last line of the traceback (what the log shows), or ``""``."""
        return self.traceback.strip().splitlines()[-1] if self.traceback else ""


@dataclass(frozen=True)
class MemberFinished:
    """What a population or measure task reports for member ``index`` (its position in the task's
    trials): its final record, and the seconds from the task's start."""

    index: int
    record: FinalRecord
    seconds: float


@dataclass(frozen=True)
class MemberTrained:
    """Member ``index`` is trained and its measures are still to compute: the task's *next* object
    holds its weights (a :class:`~sweeps.trial.run.TrainedMember`), which the driver passes by
    reference to the measure task without fetching them."""

    index: int
    seconds: float


#: What a population task yields (and a measure task returns, as :class:`MemberFinished`).
MemberReport = MemberFinished | MemberTrained


@dataclass(frozen=True)
class Launch:
    """A trial to run in a population task: its ``number`` and validated config."""

    number: int
    config: Any


@dataclass(frozen=True)
class Finished:
    """A member's final record, from its population task or its measure task ``handle``."""

    handle: Hashable
    number: int
    record: FinalRecord


@dataclass(frozen=True)
class Trained:
    """A member trained in population task ``handle``; ``payload`` is what its measure task needs
    (an object reference: the driver never holds the weights)."""

    handle: Hashable
    number: int
    payload: Any


@dataclass(frozen=True)
class TaskLost:
    """Task ``handle`` died with its worker or node (``error``): its unreported members may be re-run."""

    handle: Hashable
    error: str


@dataclass(frozen=True)
class TaskEnded:
    """Task ``handle`` ended without reporting some members (``cancelled``: the driver cancelled it)."""

    handle: Hashable
    cancelled: bool = False


Event = Finished | Trained | TaskLost | TaskEnded


@dataclass(frozen=True)
class CurvePoint:
    """One in-training record of a trial: ``kind`` (``epoch`` or ``track``), values, step, time (ms)."""

    kind: str
    values: Mapping[str, float]
    step: int
    timestamp_ms: int


__all__ = [
    "NODE_TAGS",
    "CurvePoint",
    "Event",
    "FinalRecord",
    "Finished",
    "Launch",
    "MemberFinished",
    "MemberReport",
    "MemberTrained",
    "TaskEnded",
    "TaskLost",
    "Trained",
]
