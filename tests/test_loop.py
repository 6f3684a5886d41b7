"""The driver's loop (sweeps.service.loop) with fake parts: no Ray, MLflow or Optuna, milliseconds
per test. The real parts keep their tests against the real services (test_runner.py,
test_cli_sweep.py, test_multinode.py)."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from sweeps.service.batching import population_size
from sweeps.service.book import is_pruning_epoch
from sweeps.service.loop import LoopSettings, SweepLoop
from sweeps.service.records import CurvePoint, FinalRecord, Finished, TaskEnded, TaskLost, Trained
from sweeps.spec.status import TrialStatus


# --------------------------------------------------------------------------- fakes
class FakeConfig:
    def __init__(self, point: dict[str, Any]) -> None:
        self.point = point

    def flat(self) -> dict[str, Any]:
        return dict(self.point)


@dataclass
class FakeTrial:
    number: int


@dataclass
class Asked:
    trial: FakeTrial
    point: dict[str, Any]
    config: Any
    key: Any = "mlp"
    error: str | None = None


class FakeBook:
    """Hands out ``n_points`` points, records tells in order."""

    def __init__(self, n_points: int, bad: set[int] = frozenset(), prune_at: dict[int, int] | None = None) -> None:
        self.numbers = itertools.count()
        self.left = n_points
        self.bad = bad
        self.pending: list[Asked] = []
        self.finished = 0
        self.counts: dict[str, int] = {}
        self.best = "-"
        self.told: list[tuple[int, str]] = []
        self.interrupted: list[int] = []
        self.runs: dict[int, str] = {}
        self.reports: list[tuple[int, float, int]] = []
        self.prune_at = prune_at or {}

    def take(self, size: int, can_ask: int) -> list[Asked]:
        group = []
        while len(group) < size and self.left > 0:
            n = next(self.numbers)
            self.left -= 1
            point = {"train.lr": 0.1 * (n + 1)}
            error = "Traceback...\nValueError: bad point\n" if n in self.bad else None
            group.append(Asked(FakeTrial(n), point, FakeConfig(point), error=error))
            if error:
                break
        return group

    def stack_reason(self, asked: Asked) -> str | None:
        return None

    def note_run(self, number: int, run_id: str) -> None:
        self.runs[number] = run_id

    def report(self, number: int, value: float, step: int) -> bool:
        self.reports.append((number, value, step))
        return number in self.prune_at and step >= self.prune_at[number]

    def tell(self, number: int, status: TrialStatus, metrics: dict, point: dict) -> None:
        assert number not in [n for n, _ in self.told], f"trial {number} told twice"
        self.told.append((number, str(status)))
        self.finished += 1
        self.counts[status] = self.counts.get(status, 0) + 1

    def interrupt(self, number: int) -> None:
        self.interrupted.append(number)


class FakeRecorder:
    """Writes complete after ``delay`` rounds of the loop (``written`` calls), in order."""

    def __init__(self, delay: int = 0) -> None:
        self.delay = delay
        self.runs: dict[int, str] = {}
        self.curves: dict[int, list[CurvePoint]] = {}
        self.final: deque[list[Any]] = deque()  # [rounds left, number, record]
        self.finished: list[int] = []
        self.interrupted: list[int] = []
        self.closed = None
        self.new: list[int] = []

    def start(self, number: int, params: dict) -> None:
        self.runs[number] = f"run{number}"
        self.new.append(number)

    def started(self) -> list[tuple[int, str]]:
        new, self.new = self.new, []
        return [(n, self.runs[n]) for n in new]

    def curve(self, number: int, points: list[CurvePoint]) -> None:
        self.curves.setdefault(number, []).extend(points)

    def finish(self, number: int, record: FinalRecord, step: int) -> None:
        self.final.append([self.delay, number, record])

    def written(self, wait: bool = False) -> list[tuple[int, FinalRecord]]:
        done = []
        for entry in list(self.final):
            if wait or entry[0] <= 0:
                self.final.remove(entry)
                self.finished.append(entry[1])
                done.append((entry[1], entry[2]))
            else:
                entry[0] -= 1
        return done

    def wait_written(self, timeout: float) -> None:
        pass

    def writing(self) -> int:
        return len(self.final)

    def fail_unstarted(self, number: int, params: dict, traceback: str) -> str:
        self.finished.append(number)
        return f"run{number}"

    def interrupt(self, number: int) -> None:
        if number in self.runs:
            self.interrupted.append(number)

    def flush(self) -> None:
        pass

    def close(self, cancel: bool) -> None:
        self.closed = cancel


@dataclass
class FakeTask:
    numbers: list[int]
    events: deque = field(default_factory=deque)


class FakeExecutor:
    """Each launched task reports its members one per ``wait``; ``script(number, attempt)`` says
    what a member does: ``"converged"``, ``"lost"`` (its task dies), ``"trained"`` (measured apart),
    ``"end"`` (the task ends without it), ``"run"`` (keeps running, streaming curves)."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.handles = itertools.count()
        self.tasks: dict[int, FakeTask] = {}
        self.attempts: dict[int, int] = {}
        self.launches: list[list[int]] = []
        self.measures: dict[int, int] = {}
        self.max_tasks = 0
        self.cancelled: list[int] = []
        self.pruned: list[int] = []
        self.pending_curves: list[tuple[int, list[CurvePoint]]] = []
        self.closed = False

    def launch(self, trials: list) -> int:
        handle = next(self.handles)
        numbers = [t.number for t in trials]
        self.launches.append(numbers)
        task = FakeTask(numbers)
        for n in numbers:
            attempt = self.attempts[n] = self.attempts.get(n, 0) + 1
            what = self.script(n, attempt)
            if what == "lost":
                task.events.append(TaskLost(handle, "RayActorError: worker died"))
                break
            if what == "end":
                task.events.append(TaskEnded(handle))
                break
            if what == "run":
                for step in range(1, 5):
                    self.pending_curves.append(
                        (n, [CurvePoint("epoch", {"epoch": step, "train_loss": 1.0 / step}, step, 0)])
                    )
                continue
            if what == "trained":
                task.events.append(Trained(handle, n, f"weights{n}"))
            else:
                task.events.append(Finished(handle, n, FinalRecord(TrialStatus(what), {"test_acc": 0.5 + n / 100})))
        self.tasks[handle] = task
        self.max_tasks = max(self.max_tasks, len(self.tasks))
        return handle

    def measure(self, number: int, payload: Any) -> int:
        assert payload == f"weights{number}"
        handle = next(self.handles)
        self.tasks[handle] = FakeTask(
            [number], deque([Finished(handle, number, FinalRecord(TrialStatus.CONVERGED, {"test_acc": 0.9}))])
        )
        self.measures[number] = handle
        self.max_tasks = max(self.max_tasks, len(self.tasks))
        return handle

    def wait(self, handles: list, timeout: float) -> list:
        """One report per ready task; a population task that reported all its members ends
        (TaskEnded, as a Ray generator's StopIteration), a measure task ends with its record."""
        events = []
        for h in handles:
            task = self.tasks[h]
            if task.events:
                event = task.events.popleft()
                if isinstance(event, (TaskLost, TaskEnded)) or h in self.measures.values():
                    del self.tasks[h]
                events.append(event)
            elif not any(self.script(n, self.attempts[n]) == "run" for n in task.numbers):
                del self.tasks[h]
                events.append(TaskEnded(h))
        return events

    def curves(self) -> list:
        out, self.pending_curves = self.pending_curves, []
        return out

    def prune(self, handle: int, number: int, reason: str) -> None:
        self.pruned.append(number)
        self.tasks[handle].events.append(TaskEnded(handle, cancelled=True))

    def cancel(self, handle: int) -> None:
        self.cancelled.append(handle)
        self.tasks.pop(handle, None)

    def close(self) -> None:
        self.closed = True


class Lease:
    def __init__(self, lose_after: int | None = None) -> None:
        self.checks, self.lose_after = 0, lose_after

    def ensure(self) -> None:
        self.checks += 1
        if self.lose_after is not None and self.checks > self.lose_after:
            raise RuntimeError("lease lost")


class Stop:
    requested = False


class View:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.snapshots: list[Any] = []

    def log(self, line: str) -> None:
        self.lines.append(line)

    def update(self, snapshot: Any) -> None:
        self.snapshots.append(snapshot)


class Observer:
    def __init__(self) -> None:
        self.added: list[int] = []
        self.closed = False

    def add(self, number, status, point, metrics) -> None:
        self.added.append(number)

    def poll(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def make_loop(
    script,
    n_points=6,
    *,
    budget=None,
    concurrency=2,
    max_retries=2,
    population=1,
    prune=False,
    delay=0,
    lease=None,
    bad=frozenset(),
    prune_at=None,
):
    settings = LoopSettings("fake", budget or n_points, concurrency, max_retries, population, ["test_acc"], prune)
    parts = FakeExecutor(script), FakeRecorder(delay), FakeBook(n_points, bad, prune_at)
    loop = SweepLoop(
        settings,
        *parts,
        lease=lease or Lease(),
        stop=Stop(),
        view=View(),
        observers=[Observer()],
        population_size=population_size,
        is_pruning_epoch=is_pruning_epoch,
    )
    return loop, *parts


# --------------------------------------------------------------------------- tests
def test_budget_is_run_once_each_within_the_slots():
    loop, executor, recorder, book = make_loop(lambda n, a: "converged", n_points=10, budget=7, concurrency=3)
    loop.run()
    assert sorted(n for n, _ in book.told) == list(range(7))
    assert all(status == "converged" for _, status in book.told)
    assert executor.max_tasks <= 3
    assert sorted(book.runs) == list(range(7)) and sorted(recorder.finished) == list(range(7))
    assert loop.observers[0].added == [n for n, _ in book.told]


def test_populations_take_several_trials_per_task():
    loop, executor, _, book = make_loop(lambda n, a: "converged", n_points=8, concurrency=2, population=4)
    loop.run()
    assert [len(group) for group in executor.launches] == [4, 4]
    assert len(book.told) == 8


def test_a_trial_is_told_only_after_its_final_record_is_written():
    loop, executor, recorder, book = make_loop(lambda n, a: "converged", n_points=8, budget=4, delay=3)
    order = []
    recorder_written = recorder.written

    def written(wait=False):
        done = recorder_written(wait)
        order.extend(("written", n) for n, _ in done)
        return done

    book_tell = book.tell

    def tell(number, *args):
        assert ("written", number) in order, f"trial {number} told before its record was written"
        book_tell(number, *args)

    recorder.written, book.tell = written, tell
    loop.run()
    assert len(book.told) == 4
    assert sum(map(len, executor.launches)) == 4  # records being written count against the budget


def test_a_lost_task_is_relaunched_then_failed_when_retries_run_out():
    # trial 0's task dies on every attempt; trial 1's only on the first one
    script = lambda n, a: "lost" if n == 0 or (n == 1 and a == 1) else "converged"  # noqa: E731
    loop, executor, _, book = make_loop(script, n_points=3, max_retries=2)
    loop.run()
    assert executor.attempts[0] == 3 and executor.attempts[1] == 2 and executor.attempts[2] == 1
    assert dict(book.told) == {0: "failed", 1: "converged", 2: "converged"}
    assert any("task lost (RayActorError); re-launched (1 retries left)" in line for line in loop.view.lines)


def test_a_task_that_ends_without_a_member_fails_it():
    loop, _, _, book = make_loop(lambda n, a: "end" if n == 1 else "converged", n_points=3)
    loop.run()
    assert dict(book.told) == {0: "converged", 1: "failed", 2: "converged"}


def test_an_invalid_point_fails_before_start_and_the_sweep_goes_on():
    loop, executor, recorder, book = make_loop(lambda n, a: "converged", n_points=4, bad={2})
    loop.run()
    assert dict(book.told)[2] == "failed" and len(book.told) == 4
    assert all(2 not in group for group in executor.launches)
    assert book.runs[2] == "run2" and 2 in recorder.finished
    assert any("trial 2: failed before start: ValueError: bad point" in line for line in loop.view.lines)


def test_all_trials_failing_still_ends_the_sweep():
    loop, _, _, book = make_loop(lambda n, a: "failed", n_points=5)
    loop.run()
    assert [s for _, s in book.told] == ["failed"] * 5


def test_trained_members_are_measured_in_free_slots():
    loop, executor, _, book = make_loop(lambda n, a: "trained", n_points=6, concurrency=2, population=3)
    loop.run()
    assert sorted(executor.measures) == list(range(6))
    assert executor.max_tasks <= 2  # a measure task holds a slot too
    assert [s for _, s in book.told] == ["converged"] * 6


def test_pruning_reports_the_objective_at_pruning_epochs_and_stops_the_trial():
    script = lambda n, a: "run" if n == 0 else "converged"  # noqa: E731
    loop, executor, recorder, book = make_loop(script, n_points=2, prune=True, prune_at={0: 2})
    loop.s.objective = ["train_loss"]
    loop.run()
    assert executor.pruned == [0]
    assert dict(book.told) == {0: "pruned", 1: "converged"}
    assert [(n, step) for n, _, step in book.reports][:2] == [(0, 1), (0, 2)]
    assert len(recorder.curves[0]) == 4  # the streamed curve reached the recorder


def test_ctrl_c_interrupts_running_and_asked_trials_and_records_the_written_ones():
    loop, executor, recorder, book = make_loop(lambda n, a: "run" if n >= 1 else "converged", n_points=6)
    stop = loop.stop

    class StopAfterTwo:
        def poll(self):
            stop.requested = len(book.told) >= 1

        def add(self, *a):
            pass

        def close(self):
            pass

    loop.observers.append(StopAfterTwo())
    loop.run()
    loop.shutdown(record=True)
    assert dict(book.told) == {0: "converged"}
    assert book.interrupted == [1] and recorder.interrupted == [1]
    assert executor.cancelled and executor.closed and recorder.closed is False
    assert loop.observers[0].closed


def test_a_lost_lease_stops_the_loop_and_nothing_more_is_written():
    lease = Lease(lose_after=6)
    loop, executor, recorder, book = make_loop(lambda n, a: "run" if n >= 1 else "converged", n_points=4, lease=lease)
    with pytest.raises(RuntimeError, match="lease lost"):
        loop.run()
    told = list(book.told)
    loop.shutdown(record=False)
    assert book.told == told and book.interrupted == [] and recorder.interrupted == []
    assert recorder.closed is True  # writes in flight cancelled
    assert executor.cancelled  # tasks still stopped


@pytest.mark.parametrize("population", [1, 3])
def test_progress_snapshots_count_running_and_finished(population):
    loop, _, _, book = make_loop(lambda n, a: "converged", n_points=6, population=population)
    loop.run()
    last = loop.view.snapshots[-1]
    assert last.finished == 6 and last.budget == 6 and not last.running
    assert any(snap.running for snap in loop.view.snapshots)
