"""The driver's loop: which trials run next, what each task's report means, when the sweep ends.

It is given its parts and touches no library itself:

* an :class:`Executor` runs populations and measure tasks (Ray: :mod:`.executor`);
* a :class:`Recorder` writes runs (MLflow: :mod:`.recorder`);
* a :class:`Book` hands out points and is told results (Optuna: :mod:`.book`);
* a ``lease`` (``ensure()`` raises once another driver took the sweep), a ``stop`` flag
  (``requested``), a ``view`` (``log(line)``, ``update(snapshot)``) and ``observers``
  (``add(number, status, point, metrics)``, ``poll()``, ``close()``: the live correlation).

Rules it keeps:

* Slots: at most ``concurrency`` tasks at once, measure tasks included; a trained member waits
  for a free slot (a task beyond the slots would take the CPU a population gives back).
* Budget: finished + being written + in flight + asked never exceeds ``budget``.
* Order of a record: a trial is told to the study only once its final record is written (the
  rule a restarted driver relies on to settle trials left RUNNING); finished members are
  collected, the free slots refilled, and only then recorded, so the cluster does not idle
  while the driver writes.
* A lost task re-launches its unreported members ``max_retries`` times, then records them
  ``failed``; a task that ends without a member's record fails it; a cancelled (pruned) task
  records its members ``pruned``.
* The lease is checked before each round and before each write.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..spec.status import TrialStatus
from .progress import RunningTrial, Snapshot
from .records import CurvePoint, Event, FinalRecord, Finished, Launch, TaskEnded, TaskLost, Trained

#: Seconds the loop waits for a task's report before it drains curves and refreshes the view.
POLL_SECONDS = 0.25


class Executor(Protocol):
    def launch(self, trials: Sequence[Launch]) -> Hashable: ...
    def measure(self, number: int, payload: Any) -> Hashable: ...
    def wait(self, handles: Sequence[Hashable], timeout: float) -> list[Event]: ...
    def curves(self) -> list[tuple[int, list[CurvePoint]]]: ...
    def prune(self, handle: Hashable, number: int, reason: str) -> None: ...
    def cancel(self, handle: Hashable) -> None: ...
    def close(self) -> None: ...


class Recorder(Protocol):
    def start(self, number: int, params: Mapping[str, Any]) -> None: ...
    def started(self) -> list[tuple[int, str]]: ...
    def curve(self, number: int, points: Sequence[CurvePoint]) -> None: ...
    def finish(self, number: int, record: FinalRecord, step: int) -> None: ...
    def written(self, wait: bool = False) -> list[tuple[int, FinalRecord]]: ...
    def wait_written(self, timeout: float) -> None: ...
    def writing(self) -> int: ...
    def fail_unstarted(self, number: int, params: Mapping[str, Any], traceback: str) -> str: ...
    def interrupt(self, number: int) -> None: ...
    def flush(self) -> None: ...
    def close(self, cancel: bool) -> None: ...


class Book(Protocol):
    finished: int
    counts: dict[str, int]
    best: str

    @property
    def pending(self) -> list[Any]: ...  # asked, not launched: objects with trial, point, config, key, error
    def take(self, size: int, can_ask: int) -> list[Any]: ...
    def stack_reason(self, asked: Any) -> str | None: ...
    def note_run(self, number: int, run_id: str) -> None: ...
    def report(self, number: int, value: float, step: int) -> bool: ...
    def tell(
        self, number: int, status: TrialStatus, metrics: Mapping[str, float], point: Mapping[str, Any]
    ) -> None: ...
    def interrupt(self, number: int) -> None: ...


@dataclass
class Member:
    """A launched trial as the loop follows it."""

    number: int
    config: Any
    view: RunningTrial
    last_step: int = -1
    pruned: dict[str, float] | None = None  # the metrics at which the pruner stopped it


@dataclass
class _Task:
    members: dict[int, Member]  # by trial number, the ones not reported yet
    retries_left: int


@dataclass
class LoopSettings:
    """What the loop is told about the sweep.

    Attributes:
        name: the sweep's name (the progress view's title).
        budget: finished trials the sweep runs in all.
        concurrency: task slots.
        max_retries: re-launches of a lost task's members.
        population: ``resources.population_size`` as the loop uses it (``1``, an integer or ``auto``).
        objective: objective metric names (the first one is reported to the pruner).
        prune: whether the objective streamed during training is reported to the pruner.
    """

    name: str
    budget: int
    concurrency: int
    max_retries: int
    population: int | str
    objective: Sequence[str]
    prune: bool = False


class SweepLoop:
    """One driver run's loop over its parts (see the module docstring)."""

    def __init__(
        self,
        settings: LoopSettings,
        executor: Executor,
        recorder: Recorder,
        book: Book,
        *,
        lease: Any,
        stop: Any,
        view: Any,
        observers: Iterable[Any] = (),
        population_size: Any,
        is_pruning_epoch: Any,
    ) -> None:
        self.s, self.executor, self.recorder, self.book = settings, executor, recorder, book
        self.lease, self.stop, self.view, self.observers = lease, stop, view, list(observers)
        self.population_size, self.is_pruning_epoch = population_size, is_pruning_epoch
        self.in_flight: dict[Hashable, _Task] = {}
        self.measuring: dict[Hashable, Member] = {}
        self.to_measure: deque[tuple[Member, Any]] = deque()
        self.by_number: dict[int, Member] = {}
        self.durations: list[float] = []
        self.started = time.monotonic()
        self.launched = 0
        self._told_why: set[Any] = set()

    def run(self) -> None:
        """Until the budget is spent or a stop is requested: fill the free slots, wait, record."""
        while True:
            self.lease.ensure()
            self._fill(unrecorded=self.recorder.writing())
            if not self.in_flight and not self.measuring and not self.to_measure and not self.recorder.writing():
                return
            handles = [*self.in_flight, *self.measuring]
            if handles:
                events = self.executor.wait(handles, POLL_SECONDS)
            else:  # only final records in flight
                events = []
                self.recorder.wait_written(POLL_SECONDS)
            self.lease.ensure()
            self._stream()
            done = [pair for event in events for pair in self._on_event(event)]
            self._fill(unrecorded=len(done) + self.recorder.writing())
            for member, record in done:
                self.lease.ensure()
                self.recorder.finish(member.number, record, int(record.metrics.get("steps", member.view.step) or 0))
            self._tell_written()
            for observer in self.observers:
                observer.poll()
            self.view.update(self.snapshot())
            if self.stop.requested:
                return

    # -- launching --------------------------------------------------------------------------
    def _slots_used(self) -> int:
        return len(self.in_flight) + len(self.measuring)

    def _members_in_flight(self) -> int:
        return sum(len(t.members) for t in self.in_flight.values()) + len(self.measuring) + len(self.to_measure)

    def _fill(self, unrecorded: int) -> None:
        """Measure trained members, then launch populations, while slots are free and the budget
        has trials left."""
        while self.to_measure and self._slots_used() < self.s.concurrency:
            member, payload = self.to_measure.popleft()
            self.measuring[self.executor.measure(member.number, payload)] = member
        groups: list[list[Any]] = []
        while not self.stop.requested and self._slots_used() + len(groups) < self.s.concurrency:
            left = self.s.budget - self.book.finished - unrecorded - self._members_in_flight() - sum(map(len, groups))
            if left <= 0:
                break
            slots = self.s.concurrency - len(self.in_flight) - len(groups)
            group = self.book.take(self.population_size(self.s.population, left, slots), left - len(self.book.pending))
            if not group:
                break
            if group[0].error is not None:
                self._fail_unstarted(group[0])
                continue
            groups.append(group)
        if groups:
            self._launch(groups)

    def _launch(self, groups: list[list[Any]]) -> None:
        self.lease.ensure()
        for group in groups:
            if len(group) == 1 and self.s.population != 1 and group[0].key not in self._told_why:
                reason = self.book.stack_reason(group[0])
                if reason is not None:
                    self._told_why.add(group[0].key)
                    self.view.log(f"populations: one trial per task for this shape: {reason}")
            members = {}
            for asked in group:
                number = asked.trial.number
                self.recorder.start(number, asked.config.flat())
                members[number] = self.by_number[number] = Member(
                    number, asked.config, RunningTrial(number, asked.point, time.monotonic())
                )
                self.view.log(f"trial {number}: started {asked.point}")
            self._submit(members, self.s.max_retries)
            self.launched += len(group)
        self._note_started()

    def _submit(self, members: dict[int, Member], retries_left: int) -> None:
        handle = self.executor.launch([Launch(m.number, m.config) for m in members.values()])
        self.in_flight[handle] = _Task(dict(members), retries_left)

    def _note_started(self) -> None:
        for number, run_id in self.recorder.started():
            self.book.note_run(number, run_id)

    def _fail_unstarted(self, asked: Any) -> None:
        number = asked.trial.number
        self.book.note_run(number, self.recorder.fail_unstarted(number, asked.point, asked.error))
        self.book.tell(number, TrialStatus.FAILED, {}, asked.point)
        self.view.log(f"trial {number}: failed before start: {asked.error.strip().splitlines()[-1]}")

    # -- what the tasks report ----------------------------------------------------------------
    def _on_event(self, event: Event) -> list[tuple[Member, FinalRecord]]:
        if isinstance(event, Finished):
            if event.handle in self.measuring:
                return [(self.measuring.pop(event.handle), event.record)]
            return [(self.in_flight[event.handle].members.pop(event.number), event.record)]
        if isinstance(event, Trained):
            self.to_measure.append((self.in_flight[event.handle].members.pop(event.number), event.payload))
            return []
        task = self.in_flight.pop(event.handle)
        if isinstance(event, TaskLost):
            if task.retries_left > 0:
                self.view.log(
                    f"trials {list(task.members)}: task lost ({event.error.split(':')[0]}); "
                    f"re-launched ({task.retries_left - 1} retries left)"
                )
                self._submit(task.members, task.retries_left - 1)
                return []
            return [(m, FinalRecord.settled(TrialStatus.FAILED, event.error)) for m in task.members.values()]
        if isinstance(event, TaskEnded) and event.cancelled:
            return [(m, FinalRecord.settled(TrialStatus.PRUNED, None, m.pruned)) for m in task.members.values()]
        why = "the task ended without a result for this trial"
        return [(m, FinalRecord.settled(TrialStatus.FAILED, why)) for m in task.members.values()]

    def _stream(self) -> None:
        """Hand the in-training curves to the recorder and the view; report the objective to the
        pruner."""
        for number, points in self.executor.curves():
            member = self.by_number.get(number)
            if member is None:
                continue
            self.recorder.curve(number, points)
            if points:
                member.view.latest, member.view.step = dict(points[-1].values), points[-1].step
            if self.s.prune:
                self._maybe_prune(member, [(p.values, p.step) for p in points if p.kind == "epoch"])

    def _maybe_prune(self, member: Member, records: list[tuple[Mapping[str, float], int]]) -> None:
        """Report a member's new objective values (at the pruning epochs) and ask once per batch
        whether to stop it."""
        if member.pruned is not None:
            return
        objective = self.s.objective[0]
        reported = None
        for metrics, step in records:
            value = metrics.get(objective)
            if value is None or not math.isfinite(value) or step <= member.last_step:
                continue
            if "epoch" in metrics and not self.is_pruning_epoch(int(metrics["epoch"])):
                continue
            member.last_step = step
            prune = self.book.report(member.number, float(value), step)
            reported = (metrics, step, value, prune)
        if reported is None or not reported[3]:
            return
        metrics, step, value, _ = reported
        member.pruned = dict(metrics)
        handle = next(h for h, task in self.in_flight.items() if member.number in task.members)
        self.executor.prune(handle, member.number, f"pruned at step {step} ({objective}={value:.4g})")

    def _tell_written(self, wait: bool = False) -> None:
        """Tell the study the members whose final records are written."""
        self._note_started()
        for number, record in self.recorder.written(wait):
            member = self.by_number.pop(number)
            self.book.tell(number, record.status, record.metrics, member.view.point)
            for observer in self.observers:
                observer.add(number, record.status, member.view.point, record.metrics)
            self.durations.append(time.monotonic() - member.view.started)
            shown = " ".join(f"{m}={record.metrics[m]:.4g}" for m in self.s.objective if m in record.metrics)
            self.view.log(f"trial {number}: {record.status} {shown} {record.reason}".rstrip())

    def snapshot(self) -> Snapshot:
        mean = sum(self.durations) / len(self.durations) if self.durations else None
        running = [m.view for task in self.in_flight.values() for m in task.members.values()]
        running += [m.view for m in self.measuring.values()] + [m.view for m, _ in self.to_measure]
        return Snapshot(
            self.s.name,
            self.s.budget,
            dict(self.book.counts),
            running,
            self.book.best,
            time.monotonic() - self.started,
            self.s.concurrency,
            mean,
        )

    # -- stopping ------------------------------------------------------------------------------
    def shutdown(self, record: bool = True) -> None:
        """Cancel the tasks still running and, if ``record``, record their members and the asked
        but unlaunched trials interrupted (points re-enqueued).

        ``record=False`` when the lease was lost: the driver that took it over has already
        recovered these trials, and this one must not write."""
        if record:  # finish the writes in flight: what is written is told, what failed is logged
            for flush in (lambda: self._tell_written(wait=True), self.recorder.flush):
                try:
                    flush()
                except Exception as err:  # the trial stays RUNNING in the study: the next driver settles it
                    self.view.log(f"a write to MLflow failed while stopping: {type(err).__name__}: {err}")
        self.recorder.close(cancel=not record)
        stopped = [(h, list(task.members.values())) for h, task in self.in_flight.items()]
        stopped += [(h, [member]) for h, member in self.measuring.items()]
        stopped += [(None, [member]) for member, _ in self.to_measure]
        for handle, members in stopped:
            if handle is not None:
                self.executor.cancel(handle)
            if record:
                for member in members:
                    self.recorder.interrupt(member.number)
                    self.book.interrupt(member.number)
                    self.view.log(f"trial {member.number}: interrupted, point re-enqueued")
        if record:
            for asked in self.book.pending:
                self.book.interrupt(asked.trial.number)
        self.in_flight.clear()
        self.measuring.clear()
        self.to_measure.clear()
        self.book.pending.clear()
        if record:
            for observer in self.observers:
                observer.close()  # the last update, with every trial recorded
        self.executor.close()


__all__ = ["POLL_SECONDS", "Book", "Executor", "LoopSettings", "Member", "Recorder", "SweepLoop"]
