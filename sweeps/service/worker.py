"""The worker side of a sweep: the Ray task that trains one population of trials.

One Ray task runs the trials of one population (:mod:`sweeps.trial.population`; a population of one is
a single trial) with ``num_cpus``/``num_gpus`` from ``resources`` and
``torch.set_num_threads(num_cpus)``. It is a Ray *streaming generator*: each member's record is
yielded the moment the member leaves the stack (converged, diverged, ``max_epochs``, or failed),
so the driver records it, tells Optuna and moves the progress table while the others train. A
record is a typed :class:`~sweeps.service.records.MemberFinished`: a
:class:`~sweeps.service.records.FinalRecord` (status, final metrics, the artifact files' bytes, so
a trial on another node needs no shared file system; traceback; node) and the seconds taken.

A member of a population of several is not measured in the population's task: it is reported
as :class:`~sweeps.service.records.MemberTrained`, followed by its weights as the task's next
object (:class:`~sweeps.trial.run.TrainedMember`), whose reference the driver hands to a task of
their own (:func:`measure_task`) without fetching it, so the rest of the population trains on
and the measures take whichever CPU is free.

In-training metrics go through the driver's metric queue (:class:`MetricStream`, one put per
2 s per trial); the task never writes to MLflow itself (see :mod:`sweeps.runner`). Pruning goes
the other way: the driver posts the trials to stop on a :class:`StopBoard` actor, which a
population reads at most every :data:`STOP_POLL_SECONDS`. It gets the
tracking URI in ``MLFLOW_TRACKING_URI`` (``MLFLOW_RUN_ID`` removed), so user code inside a trial
that does call MLflow writes to the sweep's store, not to a stray local one.
"""

from __future__ import annotations

import math
import os
import queue as queues
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..adapters.ray_adapter import put_nowait_async
from ..spec.status import TrialStatus
from .records import FinalRecord, MemberFinished, MemberTrained

TrialFn = Callable[..., Any]
#: Seconds between two puts of one trial's in-training metrics into the driver's queue.
FLUSH_SECONDS = 2.0
#: Artifact files larger than this are not sent to the driver (bytes).
MAX_ARTIFACT_BYTES = 64 * 2**20
#: Seconds between two reads of the driver's :class:`StopBoard` by one population.
STOP_POLL_SECONDS = 1.0


class StopBoard:
    """The trials the driver wants stopped (pruned), by number, with the reason; a Ray actor
    that the population tasks read (:class:`StopPoll`)."""

    def __init__(self) -> None:
        self.reasons: dict[int, str] = {}

    def stop(self, number: int, reason: str) -> None:
        self.reasons.setdefault(number, reason)

    def among(self, numbers: Sequence[int]) -> dict[int, str]:
        return {n: self.reasons[n] for n in numbers if n in self.reasons}


class StopPoll:
    """``stop(index)`` for :func:`~sweeps.trial.run.run_population`: the board's reason for the
    member's trial, the board read at most once per :data:`STOP_POLL_SECONDS`."""

    def __init__(self, board: Any, numbers: Sequence[int]) -> None:
        self.board, self.numbers = board, list(numbers)
        self.reasons: dict[int, str] = {}
        self.last_read = -math.inf

    def __call__(self, index: int) -> str | None:
        import ray

        if time.monotonic() - self.last_read >= STOP_POLL_SECONDS:
            self.last_read = time.monotonic()
            try:
                self.reasons = ray.get(self.board.among.remote(self.numbers))
            except ray.exceptions.RayError:  # the board is restarting: ask again at the next poll
                pass
        return self.reasons.get(self.numbers[index])


class MetricStream:
    """One trial's in-training records: buffers them, flushes them to the driver's queue as
    ``(trial number, [(kind, values, step, timestamp ms), ...])``.

    Called as the ``log(metrics, step)`` of a trial function (kind ``"epoch"``), or given
    :class:`~sweeps.trial.train.TrainingRecord` objects with :meth:`record`.
    """

    def __init__(self, queue: Any, trial_number: int) -> None:
        self.queue, self.trial_number = queue, trial_number
        self.buffer: list[tuple[str, dict[str, float], int, int]] = []
        self.last_flush = time.monotonic()

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        self.add("epoch", metrics, step)

    def record(self, record: Any) -> None:
        self.add(record.kind, record.values, record.step)

    def add(self, kind: str, metrics: Mapping[str, float], step: int) -> None:
        self.buffer.append((kind, dict(metrics), int(step), int(time.time() * 1000)))
        if time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send the buffer. Not waited for during training (a task blocked in ``ray.get`` lends
        its CPU to another task meanwhile); ``wait`` when the trial ends, so that its last points
        are in the queue before its record reaches the driver."""
        import ray

        if self.buffer and self.queue is not None:
            try:
                sent = put_nowait_async(self.queue, (self.trial_number, self.buffer))
                if wait:
                    ray.get(sent)
            except ray.exceptions.RayError:  # the queue is restarting: live curve points are best effort
                pass
        self.buffer = []
        self.last_flush = time.monotonic()


def read_artifacts(artifacts: Mapping[str, Any] | None, out_dir: Path) -> dict[str, bytes]:
    """Bytes of a trial's artifact files (and of any other file it left in ``out_dir``)."""
    paths = {Path(p) for p in (artifacts or {}).values()}
    paths |= {p for p in out_dir.rglob("*") if p.is_file()}
    files = {}
    for path in sorted(paths):
        if path.is_file() and path.stat().st_size <= MAX_ARTIFACT_BYTES:
            try:
                name = str(path.relative_to(out_dir))
            except ValueError:
                name = path.name
            files[name] = path.read_bytes()
    return files


def _report(
    index: int, result: Any | None, tb: str | None, out_dir: Path, started: float, node: Mapping[str, str]
) -> MemberFinished:
    """Member ``index``'s final record: its result, or its failure (``tb``)."""
    if result is None:
        status, metrics, artifacts = TrialStatus.FAILED, {}, read_artifacts(None, out_dir)
    else:
        status = TrialStatus(result.status)
        metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
        artifacts = read_artifacts(result.artifacts, out_dir)
    record = FinalRecord(status, metrics, artifacts, tb, {k: str(v) for k, v in node.items() if v})
    return MemberFinished(index, record, time.perf_counter() - started)


def _members(
    trial_fn: TrialFn | None,
    configs: Sequence[Any],
    streams: Sequence[MetricStream],
    out_dirs: Sequence[Path],
    device: str | None,
    measure_apart: bool = False,
    stop: StopPoll | None = None,
    checkpoint_dir: str | None = None,
) -> Iterator[tuple[int, Any | None, str | None]]:
    """``(index, result, None)`` per member as it finishes, ``(index, None, traceback)`` per failure.

    With ``measure_apart`` a member with measures to compute comes as ``(index, TrainedMember,
    None)``; ``stop`` is the population's :class:`StopPoll`; ``checkpoint_dir`` where members
    checkpoint and find their checkpoints (:mod:`sweeps.trial.checkpoint`).

    A population trains in a thread (its results arrive by callback); a replacement ``trial_fn``
    runs its single trial here. An exception that escapes the population fails the members that
    had not finished, each with that traceback.
    """
    if trial_fn is not None:  # one trial per task (sweeps.runner keeps populations of one for it)
        try:
            yield 0, trial_fn(configs[0], log=streams[0], out_dir=out_dirs[0], device=device), None
        except Exception:
            yield 0, None, traceback.format_exc()
        return
    from ..trial.run import run_population

    done: queues.Queue[Any] = queues.Queue()
    end = object()

    def train() -> None:
        try:
            run_population(
                configs,
                on_result=lambda i, r: done.put((i, r, None)),
                on_error=lambda i, tb: done.put((i, None, tb)),
                log=lambda i, record: streams[i].record(record),
                out_dirs=out_dirs,
                device=device,
                on_trained=(lambda i, member: done.put((i, member, None))) if measure_apart else None,
                stop=stop,
                checkpoint_dir=checkpoint_dir,
            )
        except Exception:
            done.put((None, None, traceback.format_exc()))
        finally:
            done.put(end)

    thread = threading.Thread(target=train, name="sweeps-population", daemon=True)
    thread.start()
    reported: set[int] = set()
    while (item := done.get()) is not end:
        index, result, tb = item
        if index is None:  # the population itself raised: every member still training failed
            for i in range(len(configs)):
                if i not in reported:
                    reported.add(i)
                    yield i, None, tb
            continue
        reported.add(index)
        yield index, result, tb
    thread.join()


def population_task(
    trial_fn: TrialFn | None,
    configs: Sequence[Any],
    numbers: Sequence[int],
    queue: Any,
    tracking_uri: str,
    cpus: float,
    device: str | None,
    measure_apart: bool = False,
    stop_board: Any = None,
    checkpoint_dir: str | None = None,
) -> Iterator[Any]:
    """Body of the Ray task (a streaming generator) training the trials ``numbers`` with ``configs``.

    Yields one :class:`~sweeps.service.records.MemberFinished` per member, in the order they
    finish, and never raises for a trial's own exception: that member's record is ``failed`` with
    its traceback. With ``measure_apart`` a member to measure is yielded as a
    :class:`~sweeps.service.records.MemberTrained` followed by its weights, a
    :class:`~sweeps.trial.run.TrainedMember` (for :func:`measure_task`); ``stop_board`` is the driver's :class:`StopBoard` (pruning);
    ``checkpoint_dir`` the folder (shared by the cluster) where the members checkpoint and a
    re-run member finds its checkpoint (:mod:`sweeps.trial.checkpoint`; ``None``: no checkpoints).
    """
    from ..trial.run import TrainedMember

    streams = [MetricStream(queue, n) for n in numbers]
    out_dirs = [Path(tempfile.mkdtemp(prefix=f"sweeps-trial-{n}-")) for n in numbers]
    started, node = _task_start(tracking_uri, cpus)
    stop = None if stop_board is None else StopPoll(stop_board, numbers)
    try:
        for index, result, tb in _members(
            trial_fn, configs, streams, out_dirs, device, measure_apart, stop, checkpoint_dir
        ):
            streams[index].flush(wait=True)
            if isinstance(result, TrainedMember):
                yield MemberTrained(index, time.perf_counter() - started)
                yield result
            else:
                yield _report(index, result, tb, out_dirs[index], started, node)
            shutil.rmtree(out_dirs[index], ignore_errors=True)
    finally:
        for out_dir in out_dirs:
            shutil.rmtree(out_dir, ignore_errors=True)


def measure_task(member: Any, tracking_uri: str, cpus: float, device: str | None) -> MemberFinished:
    """Body of the Ray task that measures one trained member (``member``: the
    :class:`~sweeps.trial.run.TrainedMember` :func:`population_task` yielded). Returns the member's
    record, as the population would have yielded it had it measured the member itself (``index``
    0: the driver knows whose it is)."""
    from ..trial.run import measure_trained

    started, node = _task_start(tracking_uri, cpus)
    out_dir = Path(tempfile.mkdtemp(prefix=f"sweeps-measure-{os.getpid()}-"))
    try:
        try:
            result, tb = measure_trained(member, out_dir=out_dir, device=device), None
        except Exception:
            result, tb = None, traceback.format_exc()
        return _report(0, result, tb, out_dir, started, node)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _task_start(tracking_uri: str, cpus: float) -> tuple[float, dict[str, str]]:
    """Set a task's environment (tracking URI, torch threads); its start time and node."""
    import ray
    import torch

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ.pop("MLFLOW_RUN_ID", None)
    torch.set_num_threads(max(1, int(cpus)))
    context = ray.get_runtime_context()
    return time.perf_counter(), {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address()}


__all__ = [
    "FLUSH_SECONDS",
    "MAX_ARTIFACT_BYTES",
    "STOP_POLL_SECONDS",
    "MetricStream",
    "StopBoard",
    "StopPoll",
    "measure_task",
    "population_task",
    "read_artifacts",
]
