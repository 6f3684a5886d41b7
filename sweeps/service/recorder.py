"""The driver's recorder on MLflow: every write of a sweep's trials, and their concurrency.

Per trial: a child run created when it is launched, its in-training curves streamed into it,
and its final record (metrics, artifacts, then the status tag, then the run ended) written when
it finishes. Against a tracking server the writes run in a thread pool
(:data:`MLFLOW_SERVER_WRITERS`) while the loop goes on launching and telling; a local store
(SQLite, files) is written in place, in the driver's thread. A failed write raises where the
loop reads its result (:meth:`MlflowRecorder.started`, :meth:`~MlflowRecorder.written`,
:meth:`~MlflowRecorder.flush`).

Every write goes through ``retry`` (the driver's :class:`~sweeps.service.outages.StoreGuard` for the
tracking store): while the store is unreachable a write is tried again, in its writer thread,
and written once when the store is back. A retried run creation first looks for the run the
try before may have created; a final record keeps the timestamp of its first try.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..spec.status import TrialStatus
from .records import CurvePoint, FinalRecord
from .tracking import now_ms

if TYPE_CHECKING:
    from .tracking import Tracker

#: MLflow writes the driver may have in flight at once against a tracking server. Each request
#: mostly waits for the server (measured here: 60 ms for a ``get_run`` against ``mlflow server``
#: on PostgreSQL, a few of them in this process), so child runs, streamed curves and final
#: records are written by a thread pool while the driver goes on launching and telling. A local
#: store (SQLite, files) is written by this process under the GIL, where a writer thread was
#: measured slower than writing in place: it is written at once, in the driver's thread.
MLFLOW_SERVER_WRITERS = 8

Future = concurrent.futures.Future[Any]


def mlflow_names(kind: str, values: Mapping[str, float]) -> dict[str, float]:
    """The MLflow metric names of a streamed training record: a tracking record's values go to
    ``track.<key>`` (under the bare key the last tracked ``hessian_top_eig`` would stand in for
    the final measure of a trial that has none), but for the ``epoch`` and ``lr`` it shares
    with the epoch records."""
    if kind != "track":
        return dict(values)
    return {key if key in ("epoch", "lr") else f"track.{key}": value for key, value in values.items()}


class _Writes:
    """:meth:`submit` returns a future, done at once for a local store. Writes that depend on a
    child run wait for it inside the pool; the pool takes work in order, so a write never waits
    for one queued behind it."""

    def __init__(self, tracking_uri: str) -> None:
        local = urlsplit(tracking_uri).scheme in ("", "file", "sqlite")
        self.pool = (
            None
            if local
            else concurrent.futures.ThreadPoolExecutor(MLFLOW_SERVER_WRITERS, thread_name_prefix="sweeps-mlflow")
        )

    def submit(self, write: Callable[..., Any], *args: Any) -> Future:
        if self.pool is not None:
            return self.pool.submit(write, *args)
        future: Future = concurrent.futures.Future()
        try:
            future.set_result(write(*args))
        except Exception as err:  # raised where the driver reads the result, as from the pool
            future.set_exception(err)
        return future

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)


class MlflowRecorder:
    """Writes one sweep's child runs under its parent run.

    Args:
        tracker: the sweep's :class:`~sweeps.service.tracking.Tracker`.
        sweep: the sweep's name (its experiment).
        parent: the parent run's id.
        before_final: called right before a final status tag is written (the lease check).
        retry: every write made as ``retry(write, *args)`` (default: called once).
    """

    def __init__(
        self,
        tracker: Tracker,
        sweep: str,
        parent: str,
        before_final: Callable[[], None],
        retry: Callable[..., Any] | None = None,
    ) -> None:
        self.tracker, self.sweep, self.parent, self.before_final = tracker, sweep, parent, before_final
        self.retry: Callable[..., Any] = retry or (lambda write, *args: write(*args))
        self.writes = _Writes(tracker.tracking_uri)
        self.runs: dict[int, Future] = {}  # child run id of each trial
        self._unnoted: list[int] = []  # created or being created, not yet returned by started()
        self._final: dict[Future, tuple[int, FinalRecord]] = {}
        self._curves: list[Future] = []

    def run_id(self, number: int) -> str:
        return self.runs[number].result()

    def start(self, number: int, params: Mapping[str, Any]) -> None:
        self.runs[number] = self.writes.submit(self._start, number, params)
        self._unnoted.append(number)

    def _start(self, number: int, params: Mapping[str, Any]) -> str:
        tries = 0

        def create() -> str:
            nonlocal tries
            tries += 1
            found = self.tracker.child_run(self.parent, number) if tries > 1 else None
            if found is None:
                return self.tracker.start_child(self.sweep, self.parent, number, params)
            self.tracker.log_params(found, params)  # the try that created it may have stopped before its params
            return found

        return self.retry(create)

    def started(self) -> list[tuple[int, str]]:
        """Trials whose child run was created since the last call, with its id; a failed
        creation raises here."""
        done = [n for n in self._unnoted if self.runs[n].done()]
        self._unnoted = [n for n in self._unnoted if n not in done]
        return [(n, self.runs[n].result()) for n in done]

    def curve(self, number: int, points: Sequence[CurvePoint]) -> None:
        batch = [(mlflow_names(p.kind, p.values), p.step, p.timestamp_ms) for p in points]
        self._check_curves()
        write = self.tracker.log_metrics
        self._curves.append(self.writes.submit(lambda: self.retry(write, self.run_id(number), batch)))

    def finish(self, number: int, record: FinalRecord, step: int) -> None:
        self._final[self.writes.submit(self._finish, number, record, step, now_ms())] = (number, record)

    def _finish(self, number: int, record: FinalRecord, step: int, timestamp_ms: int) -> None:
        self.retry(
            functools.partial(
                self.tracker.finish_child,
                self.run_id(number),
                record.status,
                record.metrics,
                step=step,
                timestamp_ms=timestamp_ms,
                artifacts=record.artifacts,
                traceback=record.traceback,
                tags={f"sweeps.{k}": v for k, v in record.node.items()},
                before_final=self.before_final,
            )
        )

    def writing(self) -> int:
        """Final records not yet written."""
        return len(self._final)

    def wait_written(self, timeout: float) -> None:
        concurrent.futures.wait(self._final, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    def written(self, wait: bool = False) -> list[tuple[int, FinalRecord]]:
        """The final records written since the last call (all of them with ``wait``); a failed
        write raises here."""
        if wait:
            concurrent.futures.wait(self._final)
        done = []
        for future in [f for f in self._final if f.done()]:
            number, record = self._final.pop(future)
            future.result()
            self.runs.pop(number, None)
            done.append((number, record))
        return done

    def _check_curves(self, wait: bool = False) -> None:
        if wait:
            concurrent.futures.wait(self._curves)
        for future in [f for f in self._curves if f.done()]:
            self._curves.remove(future)
            future.result()

    def flush(self) -> None:
        """Wait for the curve points in flight; a failed write raises here."""
        self._check_curves(wait=True)

    def fail_unstarted(self, number: int, params: Mapping[str, Any], traceback: str) -> str:
        """Record a trial that could not start (its point does not validate): its run's id."""
        run_id: str = self._start(number, params)
        self.retry(self.tracker.finish_child, run_id, TrialStatus.FAILED, {}, traceback=traceback)
        return run_id

    def interrupt(self, number: int) -> None:
        """End trial ``number``'s run ``interrupted``, if it was created."""
        run = self.runs.pop(number, None)
        if run is not None and run.done() and run.exception() is None:
            self.retry(self.tracker.end, run.result(), TrialStatus.INTERRUPTED)

    def close(self, cancel: bool) -> None:
        self.writes.close(cancel=cancel)


__all__ = ["MLFLOW_SERVER_WRITERS", "MlflowRecorder", "mlflow_names"]
