"""The driver's executor on Ray: population tasks, measure tasks, the metric queue, pruning stops.

One Ray streaming-generator task per population (:func:`sweeps.service.worker.population_task`),
``max_retries=0``: the driver's loop decides retries, re-launching only the members not yet
reported. A trained member's weights stay in Ray's object store: its measure task
(:func:`sweeps.service.worker.measure_task`) gets the object reference, the driver never the bytes. A
measure task is one member's work from its weights, so Ray may simply re-run it.

The metric queue (a :class:`ray.util.queue.Queue` actor) lives on the driver's node (a worker
node may die mid-sweep) and is restarted by Ray if it dies anyway; curve points in flight are
then lost, not the sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from ..spec.status import TrialStatus
from .records import (
    CurvePoint,
    Event,
    FinalRecord,
    Finished,
    Launch,
    MemberFinished,
    MemberReport,
    MemberTrained,
    TaskEnded,
    TaskLost,
    Trained,
)
from .worker import StopBoard, TrialFn, measure_task, population_task


class RayExecutor:
    """Runs a sweep's tasks on the connected Ray cluster.

    Args:
        trial_fn: replaces :func:`sweeps.trial.run.run_trial` (one trial per task), or ``None``.
        tracking_uri: given to each task (``MLFLOW_TRACKING_URI``) for user code that logs.
        cpus, gpus: resources of one task (``resources.cpus_per_trial`` / ``gpus_per_trial``).
        max_retries: Ray's re-runs of a lost measure task.
        prune: start the :class:`~sweeps.service.worker.StopBoard` that populations read (pruning).
        log: where to say that the metric queue is unavailable.
        checkpoint_dir: where the tasks' trials checkpoint and a re-launched trial finds its
            checkpoint (:mod:`sweeps.trial.checkpoint`; shared by every node), or ``None``: no checkpoints.
    """

    def __init__(
        self,
        trial_fn: TrialFn | None,
        tracking_uri: str,
        cpus: float,
        gpus: float,
        max_retries: int,
        prune: bool,
        log: Callable[[str], None],
        checkpoint_dir: str | None = None,
    ) -> None:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.queue = Queue(actor_options={"num_cpus": 0, "max_restarts": -1, "scheduling_strategy": here})
        self.trial_fn, self.tracking_uri, self.cpus, self.log = trial_fn, tracking_uri, cpus, log
        self.device = "cuda" if gpus > 0 else None
        self.task = ray.remote(population_task).options(
            num_cpus=cpus,
            num_gpus=gpus,
            num_returns="streaming",
            max_retries=0,
            retry_exceptions=False,
        )
        self.measure_remote = ray.remote(measure_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries)
        self.stops: Any = None  # the StopBoard actor's handle
        if prune and trial_fn is None:
            self.stops = ray.remote(StopBoard).options(num_cpus=0, max_restarts=-1, scheduling_strategy=here).remote()
        self.numbers: dict[Hashable, list[int]] = {}  # trial numbers of each task, by index
        self.measures: set[Hashable] = set()
        self.checkpoint_dir = checkpoint_dir
        # kind -> last step handed out, per trial: a task that continued from a checkpoint sends
        # the trial's records so far again, and the loop gets each once
        self.sent: dict[int, dict[str, int]] = {}

    def launch(self, trials: Sequence[Launch]) -> Hashable:
        numbers = [t.number for t in trials]
        gen = self.task.remote(
            self.trial_fn,
            [t.config for t in trials],
            numbers,
            self.queue,
            self.tracking_uri,
            self.cpus,
            self.device,
            len(trials) > 1,
            self.stops,
            self.checkpoint_dir,
        )
        self.numbers[gen] = numbers
        return gen

    def measure(self, number: int, payload: Any) -> Hashable:
        ref = self.measure_remote.remote(payload, self.tracking_uri, self.cpus, self.device)
        self.numbers[ref] = [number]
        self.measures.add(ref)
        return ref

    def wait(self, handles: Sequence[Hashable], timeout: float) -> list[Event]:
        """The reports of the tasks ready within ``timeout`` s: one member per ready population."""
        import ray

        ready, rest = ray.wait(list(handles), num_returns=1, timeout=timeout)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return [self._measured(h) if h in self.measures else self._next(h) for h in ready]

    def _next(self, gen: Any) -> Event:
        import ray

        try:
            report: MemberReport = ray.get(next(gen))
            # a trained member's weights are the task's next object: pass on its reference, unfetched
            weights = next(gen) if isinstance(report, MemberTrained) else None
        except StopIteration:
            self.numbers.pop(gen)
            return TaskEnded(gen)
        except ray.exceptions.TaskCancelledError:
            self.numbers.pop(gen)
            return TaskEnded(gen, cancelled=True)
        except ray.exceptions.RayError as err:  # the worker or its node died
            self.numbers.pop(gen)
            return TaskLost(gen, f"{type(err).__name__}: {err}")
        number = self.numbers[gen][report.index]
        if weights is not None:
            return Trained(gen, number, weights)
        assert isinstance(report, MemberFinished)
        return Finished(gen, number, report.record)

    def _measured(self, ref: Any) -> Event:
        import ray

        (number,) = self.numbers.pop(ref)
        self.measures.discard(ref)
        try:
            return Finished(ref, number, ray.get(ref).record)
        except ray.exceptions.RayError as err:
            return Finished(
                ref, number, FinalRecord.settled(TrialStatus.FAILED, f"measures lost: {type(err).__name__}: {err}")
            )

    def curves(self) -> list[tuple[int, list[CurvePoint]]]:
        """The in-training records that reached the metric queue since the last call."""
        import ray

        try:
            size = self.queue.qsize()
            batch = self.queue.get_nowait_batch(size) if size else []
        except ray.exceptions.RayError as err:  # queue restarting after its node died
            self.log(f"metric queue unavailable ({type(err).__name__}); live curves resume when it is back")
            return []
        curves = []
        for number, records in batch:
            sent = self.sent.setdefault(number, {})
            points = []
            for record in records:  # in step order per trial
                point = CurvePoint(*record)
                if point.step > sent.get(point.kind, -1):
                    sent[point.kind] = point.step
                    points.append(point)
            if points:
                curves.append((number, points))
        return curves

    def prune(self, handle: Hashable, number: int, reason: str) -> None:
        """Stop trial ``number``: its population drops it after its epoch (the others train on),
        or, without a stop board (one trial per task), its task is cancelled."""
        import ray

        if self.stops is not None:
            self.stops.stop.remote(number, reason)
        else:
            ray.cancel(handle, force=False)  # KeyboardInterrupt in the task: the worker survives

    def cancel(self, handle: Hashable) -> None:
        import ray

        ray.cancel(handle, force=True)
        self.numbers.pop(handle, None)
        self.measures.discard(handle)

    def close(self) -> None:
        try:
            self.queue.shutdown()
        except Exception:  # the queue actor may already be gone with its cluster
            pass


__all__ = ["RayExecutor"]
