"""Run a sweep: the driver asks Optuna for points, Ray tasks train and measure, the driver records.

Roles:

* **driver** (this module, one process per sweep, holding the sweep's lease, :mod:`sweeps.service.lease`):
  opens the study (:mod:`sweeps.service.search`) and the MLflow parent run (:mod:`sweeps.service.tracking`), asks
  points and groups those of one shape into populations (:mod:`sweeps.service.batching`), launches one
  Ray task per population, streams the trials' metrics into their MLflow child runs, records
  and tells each trial the moment its task reports it, shows progress.
* **Ray task** (:func:`sweeps.service.worker.population_task`): trains the population's models as one
  stack (:mod:`sweeps.trial.population`; a population of one is a single trial) and yields each
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
* A store unreachable (the Optuna storage's or the MLflow store's database restarting or
  failing over, an ``mlflow server`` restarted): the trials go on training, the driver holds
  their results and tries each write again with backoff (:mod:`sweeps.service.outages`), writing each
  once when the store is back; the lease is renewed then (or, if another driver took it
  meanwhile, this one stops without writing). Unreachable past ``SWEEPS_STORE_RETRY_SECONDS``
  (600 s): the driver cancels its running tasks (they keep their checkpoints) and raises
  :class:`~sweeps.service.outages.StoreUnavailableError`; the next ``sweeps resume`` settles the
  trials left RUNNING as after a killed driver.
* Whichever way a trial is run again (a re-launch, the re-run of an interrupted point), it
  continues from its checkpoint (:mod:`sweeps.trial.checkpoint`: found from the trial's config, in the
  folder passed to the tasks); the driver removes a trial's checkpoint once the trial is recorded
  (:class:`~sweeps.trial.checkpoint.Cleaner`) and the sweep's folder once the sweep completes.

Pruning (``prune=True``, off by default) reports the objective metric streamed during
training to Optuna's ``MedianPruner`` (at the epochs of :func:`is_pruning_epoch`) and stops the
trials it prunes (status ``pruned``, no landscape measures); a pruned member leaves its
population, whose other members train on. It is refused for grids (the analysis needs every point of the factorial)
and for objectives that are not reported during training (landscape measures are computed
after convergence: pruning would drop the very numbers the study is about).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from .service import search
from .service.batching import population_size
from .service.book import StudyBook, best_trials, describe_best, is_pruning_epoch
from .service.cluster import connect_ray, task_slots
from .service.connections import Connections, check_reachable, redact, resolve, use_wal
from .service.lease import DriverLease, LeaseLostError
from .service.live import LiveCorrelation, live_target
from .service.loop import LoopSettings, SweepLoop
from .service.outages import StoreGuard, StoreUnavailableError, short_mlflow_http_retries, store_retry_seconds
from .service.progress import ProgressView
from .service.worker import TrialFn
from .spec.status import TrialStatus, is_finished
from .trial import checkpoint

if TYPE_CHECKING:
    from .service.tracking import Tracker


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
        config: a :class:`~sweeps.spec.config.SweepConfig`, a YAML path or a dict.
        name: sweep name (default ``config.name``): the Optuna study and MLflow experiment.
        address: Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:10001``); default: an
            already initialized Ray, else ``$RAY_ADDRESS``, else a local Ray sized to this machine.
        tracking_uri, storage, results_dir: see :mod:`sweeps.service.connections`.
        max_concurrent: trials in flight (default ``resources.max_concurrent``, else as many as
            the cluster's CPUs/GPUs fit).
        quiet: plain log lines instead of the live view.
        resume: the study must exist already (``sweeps resume``).
        max_retries: re-runs of a trial whose worker or node died (application errors are not
            retried: they are recorded as ``failed``).
        prune: stop unpromising trials early (see the module docstring for the rules).
        config_yaml: the YAML text to keep with the sweep (default: the resolved config as YAML).
        trial_fn: replaces :func:`sweeps.trial.run.run_trial` (same signature); for benchmarks and tests.
        report: when the sweep completes, run the analysis (:func:`sweeps.posthoc.report.report_sweep`):
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
        StoreUnavailableError: the Optuna storage or the MLflow store stayed unreachable past
            ``SWEEPS_STORE_RETRY_SECONDS`` (shorter outages are ridden out); the running trials
            were cancelled (they keep their checkpoints) and :func:`resume_sweep` continues.
    """
    import yaml

    from .spec.config import SweepConfig, load_config

    if not isinstance(config, SweepConfig):
        if isinstance(config, (str, Path)) and config_yaml is None:
            config_yaml = Path(config).read_text()
        config = load_config(config)
    from .service.plan import preflight, with_launch_options

    if name is not None and name != config.name:
        config = config.with_point({"name": name})
    search.validate_search(config)
    if prune:
        _check_pruning(config)
    resolved = config.model_dump(mode="json")
    config = with_launch_options(config, max_concurrent=max_concurrent, max_retries=max_retries)
    conn = resolve(results_dir=results_dir, tracking_uri=tracking_uri, storage=storage, address=address, create=False)
    check_reachable(conn)
    preflight(config, conn, build=trial_fn is None)  # paths, dataset, model: refused before anything is written
    conn.results_dir.mkdir(parents=True, exist_ok=True)
    with DriverLease(conn.storage, config.name) as lease:
        return _drive(
            config,
            conn,
            lease,
            resume=resume,
            quiet=quiet,
            max_retries=max_retries,
            prune=prune,
            config_yaml=config_yaml or yaml.safe_dump(resolved, sort_keys=False),
            trial_fn=trial_fn,
            report=report,
        )


def _drive(
    config: Any,
    conn: Connections,
    lease: DriverLease,
    *,
    resume: bool,
    quiet: bool,
    max_retries: int,
    prune: bool,
    config_yaml: str,
    trial_fn: TrialFn | None,
    report: bool,
) -> SweepSummary:
    """The body of :func:`run_sweep` while this driver holds the sweep's lease."""
    import ray

    limit = store_retry_seconds()
    study_store = StoreGuard(f"Optuna storage {redact(conn.storage)}", limit)
    mlflow_store = StoreGuard(f"MLflow tracking store {redact(conn.tracking_uri)}", limit)
    study = search.open_study(config, conn.storage, resume=resume, retry=study_store.call)
    budget = search.n_trials(config)
    if config.search.sampler == "grid":
        budget = min(budget, search.grid_size(config))
    study.set_user_attr("budget", budget)
    metrics_names = list(config.objective.metrics)
    counts = search.status_counts(study)
    if _is_done(counts, budget):
        summary = SweepSummary(
            config.name,
            budget,
            counts,
            best_trials(study),
            study.user_attrs.get("mlflow_parent_run_id", ""),
            False,
            0.0,
            conn,
            complete=_complete(study),
            already_finished=True,
        )
        with ProgressView(quiet=True) as view:
            view.log(
                f"sweep {config.name}: already finished ({summary.finished}/{budget} trials); nothing to run. "
                f"`sweeps report {config.name}` rebuilds its report; raise search.n_trials to extend it"
            )
        return summary
    from .service.tracking import Tracker  # imports MLflow: not needed for a finished sweep

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

    started_here, driver, down = False, None, None
    with ProgressView(quiet=quiet) as view, _StopFlag() as stop, short_mlflow_http_retries():
        for guard in (study_store, mlflow_store):
            guard.log, guard.stop = view.log, stop
        view.log(f"sweep {config.name}: {budget} trials; " + ", ".join(f"{k}={v}" for k, v in conn.describe().items()))
        if lease.taken_over is not None:
            view.log(
                f"sweep {config.name}: took over the lease of a driver that stopped heart-beating "
                f"({lease.taken_over.describe()})"
            )
        try:
            _recover(study, tracker, parent, view)
            started_here = connect_ray(conn.address, quiet)
            driver = _build_loop(
                config,
                study,
                tracker,
                parent,
                conn,
                view,
                stop,
                _GuardedLease(lease, study_store),
                mlflow_store,
                budget=budget,
                max_retries=max_retries,
                prune=prune,
                trial_fn=trial_fn,
            )
            driver.run()
        except StoreUnavailableError as err:
            down, err.sweep = err, config.name
            study_store.gave_up = mlflow_store.gave_up = True  # stop now: no more waiting on either
            raise
        finally:
            lost = lease.lost
            if driver is not None:
                driver.shutdown(record=not lost and down is None)
            if down is not None:
                view.log(
                    f"sweep {config.name}: stopped, {down}. Running trials were cancelled (they keep their "
                    f"checkpoints); `sweeps resume {config.name}` continues once the store is back"
                )
            elif not lost:
                counts = search.status_counts(study)
                interrupted = stop.requested or not _is_done(counts, budget)
                mlflow_store.call(
                    tracker.end_parent,
                    parent,
                    "KILLED" if interrupted else "FINISHED",
                    {f"trials_{k}": float(v) for k, v in counts.items()},
                )
                best = best_trials(study)
                view.log(
                    f"sweep {config.name}: {'interrupted' if interrupted else 'done'}; "
                    + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                    + f"; best {describe_best(best, metrics_names)}"
                )
            if started_here:
                ray.shutdown()
    if lost:
        raise LeaseLostError(lease.lost_message())
    summary = SweepSummary(
        config.name,
        budget,
        counts,
        best,
        parent,
        interrupted,
        time.monotonic() - driver.started,
        conn,
        driver.launched,
        complete=_complete(study),
    )  # driver is set: any failure before the loop propagated from the `finally` above
    if stop.requested:
        raise SweepInterrupted(summary)
    if not interrupted:
        checkpoint.discard_sweep(conn.checkpoint_dir, config.name)
    if report and not interrupted:
        _report(config.name, conn, view)
    return summary


@dataclass(frozen=True)
class _GuardedLease:
    """The lease check, riding out an outage of the database that holds the lease: renewed once
    it is back (still this driver's) or :class:`LeaseLostError` (another driver took it)."""

    lease: DriverLease
    store: StoreGuard

    def ensure(self) -> None:
        self.store.call(self.lease.ensure)


def _build_loop(
    config: Any,
    study: optuna.Study,
    tracker: Tracker,
    parent: str,
    conn: Connections,
    view: ProgressView,
    stop: _StopFlag,
    lease: _GuardedLease,
    mlflow_store: StoreGuard,
    *,
    budget: int,
    max_retries: int,
    prune: bool,
    trial_fn: TrialFn | None,
) -> SweepLoop:
    """The driver's loop (:mod:`sweeps.service.loop`) over this sweep's Ray, MLflow and Optuna parts."""
    from .service.executor import RayExecutor
    from .service.recorder import MlflowRecorder

    concurrency = task_slots(config, config.resources.max_concurrent)
    population = config.resources.population_size
    if population != 1 and trial_fn is not None:
        view.log("populations: one trial per task (a replacement trial function runs trials one by one)")
        population = 1
    book = StudyBook(study, config, concurrency, on_conflict=lease.ensure)
    recorder = MlflowRecorder(tracker, config.name, parent, before_final=lease.ensure, retry=mlflow_store.call)
    executor = RayExecutor(
        trial_fn,
        conn.tracking_uri,
        config.resources.cpus_per_trial,
        config.resources.gpus_per_trial,
        max_retries,
        prune,
        view.log,
        checkpoint_dir=str(conn.checkpoint_dir) if conn.checkpoint_dir else None,
    )
    observers: list[Any] = [checkpoint.Cleaner(conn.checkpoint_dir, config)]  # a recorded trial's checkpoint goes
    if config.measure:
        observers.append(_live_correlation(config, conn, tracker, parent, view, resumed=book.finished > 0))
    settings = LoopSettings(
        config.name, budget, concurrency, max_retries, population, list(config.objective.metrics), prune
    )
    return SweepLoop(
        settings,
        executor,
        recorder,
        book,
        lease=lease,
        stop=stop,
        view=view,
        observers=observers,
        population_size=population_size,
        is_pruning_epoch=is_pruning_epoch,
    )


def _live_correlation(
    config: Any, conn: Connections, tracker: Tracker, parent: str, view: ProgressView, resumed: bool
) -> LiveCorrelation:
    """The live tau table on the parent run (:mod:`sweeps.service.live`); a resumed sweep's series
    starts from the trials it has recorded already."""
    from .posthoc.queries import results

    def write(metrics: dict[str, float], step: int, figures: Path) -> None:
        tracker.log_metrics(parent, [(metrics, step, int(time.time() * 1000))])
        tracker.client.log_artifacts(parent, str(figures), artifact_path="live")

    history = (lambda: results(config.name, conn.tracking_uri)) if resumed else None
    return LiveCorrelation(
        live_target(config.objective.metrics), list(config.search.space), write, view.log, history=history
    )


def _is_done(counts: Mapping[str, int], budget: int) -> bool:
    """Budget spent and no trial left RUNNING (by a driver that died)."""
    finished = sum(v for k, v in counts.items() if is_finished(k))
    return finished >= budget and not counts.get(TrialStatus.RUNNING)


def _complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _report(name: str, conn: Connections, view: ProgressView) -> None:
    """The end-of-sweep analysis; a sweep whose results cannot be analysed (too few converged
    trials, no measures) still succeeds, with the reason logged."""
    from .posthoc.report import report_sweep

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
            if status is not None and is_finished(status):  # recorded in MLflow, the driver died before telling Optuna
                if run_status == "RUNNING":  # ... and before terminating the run (after its status tag)
                    tracker.end(run_id, status)
                search.tell(study, trial.number, status, metrics)
                view.log(f"trial {trial.number}: recovered as {status} from MLflow run {run_id}")
                continue
            tracker.end(run_id, TrialStatus.INTERRUPTED)
        requeued = search.interrupt(study, trial)
        view.log(
            f"trial {trial.number}: left running by a stopped driver; marked interrupted"
            + (", point re-enqueued" if requeued else " (it had no point yet)")
        )
    for run_id in tracker.active_children(parent):
        tracker.end(run_id, TrialStatus.INTERRUPTED)


def resume_sweep(name: str, **kwargs: Any) -> SweepSummary:
    """Continue the sweep ``name`` from its study, with the config kept there (no file needed).

    Keyword arguments are those of :func:`run_sweep` (``storage``/``results_dir`` must point to
    where the sweep lives).
    """
    from .spec.config import load_config

    conn = resolve(
        results_dir=kwargs.get("results_dir"), tracking_uri=kwargs.get("tracking_uri"), storage=kwargs.get("storage")
    )
    config = load_config(search.stored_config(name, conn.storage))
    return run_sweep(config, resume=True, **kwargs)
