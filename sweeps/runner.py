"""Run a sweep: the driver asks Optuna for points, Ray tasks train and measure, the driver records.

Roles:

* **driver** (this module, one process per sweep, holding the sweep's lease, :mod:`sweeps.lease`):
  opens the study (:mod:`sweeps.search`) and the MLflow parent run (:mod:`sweeps.tracking`), asks
  points and groups those of one shape into populations (:mod:`sweeps.batching`), launches one
  Ray task per population, streams the trials' metrics into their MLflow child runs, records
  and tells each trial the moment its task reports it, shows progress.
* **Ray task** (:func:`sweeps.worker.population_task`): trains the population's models as one
  stack (:mod:`sweeps.population`; a population of one is a single trial) and yields each
  member's status, final metrics and artifact bytes as the member finishes.

Only the driver writes to MLflow. Workers send their in-training metrics through a Ray queue
(batched: one put per 2 s per trial), the driver drains it 4 times a second and writes them
with ``log_batch``. Why: an SQLite store allows one writer at a time ("database is locked"
under concurrent trials), workers of a remote cluster then need neither network access nor
credentials for the tracking server, and no worker can fall back to a ``mlflow.db`` in its own
working directory. Each task still gets the tracking URI in ``MLFLOW_TRACKING_URI`` (and
``MLFLOW_RUN_ID`` removed), so user code inside a trial that does call MLflow writes to the
sweep's store, not to a stray local one.

Fault handling:

* A worker or node that dies mid-task: the driver re-launches the task's members that were not
  recorded yet (``max_retries`` times, on any node with the resources; recorded members are
  neither re-run nor recorded twice); when retries are exhausted they are recorded ``failed``.
* A trial that raises: recorded ``failed`` with ``traceback.txt`` in its MLflow run; the sweep
  goes on. A diverged trial is not an exception: status ``diverged`` (told FAIL).
* Ctrl-C / SIGTERM: the driver stops launching, cancels the running tasks, marks their trials
  ``interrupted`` (Optuna FAIL + point re-enqueued; MLflow KILLED) and ends the parent run
  KILLED. A second Ctrl-C aborts at once. Nothing is half-written: a child run gets its final
  ``status`` tag only after its metrics and artifacts.
* A killed driver (SIGKILL, lost machine): the next ``sweeps run``/``resume`` of the sweep
  finds the RUNNING trials and either tells them from their MLflow run (if that run was fully
  recorded) or marks them interrupted and re-enqueues their points, and ends orphaned MLflow
  runs KILLED. Completed trials are never repeated.

Pruning (``prune=True``, off by default) reports the objective metric streamed during
training to Optuna's ``MedianPruner`` (at the epochs of :func:`is_pruning_epoch`) and stops the
trials it prunes (status ``pruned``, no landscape measures); a pruned member leaves its
population, whose other members train on. It is refused for grids (the analysis needs every point of the factorial)
and for objectives that are not reported during training (landscape measures are computed
after convergence: pruning would drop the very numbers the study is about).
"""

from __future__ import annotations

import concurrent.futures
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import optuna

from . import checkpoint, search
from .batching import AskedTrial, PointQueue, population_size
from .connections import Connections, check_reachable, redact, resolve, use_wal
from .lease import DriverLease, LeaseLostError
from .live import LiveCorrelation, live_target
from .progress import ProgressView, RunningTrial, Snapshot
from .status import TrialStatus, is_finished
from .worker import StopBoard, TrialFn, measure_task, population_task

if TYPE_CHECKING:
    from .tracking import Tracker

_POLL_SECONDS = 0.25

#: MLflow writes the driver may have in flight at once against a tracking server. Each request
#: mostly waits for the server (measured here: 60 ms for a ``get_run`` against ``mlflow server``
#: on PostgreSQL, a few of them in this process), so child runs, streamed curves and final
#: records are written by a thread pool while the driver goes on launching and telling. A local
#: store (SQLite, files) is written by this process under the GIL, where a writer thread was
#: measured slower than writing in place: it is written at once, in the driver's thread.
MLFLOW_SERVER_WRITERS = 8


class _Writes:
    """The driver's MLflow writes (see :data:`MLFLOW_SERVER_WRITERS`): :meth:`submit` returns a
    future, done at once for a local store. Writes that depend on a child run wait for it inside
    the pool; the pool takes work in order, so a write never waits for one queued behind it."""

    def __init__(self, tracking_uri: str) -> None:
        local = urlsplit(tracking_uri).scheme in ("", "file", "sqlite")
        self.pool = None if local else concurrent.futures.ThreadPoolExecutor(
            MLFLOW_SERVER_WRITERS, thread_name_prefix="sweeps-mlflow")

    def submit(self, write: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        if self.pool is not None:
            return self.pool.submit(write, *args)
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(write(*args))
        except Exception as err:  # raised where the driver reads the result, as from the pool
            future.set_exception(err)
        return future

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)


class SweepInterrupted(KeyboardInterrupt):
    """The driver was stopped (Ctrl-C / SIGTERM) after recording the running trials as interrupted.

    ``args[0]`` (and :attr:`summary`) is the :class:`SweepSummary` of the stopped run."""

    @property
    def summary(self) -> SweepSummary:
        return self.args[0]


@dataclass
class SweepSummary:
    """What :func:`run_sweep` returns.

    Attributes:
        name: sweep (study, experiment) name.
        budget: trials the sweep runs in total.
        counts: trials per status over the whole study (``converged``, ``diverged``, ...).
        best: the best trials (several for multi-objective): ``number``, ``values``, ``params``.
        parent_run_id: MLflow parent run.
        interrupted: True when stopped by a signal before the budget was spent.
        elapsed_s: wall seconds of this driver run.
        connections: where everything was written.
        launched: trials launched by this driver run.
        complete: trials that produced the objective (Optuna COMPLETE), over the whole study.
        already_finished: the sweep was finished before this call (nothing was run).
    """

    name: str
    budget: int
    counts: dict[str, int]
    best: list[dict[str, Any]]
    parent_run_id: str
    interrupted: bool
    elapsed_s: float
    connections: Connections
    launched: int = 0
    complete: int = 0
    already_finished: bool = False

    @property
    def finished(self) -> int:
        """Trials that count towards the budget."""
        return sum(v for k, v in self.counts.items() if is_finished(k))


# --- driver side -------------------------------------------------------------------------------
class _StopFlag:
    """SIGINT/SIGTERM handler: the first signal asks for a clean stop, the second aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@dataclass
class _Member:
    """A launched trial: its Optuna trial, MLflow child run and what the view shows of it."""

    trial: optuna.Trial
    run: concurrent.futures.Future  # of the child run's id (see _Writes)
    config: Any
    view: RunningTrial
    last_step: int = -1
    pruned: dict[str, float] | None = None  # the metrics at which the pruner stopped it
    streamed: dict[str, int] = field(default_factory=dict)  # kind -> last step written (re-sent after a restore)

    @property
    def run_id(self) -> str:
        return self.run.result()


@dataclass
class _Task:
    """A population task in flight: its members by index, and re-launches left after a lost worker."""

    members: dict[int, _Member]
    retries_left: int


def _connect_ray(address: str | None, quiet: bool) -> bool:
    """Connect to Ray (``address``) or start a local one sized to this machine; True if started here."""
    import ray

    from .logs import ray_logging_level

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=quiet, logging_level=ray_logging_level())
    else:
        ray.init(include_dashboard=False, log_to_driver=quiet, object_store_memory=256 * 2**20,
                 logging_level=ray_logging_level())
    return True


def _concurrency(config: Any, max_concurrent: int | None) -> int:
    import ray

    limit = max_concurrent or config.resources.max_concurrent
    if limit:
        return int(limit)
    resources = ray.cluster_resources()
    fits = resources.get("CPU", 1) // config.resources.cpus_per_trial
    if config.resources.gpus_per_trial > 0:
        fits = min(fits, resources.get("GPU", 0) // config.resources.gpus_per_trial)
    return max(1, int(fits))


def _check_pruning(config: Any) -> None:
    if config.search.sampler == "grid":
        raise ValueError("prune: not allowed with the grid sampler (the analysis needs every grid point measured)")
    if len(config.objective.metrics) != 1:
        raise ValueError("prune: needs a single objective metric (got several)")
    if config.objective.metrics[0] not in ("train_loss", "train_acc", "test_loss", "test_acc", "gen_gap"):
        raise ValueError(
            f"prune: objective {config.objective.metrics[0]!r} is measured after convergence, so a pruned "
            "trial would lack it; prune only on train_loss/train_acc/test_loss/test_acc/gen_gap"
        )


def mlflow_names(kind: str, values: Mapping[str, float]) -> dict[str, float]:
    """The MLflow metric names of a streamed training record: a tracking record's values go to
    ``track.<key>`` (under the bare key the last tracked ``hessian_top_eig`` would stand in for
    the final measure of a trial that has none), but for the ``epoch`` and ``lr`` it shares
    with the epoch records."""
    if kind != "track":
        return dict(values)
    return {key if key in ("epoch", "lr") else f"track.{key}": value for key, value in values.items()}


def is_pruning_epoch(epoch: int) -> bool:
    """Whether the objective after ``epoch`` is reported to the pruner: epochs 1-8, then four
    per doubling (10, 12, 14, 16, 20, 24, ...). Each report is a storage write and each pruning
    decision reads every trial's reports, so reporting every epoch of a fast model would make
    the driver the bottleneck; the epochs are the same for every trial, as the median pruner
    needs (it compares trials at equal steps)."""
    return epoch >= 1 and epoch % max(1, 2 ** (epoch.bit_length() - 1) // 4) == 0


def _best(study: optuna.Study) -> list[dict[str, Any]]:
    try:  # single objective: one indexed query; several: the Pareto front (reads all trials)
        trials = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    except ValueError:
        return []
    return [{"number": t.number, "values": list(t.values), "params": dict(t.params)} for t in trials]


def _with_completed(best: list[dict[str, Any]], trial: dict[str, Any],
                    directions: Sequence[optuna.study.StudyDirection]) -> list[dict[str, Any]]:
    """``best`` (as :func:`_best` returns it) after ``trial`` (``number``, ``values``, ``params``)
    completed: what :func:`_best` would read from the study then, kept by the driver so that
    recording a trial reads no other trial (the Pareto front is otherwise a scan of the study).
    A tie keeps the earlier trial best (single objective); equal values share the front."""
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


def _describe_best(best: list[dict[str, Any]], metrics: list[str]) -> str:
    if not best:
        return "-"
    first = best[0]
    values = " ".join(f"{m}={v:.4g}" for m, v in zip(metrics, first["values"]))
    more = f" (+{len(best) - 1} on the Pareto front)" if len(best) > 1 else ""
    return f"#{first['number']} {values}{more}"


def run_sweep(
    config: Any,
    *,
    name: str | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    results_dir: str | Path | None = None,
    max_concurrent: int | None = None,
    quiet: bool = False,
    resume: bool = False,
    max_retries: int = 2,
    prune: bool = False,
    config_yaml: str | None = None,
    trial_fn: TrialFn | None = None,
    report: bool = True,
) -> SweepSummary:
    """Run (or continue) the sweep ``config`` to its budget.

    Args:
        config: a :class:`~sweeps.config.SweepConfig`, a YAML path or a dict.
        name: sweep name (default ``config.name``): the Optuna study and MLflow experiment.
        address: Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:10001``); default: an
            already initialized Ray, else ``$RAY_ADDRESS``, else a local Ray sized to this machine.
        tracking_uri, storage, results_dir: see :mod:`sweeps.connections`.
        max_concurrent: trials in flight (default ``resources.max_concurrent``, else as many as
            the cluster's CPUs/GPUs fit).
        quiet: plain log lines instead of the live view.
        resume: the study must exist already (``sweeps resume``).
        max_retries: re-runs of a trial whose worker or node died (application errors are not
            retried: they are recorded as ``failed``).
        prune: stop unpromising trials early (see the module docstring for the rules).
        config_yaml: the YAML text to keep with the sweep (default: the resolved config as YAML).
        trial_fn: replaces :func:`sweeps.trial.run_trial` (same signature); for benchmarks and tests.
        report: when the sweep completes, run the analysis (:func:`sweeps.report.report_sweep`):
            files under ``<results dir>/reports/<name>`` and artifacts on the parent run.

    Returns:
        a :class:`SweepSummary` (at once, without starting Ray, when the sweep was finished
        already: ``already_finished``).

    Raises:
        SweepInterrupted: after a clean stop on a signal (running trials recorded interrupted).
        ValueError: ``ConfigError``, ``StudyConflictError`` or a bad argument, before anything runs.
        ConnectionError: a store is unreachable.
        LeaseHeldError: another live driver runs this sweep (nothing was touched).
        LeaseLostError: another driver took this one's lease while it ran (it was paused past
            the lease period); this driver stopped without writing more.
    """
    import yaml

    from .config import ConfigError, SweepConfig, load_config

    if not isinstance(config, SweepConfig):
        if isinstance(config, (str, Path)) and config_yaml is None:
            config_yaml = Path(config).read_text()
        config = load_config(config)
    if name is not None and name != config.name:
        config = config.with_point({"name": name})
    search.validate_search(config)
    if prune:
        _check_pruning(config)
    resolved = config.model_dump(mode="json")

    if max_concurrent is not None:  # checked as the config field it overrides
        try:
            config = config.with_point({"resources.max_concurrent": max_concurrent})
        except ConfigError as err:
            raise ConfigError([f"max_concurrent (--max-concurrent, overrides resources.max_concurrent): "
                               f"{p.split(': ', 1)[-1]}" for p in err.problems]) from None
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(f"max_retries (--max-retries): must be an integer >= 0 (got {max_retries!r})")
    conn = resolve(results_dir=results_dir, tracking_uri=tracking_uri, storage=storage, address=address)
    check_reachable(conn)
    with DriverLease(conn.storage, config.name) as lease:
        return _drive(config, conn, lease, resume=resume, quiet=quiet, max_retries=max_retries, prune=prune,
                      config_yaml=config_yaml or yaml.safe_dump(resolved, sort_keys=False), trial_fn=trial_fn,
                      report=report)


def _drive(config: Any, conn: Connections, lease: DriverLease, *, resume: bool, quiet: bool, max_retries: int,
           prune: bool, config_yaml: str, trial_fn: TrialFn | None, report: bool) -> SweepSummary:
    """The body of :func:`run_sweep` while this driver holds the sweep's lease."""
    import ray

    study = search.open_study(config, conn.storage, resume=resume)
    budget = search.n_trials(config)
    if config.search.sampler == "grid":
        budget = min(budget, search.grid_size(config))
    study.set_user_attr("budget", budget)
    metrics_names = list(config.objective.metrics)
    counts = search.status_counts(study)
    if _is_done(counts, budget):
        summary = SweepSummary(config.name, budget, counts, _best(study), study.user_attrs.get("mlflow_parent_run_id", ""),
                               False, 0.0, conn, complete=_complete(study), already_finished=True)
        with ProgressView(quiet=True) as view:
            view.log(f"sweep {config.name}: already finished ({summary.finished}/{budget} trials); nothing to run. "
                     f"`sweeps report {config.name}` rebuilds its report; raise search.n_trials to extend it")
        return summary
    from .tracking import Tracker  # imports MLflow: not needed for a finished sweep

    # Optuna gives every study a MedianPruner unless told otherwise: pruning must be asked for.
    study.pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0) if prune else optuna.pruners.NopPruner()
    )
    use_wal(conn.tracking_uri)  # the study's file: search.make_storage
    tracker = Tracker(conn.tracking_uri, conn.artifact_root)
    parent = tracker.start_parent(
        config.name,
        flat_config=config.flat(),
        resolved_config=config.model_dump(mode="json"),
        config_yaml=config_yaml,
        run_id=study.user_attrs.get("mlflow_parent_run_id"),
    )
    study.set_user_attr("mlflow_parent_run_id", parent)
    study.set_user_attr("tracking_uri", redact(conn.tracking_uri))
    if "config_yaml" not in study.user_attrs:
        study.set_user_attr("config_yaml", config_yaml)

    started_here, driver = False, None
    with ProgressView(quiet=quiet) as view, _StopFlag() as stop:
        view.log(f"sweep {config.name}: {budget} trials; " + ", ".join(f"{k}={v}" for k, v in conn.describe().items()))
        if lease.taken_over is not None:
            view.log(f"sweep {config.name}: took over the lease of a driver that stopped heart-beating "
                     f"({lease.taken_over.describe()})")
        try:
            _recover(study, tracker, parent, view)
            started_here = _connect_ray(conn.address, quiet)
            driver = _Driver(config, study, tracker, parent, conn, view, stop, budget, config.resources.max_concurrent,
                             max_retries, trial_fn, lease)
            driver.loop()
        finally:
            lost = lease.lost
            if driver is not None:
                driver.shutdown(record=not lost)
            if not lost:
                counts = search.status_counts(study)
                interrupted = stop.requested or not _is_done(counts, budget)
                tracker.end_parent(
                    parent,
                    "KILLED" if interrupted else "FINISHED",
                    {f"trials_{k}": float(v) for k, v in counts.items()},
                )
                best = _best(study)
                view.log(
                    f"sweep {config.name}: {'interrupted' if interrupted else 'done'}; "
                    + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                    + f"; best {_describe_best(best, metrics_names)}"
                )
            if started_here:
                ray.shutdown()
    if lost:
        raise LeaseLostError(lease.lost_message())
    summary = SweepSummary(
        config.name, budget, counts, best, parent, interrupted, time.monotonic() - driver.started, conn,
        driver.launched, complete=_complete(study),
    )  # driver is set: any failure before the loop propagated from the `finally` above
    if stop.requested:
        raise SweepInterrupted(summary)
    if not interrupted:
        checkpoint.discard_sweep(conn.checkpoint_dir, config.name)
    if report and not interrupted:
        _report(config.name, conn, view)
    return summary


def _is_done(counts: Mapping[str, int], budget: int) -> bool:
    """Budget spent and no trial left RUNNING (by a driver that died)."""
    finished = sum(v for k, v in counts.items() if is_finished(k))
    return finished >= budget and not counts.get(TrialStatus.RUNNING)


def _complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _report(name: str, conn: Connections, view: ProgressView) -> None:
    """The end-of-sweep analysis; a sweep whose results cannot be analysed (too few converged
    trials, no measures) still succeeds, with the reason logged."""
    from .report import report_sweep

    try:
        done = report_sweep(name, tracking_uri=conn.tracking_uri, results_dir=conn.results_dir)
    except (ValueError, LookupError) as err:
        view.log(f"sweep {name}: no analysis report ({err})")
        return
    view.log(f"sweep {name}: analysis report {done.html} (also on the MLflow parent run)")


def _recover(study: optuna.Study, tracker: Tracker, parent: str, view: ProgressView) -> None:
    """Settle what a killed driver left: RUNNING trials and RUNNING child runs."""
    for trial in search.stale_trials(study):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            run_status, status, metrics = tracker.run_info(run_id)
            if is_finished(status):  # recorded in MLflow, the driver died before telling Optuna
                if run_status == "RUNNING":  # ... and before terminating the run (after its status tag)
                    tracker.end(run_id, status)
                search.tell(study, trial.number, status, metrics)
                view.log(f"trial {trial.number}: recovered as {status} from MLflow run {run_id}")
                continue
            tracker.end(run_id, TrialStatus.INTERRUPTED)
        requeued = search.interrupt(study, trial)
        view.log(f"trial {trial.number}: left running by a stopped driver; marked interrupted"
                 + (", point re-enqueued" if requeued else " (it had no point yet)"))
    for run_id in tracker.active_children(parent):
        tracker.end(run_id, TrialStatus.INTERRUPTED)


class _Driver:
    """The ask / launch / collect / record loop of one driver run (state of :func:`run_sweep`)."""

    def __init__(self, config, study, tracker, parent, conn, view, stop, budget, max_concurrent, max_retries, trial_fn,
                 lease):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.config, self.study, self.tracker, self.parent = config, study, tracker, parent
        self.conn, self.view, self.stop, self.budget, self.lease = conn, view, stop, budget, lease
        self.concurrency = _concurrency(config, max_concurrent)
        # The metric queue lives on the driver's node (a worker node may die mid-sweep) and is
        # restarted by Ray if it dies anyway; curve points in flight are then lost, not the sweep.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.queue = Queue(actor_options={"num_cpus": 0, "max_restarts": -1, "scheduling_strategy": here})
        cpus, gpus = config.resources.cpus_per_trial, config.resources.gpus_per_trial
        self.device = "cuda" if gpus > 0 else None
        # Retries are the driver's (a retried task re-runs only the members not recorded yet).
        self.task = ray.remote(population_task).options(
            num_cpus=cpus, num_gpus=gpus, num_returns="streaming", max_retries=0, retry_exceptions=False,
        )
        # A measure task is one member's work from its trained weights: Ray may simply re-run it.
        self.measure = ray.remote(measure_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries)
        self.measuring: dict[Any, _Member] = {}
        # Trained members waiting for a free slot: a task submitted beyond the slots would take
        # the CPU a population gives back while it waits on the metric queue (oversubscription).
        self.to_measure: deque[tuple[_Member, Any]] = deque()
        self.stops = None
        if not isinstance(study.pruner, optuna.pruners.NopPruner) and trial_fn is None:
            self.stops = ray.remote(StopBoard).options(num_cpus=0, max_restarts=-1, scheduling_strategy=here).remote()
        self.max_retries, self.trial_fn = max_retries, trial_fn
        self.population = self._population_setting(config, study, trial_fn)
        self.points = PointQueue(study, config, slots=self.concurrency)
        self.in_flight: dict[Any, _Task] = {}
        self.by_number: dict[int, _Member] = {}
        self.finished = len(search.finished_trials(study))
        self.counts = search.status_counts(study)
        self.durations: list[float] = []
        self.objective = list(config.objective.metrics)
        self.front = _best(study)  # then kept up to date by _tell
        self.best = _describe_best(self.front, self.objective)
        self.started = time.monotonic()
        self.launched = 0
        self._told_why: set[Any] = set()
        self.live = self._live_correlation() if config.measure else None
        self.writes = _Writes(conn.tracking_uri)
        self.starting: list[_Member] = []  # launched, run id not yet on the Optuna trial
        self.writing: dict[concurrent.futures.Future, tuple[_Member, Mapping[str, Any]]] = {}  # final records
        self.streaming: list[concurrent.futures.Future] = []  # curve points

    def _live_correlation(self) -> LiveCorrelation:
        """The live tau table on the parent run (:mod:`sweeps.live`); a resumed sweep's series
        starts from the trials it has recorded already."""
        from .queries import results

        def write(metrics: dict[str, float], step: int, figures: Path) -> None:
            self.tracker.log_metrics(self.parent, [(metrics, step, int(time.time() * 1000))])
            self.tracker.client.log_artifacts(self.parent, str(figures), artifact_path="live")

        history = None
        if self.finished:
            history = lambda: results(self.config.name, self.conn.tracking_uri)  # noqa: E731
        return LiveCorrelation(live_target(self.config.objective.metrics), list(self.config.search.space), write,
                               self.view.log, history=history)

    def _population_setting(self, config: Any, study: optuna.Study, trial_fn: TrialFn | None) -> int | str:
        setting = config.resources.population_size
        if setting == 1:
            return 1
        if trial_fn is not None:
            self.view.log("populations: one trial per task (a replacement trial function runs trials one by one)")
            return 1
        return setting

    # main loop
    def loop(self) -> None:
        """Until the budget is spent or a stop is requested: fill the free slots, wait, record.

        Finished members are collected, the free slots refilled, and only then recorded (MLflow
        artifacts and status, Optuna tell), so the cluster does not idle while the driver writes.
        Each round first checks that this driver still holds the sweep's lease
        (:class:`~sweeps.lease.LeaseLostError` otherwise, before anything is written).
        """
        import ray

        while True:
            self.lease.ensure()
            self._fill(unrecorded=len(self.writing))
            if not self.in_flight and not self.measuring and not self.to_measure and not self.writing:
                return
            refs = [*self.in_flight, *self.measuring]
            ready = []
            if refs:
                ready, rest = ray.wait(refs, num_returns=1, timeout=_POLL_SECONDS)
                if ready and rest:
                    ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            else:  # only final records in flight
                concurrent.futures.wait(self.writing, timeout=_POLL_SECONDS, return_when=concurrent.futures.FIRST_COMPLETED)
            self.lease.ensure()
            self._drain()
            done = [pair for ref in ready for pair in (self._collect(ref) if ref in self.in_flight else self._measured(ref))]
            self._fill(unrecorded=len(done) + len(self.writing))
            self._record(done)
            self._tell_written()
            if self.live is not None:
                self.live.poll()
            self.view.update(self._snapshot())
            if self.stop.requested:
                return

    def _members_in_flight(self) -> int:
        return sum(len(task.members) for task in self.in_flight.values()) + len(self.measuring) + len(self.to_measure)

    def _slots_used(self) -> int:
        return len(self.in_flight) + len(self.measuring)

    def _fill(self, unrecorded: int) -> None:
        """Launch populations while task slots are free and the budget has trials left. A measure
        task holds a slot too: members already trained are measured before new ones start."""
        while self.to_measure and self._slots_used() < self.concurrency:
            member, trained = self.to_measure.popleft()
            ref = self.measure.remote(trained, self.conn.tracking_uri, self.config.resources.cpus_per_trial, self.device)
            self.measuring[ref] = member
        groups: list[list[AskedTrial]] = []
        while not self.stop.requested and self._slots_used() + len(groups) < self.concurrency:
            left = self.budget - self.finished - unrecorded - self._members_in_flight() - sum(map(len, groups))
            can_ask = left - len(self.points.pending)
            if left <= 0:
                break
            size = population_size(self.population, left, self.concurrency - len(self.in_flight) - len(groups))
            group = self.points.take(size, can_ask)
            if not group:
                break
            if group[0].error is not None:
                self._finish_without_task(group[0])
                continue
            groups.append(group)
        if groups:
            self._launch(groups)

    def _launch(self, groups: list[list[AskedTrial]]) -> None:
        """Start one task per group; each member's child run is created by :class:`_Writes` (in
        the pool against a tracking server: the task does not wait for it)."""
        self.lease.ensure()
        for group in groups:
            if len(group) == 1 and self.population != 1 and group[0].key not in self._told_why:
                reason = self.points.stack_reason(group[0])
                if reason is not None:
                    self._told_why.add(group[0].key)
                    self.view.log(f"populations: one trial per task for this shape: {reason}")
            members = {}
            for index, asked in enumerate(group):
                number = asked.trial.number
                run = self.writes.submit(self.tracker.start_child, self.config.name, self.parent, number,
                                         asked.config.flat())
                members[index] = self.by_number[number] = _Member(
                    asked.trial, run, asked.config, RunningTrial(number, asked.point, time.monotonic()))
                self.starting.append(members[index])
                self.view.log(f"trial {number}: started {asked.point}")
            self._submit(members, self.max_retries)
            self.launched += len(group)
        self._note_started()

    def _note_started(self) -> None:
        """Put each created child run's id on its Optuna trial (``mlflow_run_id``, what
        :func:`_recover` follows), in the driver's thread; a failed creation raises here."""
        waiting = []
        for member in self.starting:
            if member.run.done():
                member.trial.set_user_attr("mlflow_run_id", member.run_id)
            else:
                waiting.append(member)
        self.starting = waiting

    def _submit(self, members: dict[int, _Member], retries_left: int) -> None:
        """Start one task for ``members`` (re-indexed 0..K-1 in the task)."""
        members = dict(enumerate(members.values()))
        gen = self.task.remote(
            self.trial_fn, [m.config for m in members.values()], [m.trial.number for m in members.values()],
            self.queue, self.conn.tracking_uri, self.config.resources.cpus_per_trial, self.device,
            len(members) > 1, self.stops, self.conn.checkpoint_dir and str(self.conn.checkpoint_dir),
        )
        self.in_flight[gen] = _Task(members, retries_left)

    def _finish_without_task(self, asked: AskedTrial) -> None:
        run_id = self.tracker.start_child(self.config.name, self.parent, asked.trial.number, asked.point)
        asked.trial.set_user_attr("mlflow_run_id", run_id)
        self.tracker.finish_child(run_id, TrialStatus.FAILED, {}, traceback=asked.error)
        self._tell(asked.trial.number, TrialStatus.FAILED, {}, asked.point)
        self.view.log(f"trial {asked.trial.number}: failed before start: {asked.error.strip().splitlines()[-1]}")

    def _drain(self) -> None:
        import ray

        try:
            size = self.queue.qsize()
            batch = self.queue.get_nowait_batch(size) if size else []
        except ray.exceptions.RayError as err:  # queue restarting after its node died
            self.view.log(f"metric queue unavailable ({type(err).__name__}); live curves resume when it is back")
            return
        self._check_streamed()
        for number, records in batch:
            member = self.by_number.get(number)
            if member is None:
                continue
            # a task that continued from a checkpoint sends the records so far again: keep each once
            records = [r for r in records if r[2] > member.streamed.get(r[0], -1)]
            for kind, _, step, _ in records:
                member.streamed[kind] = step
            points = [(mlflow_names(kind, m), step, ts) for kind, m, step, ts in records]
            self.streaming.append(self.writes.submit(lambda m, p: self.tracker.log_metrics(m.run_id, p), member, points))
            if records:
                member.view.latest, member.view.step = dict(records[-1][1]), records[-1][2]
            self._maybe_prune(member, [(m, step) for kind, m, step, _ in records if kind == "epoch"])

    def _maybe_prune(self, member: _Member, records: list[tuple[dict[str, float], int]]) -> None:
        """Report a member's new objective values from its epoch records (at the epochs of
        :func:`is_pruning_epoch`) and ask the pruner once per batch whether to stop it."""
        if isinstance(self.study.pruner, optuna.pruners.NopPruner) or member.pruned is not None:
            return
        objective = self.config.objective.metrics[0]
        reported = None
        for metrics, step in records:
            value = metrics.get(objective)
            if value is None or not math.isfinite(value) or step <= member.last_step:
                continue
            if "epoch" in metrics and not is_pruning_epoch(int(metrics["epoch"])):
                continue
            member.last_step = step
            member.trial.report(float(value), step)
            reported = (metrics, step, value)
        if reported is None or not member.trial.should_prune():
            return
        import ray

        metrics, step, value = reported
        member.pruned = dict(metrics)
        if self.stops is not None:  # the population stops this member after its epoch; the others go on
            self.stops.stop.remote(member.trial.number, f"pruned at step {step} ({objective}={value:.4g})")
            return
        gen = next(g for g, task in self.in_flight.items() if member in task.members.values())
        ray.cancel(gen, force=False)  # KeyboardInterrupt in the task: the worker (and its imports) survives

    def _collect(self, gen: Any) -> list[tuple[_Member, dict[str, Any]]]:
        """The next member record of a ready task, or what its end or its failure means for the
        members it had not reported: failed, pruned, or re-launched in a new task (lost worker).
        A trained member to measure goes on to a measure task (nothing to record yet)."""
        import ray

        task = self.in_flight[gen]
        try:
            ref = next(gen)
            record = ray.get(ref)
        except StopIteration:
            del self.in_flight[gen]
            return self._settle(task, TrialStatus.FAILED, "the task ended without a result for this trial")
        except ray.exceptions.TaskCancelledError:
            del self.in_flight[gen]
            return [(m, {"status": TrialStatus.PRUNED, "metrics": m.pruned or {}, "artifacts": {}, "traceback": None})
                    for m in task.members.values()]
        except ray.exceptions.RayError as err:  # the worker or its node died
            del self.in_flight[gen]
            if task.retries_left > 0:
                numbers = [m.trial.number for m in task.members.values()]
                self.view.log(f"trials {numbers}: task lost ({type(err).__name__}); re-launched "
                              f"({task.retries_left - 1} retries left)")
                self._submit(task.members, task.retries_left - 1)
                return []
            return self._settle(task, TrialStatus.FAILED, f"{type(err).__name__}: {err}")
        member = task.members.pop(record["index"])
        if "trained" in record:
            self.to_measure.append((member, ref))  # launched by _fill when a slot is free
            return []
        return [(member, record)]

    def _measured(self, ref: Any) -> list[tuple[_Member, dict[str, Any]]]:
        """The record of a finished measure task (``failed`` when its retries ran out)."""
        import ray

        member = self.measuring.pop(ref)
        try:
            return [(member, ray.get(ref))]
        except ray.exceptions.RayError as err:
            return [(member, {"status": TrialStatus.FAILED, "metrics": {}, "artifacts": {},
                              "traceback": f"measures lost: {type(err).__name__}: {err}"})]

    @staticmethod
    def _settle(task: _Task, status: TrialStatus, why: str) -> list[tuple[_Member, dict[str, Any]]]:
        return [(m, {"status": status, "metrics": {}, "artifacts": {}, "traceback": why}) for m in task.members.values()]

    def _record(self, done: list[tuple[_Member, Mapping[str, Any]]]) -> None:
        """Hand the finished members' final MLflow records to :class:`_Writes`; each is told to
        the study by :meth:`_tell_written` once written (a trial told to Optuna always has its
        final MLflow record: the rule :func:`_recover` relies on)."""
        for member, result in done:
            self.lease.ensure()
            self.writing[self.writes.submit(self._finish_run, member, result)] = (member, result)

    def _tell_written(self, wait: bool = False) -> None:
        """Tell the study the members whose final records are written (all of them with
        ``wait``); a failed write raises here."""
        if wait:
            concurrent.futures.wait(self.writing)
        self._note_started()
        for future in [f for f in self.writing if f.done()]:
            member, result = self.writing.pop(future)
            future.result()
            number, status, metrics = member.trial.number, result["status"], result["metrics"]
            self._tell(number, status, metrics, member.view.point)
            checkpoint.discard(self.conn.checkpoint_dir, member.config)  # recorded: never run again
            if self.live is not None:
                self.live.add(number, status, member.view.point, metrics)
            self.by_number.pop(number, None)
            self.durations.append(time.monotonic() - member.view.started)
            tail = result["traceback"].strip().splitlines()[-1] if result["traceback"] else ""
            shown = " ".join(f"{m}={metrics[m]:.4g}" for m in self.config.objective.metrics if m in metrics)
            self.view.log(f"trial {number}: {status} {shown} {tail}".rstrip())

    def _check_streamed(self, wait: bool = False) -> None:
        """Drop the written curve points (all of them with ``wait``); a failed write raises here."""
        if wait:
            concurrent.futures.wait(self.streaming)
        for future in [f for f in self.streaming if f.done()]:
            self.streaming.remove(future)
            future.result()

    def _finish_run(self, member: _Member, result: Mapping[str, Any]) -> None:
        metrics = result["metrics"]
        self.tracker.finish_child(
            member.run_id, result["status"], metrics,
            step=int(metrics.get("steps", member.view.step) or 0),
            artifacts=result["artifacts"], traceback=result["traceback"],
            tags={f"sweeps.{k}": str(result[k]) for k in ("node_id", "node_ip") if result.get(k)},
            before_final=self.lease.ensure,
        )

    def _tell(self, number: int, status: str, metrics: Mapping[str, float], params: Mapping[str, Any]) -> None:
        try:
            told = search.tell(self.study, number, status, metrics, self.objective)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another driver finished this trial: it took the sweep over while this one was
            # paused between its lease check and this write. Say so (LeaseLostError), not this.
            self.lease.ensure()
            raise
        self.finished += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        if told.state == optuna.trial.TrialState.COMPLETE:
            trial = {"number": number, "values": told.values, "params": dict(params)}
            self.front = _with_completed(self.front, trial, self.study.directions)
            self.best = _describe_best(self.front, self.objective)

    def _snapshot(self) -> Snapshot:
        mean = sum(self.durations) / len(self.durations) if self.durations else None
        running = [m.view for task in self.in_flight.values() for m in task.members.values()]
        running += [m.view for m in self.measuring.values()] + [m.view for m, _ in self.to_measure]
        return Snapshot(
            self.config.name, self.budget, dict(self.counts), running,
            self.best, time.monotonic() - self.started, self.concurrency, mean,
        )

    def shutdown(self, record: bool = True) -> None:
        """Cancel the tasks still running and, if ``record``, record their members and the asked
        but unlaunched trials interrupted (points re-enqueued); stop the metric queue.

        ``record=False`` when the lease was lost: the driver that took it over has already
        recovered these trials, and this one must not write."""
        import ray

        if record:  # finish the writes in flight: what is written is told, what failed is logged
            for flush in (self._tell_written, self._check_streamed):
                try:
                    flush(wait=True)
                except Exception as err:  # the trial stays RUNNING in the study: the next driver settles it
                    self.view.log(f"a write to MLflow failed while stopping: {type(err).__name__}: {err}")
        self.writes.close(cancel=not record)
        stopped = [(gen, list(task.members.values())) for gen, task in self.in_flight.items()]
        stopped += [(ref, [member]) for ref, member in self.measuring.items()]
        stopped += [(None, [member]) for member, _ in self.to_measure]
        for ref, members in stopped:
            if ref is not None:
                ray.cancel(ref, force=True)
            if record:
                for member in members:
                    if member.run.done() and member.run.exception() is None:  # its run was created
                        self.tracker.end(member.run_id, TrialStatus.INTERRUPTED)
                    search.interrupt(self.study, member.trial.number)
                    self.view.log(f"trial {member.trial.number}: interrupted, point re-enqueued")
        if record:
            for asked in self.points.pending:
                search.interrupt(self.study, asked.trial.number)
        self.in_flight.clear()
        self.measuring.clear()
        self.to_measure.clear()
        self.points.pending.clear()
        if record and self.live is not None:
            self.live.close()  # the last update, with every trial recorded
        try:
            self.queue.shutdown()
        except Exception:  # the queue actor may already be gone with its cluster
            pass


def resume_sweep(name: str, **kwargs: Any) -> SweepSummary:
    """Continue the sweep ``name`` from its study, with the config kept there (no file needed).

    Keyword arguments are those of :func:`run_sweep` (``storage``/``results_dir`` must point to
    where the sweep lives).
    """
    from .config import load_config

    conn = resolve(results_dir=kwargs.get("results_dir"), tracking_uri=kwargs.get("tracking_uri"), storage=kwargs.get("storage"))
    config = load_config(search.stored_config(name, conn.storage))
    return run_sweep(config, resume=True, **kwargs)
