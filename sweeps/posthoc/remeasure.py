"""``sweeps measure``: landscape measures added to the finished trials of a sweep, from their stored weights.

For every trial of the sweep that the sweep itself measured or would have measured (status
``converged`` or ``not_converged``, :data:`sweeps.spec.status.MEASURED`; not ``diverged``, ``pruned``,
``failed``, nor unfinished ones) :func:`measure_sweep` reads the trial's final weights
(``model.pt``) and initialization (``init_state.pt``) from its MLflow run's artifacts, rebuilds
its data and model from the trial's config (the sweep's stored config with the trial's point
set), and computes the named registry measures in a Ray task (:func:`measure_stored`) on the
same batches a trial measures (``measure_subset`` samples of the training set, seeded by the
trial's seed), with the trial's seed and its ``measure_options`` (``options`` override them).
Each value and its ``<name>_seconds`` is logged to the trial's own MLflow run (no run is
created), so :func:`sweeps.results` shows them; afterwards the parent run's live correlation
(:mod:`sweeps.service.live`) and the analysis report (:func:`sweeps.posthoc.report.report_sweep`) are brought
up to date.

Rules:

* **Idempotent**: a trial that has every key of the requested measures is skipped unless
  ``force``; a forced value is logged at the same step as the old one, later, so it becomes the
  run's latest value.
* **Resumable**: each trial's values are logged as soon as its task ends; interrupted and run
  again, the trials already measured are skipped.
* **One driver at a time**: it holds the sweep's lease (:mod:`sweeps.service.lease`) while it runs. A
  sweep that a ``sweeps run``/``resume`` driver is running is *refused* (``LeaseHeldError``,
  exit 2), and a ``sweeps run``/``resume`` started meanwhile is refused the same way. A sweep
  that was interrupted (no driver) is measured on the trials it has finished.
"""

from __future__ import annotations

import io
import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..service.tracking import INIT_FILE, MODEL_FILE, artifact_bytes
from ..spec.errors import ConfigError, UsageError
from ..spec.status import MEASURED


@dataclass
class MeasureSummary:
    """What :func:`measure_sweep` returns.

    Attributes:
        name: the sweep.
        metrics: the measures asked for.
        measured: trial numbers measured by this call.
        skipped: trial numbers that had every requested key already (not ``force``).
        failed: trial number -> one line on why it could not be measured.
        parent_run_id: the sweep's MLflow parent run.
        report: the report's HTML file, when it was rebuilt.
        pairs: the seed pairs' barriers (a DataFrame, :mod:`sweeps.posthoc.connectivity`) when
            ``seed_barrier`` was asked for, else ``None``.
    """

    name: str
    metrics: list[str]
    measured: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    parent_run_id: str = ""
    report: Path | None = None
    pairs: Any = None


def parse_measure_options(overrides: Sequence[str], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["measure_options.hessian_trace.n_queries=20"]`` -> ``{"hessian_trace": {"n_queries": 20}}``
    (values parsed as YAML). Only ``measure_options.METRIC.OPTION`` keys of a metric in
    ``metrics`` are accepted; anything else is a :class:`~sweeps.spec.errors.ConfigError` naming it."""
    from ..spec.config_text import parse_override

    options: dict[str, dict[str, Any]] = {}
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "measure_options" or parts[1] not in metrics:
            raise ConfigError(
                f"--set {key}: sweeps measure takes only measure_options.METRIC.OPTION=VALUE for a METRIC given "
                f"with --metric ({', '.join(metrics)})"
            )
        options.setdefault(parts[1], {})[parts[2]] = value
    return options


def check_metrics(metrics: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """The requested measures, checked against the registry (:data:`landscape.metrics.METRICS`)
    with their options; a :class:`~sweeps.spec.errors.ConfigError` names the flag and the fix."""
    from landscape.metrics import METRICS, check_request

    names = list(metrics)
    if not names:
        raise ConfigError("--metric: give at least one measure, e.g. --metric path_norm")
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ConfigError(
            f"--metric: unknown measure(s) {unknown}; registered measures are {', '.join(sorted(METRICS))}"
        )
    for name, opts in (options or {}).items():
        try:
            check_request(names, {name: dict(opts)})
        except (KeyError, TypeError, ValueError) as err:
            text = str(err.args[0] if err.args else err)
            raise ConfigError(f"measure_options.{name}: {text.split(': ', 1)[-1]} (got {dict(opts)})") from None
    return list(dict.fromkeys(names))


def measure_stored(config: Any, model_bytes: bytes, init_bytes: bytes | None, device: str | None = None) -> dict:
    """Body of the Ray task: the measures ``config.measure`` (options ``config.measure_options``) of
    the model of ``config`` with the weights ``model_bytes`` (a ``torch.save``-d state dict) and
    the initialization ``init_bytes`` (or ``None``), as :func:`sweeps.trial.run.run_trial` computes them
    after training: same batches, loss, seed. Returns ``{key: float}`` with the ``_seconds`` keys.
    ``device`` defaults to CUDA when available; on CPU ``resources.cpus_per_trial`` torch threads."""
    import torch

    from landscape.metrics import measure

    from ..trial.data import load_dataset
    from ..trial.models import build_model
    from ..trial.run import measure_batches
    from ..trial.train import LOSSES

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(max(1, int(config.resources.cpus_per_trial)))
    data = load_dataset(config.dataset).to(device)
    model = build_model(config.model, data.input_shape, data.num_classes, seed=config.seed)
    model.load_state_dict(torch.load(io.BytesIO(model_bytes), map_location="cpu"))
    init = None
    if init_bytes is not None:
        init = {k: v.to(device) for k, v in torch.load(io.BytesIO(init_bytes), map_location="cpu").items()}
    return measure(
        model.to(device),
        LOSSES[config.train.loss],
        measure_batches(data, config),
        config.measure,
        seed=config.seed,
        options=config.measure_options,
        init_state=init,
    )


def trial_config(base: Any, point: Mapping[str, Any], metrics: Sequence[str], options: Mapping[str, Any]) -> Any:
    """The config a trial at ``point`` ran with, measuring ``metrics``: the trial's own
    ``measure_options`` of those metrics, overridden by ``options``."""
    config = base.with_point(dict(point))
    merged = {m: {**config.measure_options.get(m, {}), **options.get(m, {})} for m in metrics}
    return config.with_point({"measure": list(metrics), "measure_options": {m: o for m, o in merged.items() if o}})


def _parent_run(name: str, storage: str) -> str:
    import optuna

    from ..service.search import make_storage

    return str(
        optuna.load_study(study_name=name, storage=make_storage(storage)).user_attrs.get("mlflow_parent_run_id", "")
    )


def _needs_init(metrics: Sequence[str]) -> bool:
    from landscape.metrics import METRICS

    return any("init_state" in METRICS[m].needs for m in metrics)


def _load_sweep(name: str, storage: str) -> Any:
    from ..service.connections import redact
    from ..service.search import StudyConflictError, stored_config
    from ..spec.config import load_config

    try:
        return load_config(stored_config(name, storage))
    except StudyConflictError:
        raise UsageError(
            f"NAME: no sweep named {name!r} in {redact(storage)}; see `sweeps list`, or pass --storage / "
            "--results-dir where the sweep lives"
        ) from None


def measure_sweep(
    name: str,
    metrics: Sequence[str],
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    force: bool = False,
    address: str | None = None,
    max_concurrent: int | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    results_dir: str | Path | None = None,
    report: bool = True,
    log: Callable[[str], None] = print,
) -> MeasureSummary:
    """Compute ``metrics`` for every trial of sweep ``name`` that the sweep measures (``converged``
    and ``not_converged``, :data:`sweeps.spec.status.MEASURED`; see the module docstring).

    Args:
        name: the sweep (Optuna study and MLflow experiment).
        metrics: registered measure names (:data:`landscape.metrics.METRICS`).
        options: ``{metric: {option: value}}``, over the trials' own ``measure_options``.
        force: measure trials that have the measures already (their values are replaced).
        address, max_concurrent: the Ray cluster and tasks in flight, as for :func:`sweeps.run_sweep`
            (default: an initialized Ray, else a local one; as many tasks as the cluster fits).
        tracking_uri, storage, results_dir: where the sweep lives (:mod:`sweeps.service.connections`).
        report: rebuild the analysis report afterwards (``<results dir>/reports/<name>`` and the
            parent run's ``analysis/``).
        log: one-line progress messages.

    Raises:
        ConfigError: an unknown measure or option. UsageError: no such sweep.
        ConnectionError: a store that cannot be reached.
        LeaseHeldError: a driver is running the sweep (nothing was written).
    """
    from ..service.connections import check_reachable, resolve
    from ..service.lease import DriverLease
    from .connectivity import PAIRWISE, check_options, measure_pairs

    chosen = {m: dict(o) for m, o in (options or {}).items()}
    pairwise = PAIRWISE in metrics
    pair_options = check_options(chosen.pop(PAIRWISE, {}))
    metrics = [m for m in metrics if m != PAIRWISE]
    if metrics or not pairwise:
        metrics = check_metrics(metrics, chosen)
    conn = resolve(results_dir=results_dir, tracking_uri=tracking_uri, storage=storage, address=address, create=False)
    check_reachable(conn)
    base = _load_sweep(name, conn.storage)
    with DriverLease(conn.storage, name) as lease:
        if metrics:
            summary = _measure_trials(name, base, metrics, chosen, force, conn, lease, max_concurrent, log)
        else:
            summary = MeasureSummary(name, [], parent_run_id=_parent_run(name, conn.storage))
        if pairwise:
            lease.ensure()
            summary.pairs = measure_pairs(name, base, conn, summary.parent_run_id, pair_options, log)
        if summary.measured:
            _refresh_live(name, base, conn, summary.parent_run_id, log)
        if report and (summary.measured or summary.pairs is not None):  # the report states the barriers too
            summary.report = _report(name, conn, log)
    return summary


def _measure_trials(
    name: str,
    base: Any,
    metrics: list[str],
    options: dict[str, dict[str, Any]],
    force: bool,
    conn: Any,
    lease: Any,
    max_concurrent: int | None,
    log: Callable[[str], None],
) -> MeasureSummary:
    """The trials to measure, measured in Ray tasks, each logged to its run as its task ends."""
    import optuna
    import ray
    from mlflow import MlflowClient

    from landscape.metrics import result_keys

    from ..service.cluster import connect_ray, task_slots
    from ..service.search import make_storage
    from .queries import results

    study = optuna.load_study(study_name=name, storage=make_storage(conn.storage))
    points = {t.number: dict(t.params) for t in study.get_trials(deepcopy=False)}
    summary = MeasureSummary(name, metrics, parent_run_id=str(study.user_attrs.get("mlflow_parent_run_id", "")))
    frame = results(name, conn.tracking_uri)
    keys = list(result_keys(metrics))
    todo = []
    for row in frame[frame["status"].isin(MEASURED)].to_dict("records"):
        number = int(row["trial_number"])
        if not force and all(k in row and row[k] is not None and not _isnan(row[k]) for k in keys):
            summary.skipped.append(number)
        else:
            todo.append(row)
    log(
        f"sweep {name}: {len(todo)} trial(s) to measure with {', '.join(metrics)}"
        + (f"; {len(summary.skipped)} have them already (--force measures them again)" if summary.skipped else "")
    )
    if not todo:
        return summary
    client = MlflowClient(tracking_uri=conn.tracking_uri)
    started_here = connect_ray(conn.address, quiet=True)
    try:
        slots = task_slots(base, max_concurrent)
        task = ray.remote(measure_stored).options(
            num_cpus=base.resources.cpus_per_trial, num_gpus=base.resources.gpus_per_trial
        )
        pending: dict[Any, dict[str, Any]] = {}
        queue = list(todo)
        try:
            while queue or pending:
                while queue and len(pending) < slots:
                    row = queue.pop(0)
                    ref = _submit(task, client, base, row, points, metrics, options, summary, log)
                    if ref is not None:
                        pending[ref] = row
                if not pending:
                    continue
                [done], _ = ray.wait(list(pending), num_returns=1)
                row = pending.pop(done)
                number = int(row["trial_number"])
                try:
                    values = ray.get(done)
                except Exception as err:  # the measure raised in the task: this trial fails, the rest go on
                    summary.failed[number] = _last_line(err)
                    log(f"trial {number}: not measured: {summary.failed[number]}")
                    continue
                lease.ensure()
                _log_values(client, row, values, force)
                summary.measured.append(number)
                log(f"trial {number}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k in keys))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()
    return summary


def _isnan(value: Any) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _submit(
    task: Any,
    client: Any,
    base: Any,
    row: Mapping[str, Any],
    points: Mapping[int, Mapping[str, Any]],
    metrics: list[str],
    options: Mapping[str, Any],
    summary: MeasureSummary,
    log: Callable[[str], None],
) -> Any | None:
    """Launch the measure task of one trial; ``None`` (the trial recorded failed) when its
    weights or config cannot be had."""
    number = int(row["trial_number"])
    try:
        config = trial_config(base, points.get(number, {}), metrics, options)
        model_bytes = artifact_bytes(client, str(row["run_id"]), MODEL_FILE)
        init_bytes = artifact_bytes(client, str(row["run_id"]), INIT_FILE)
        if model_bytes is None:
            raise FileNotFoundError(f"its run {row['run_id']} has no {MODEL_FILE} artifact")
        if init_bytes is None and _needs_init(metrics):
            raise FileNotFoundError(f"its run {row['run_id']} has no {INIT_FILE}, which {metrics} need")
    except Exception as err:
        summary.failed[number] = _last_line(err)
        log(f"trial {number}: not measured: {summary.failed[number]}")
        return None
    return task.remote(config, model_bytes, init_bytes)


def _log_values(client: Any, row: Mapping[str, Any], values: Mapping[str, float], force: bool) -> None:
    """Log a trial's new values on its run: at the step of its final metrics (``steps``) or, for a
    key logged before at a later step (``force``), at that step, so the new value is the latest."""
    from mlflow.entities import Metric

    run_id = str(row["run_id"])
    base_step = 0 if _isnan(row.get("steps", float("nan"))) else int(row.get("steps") or 0)
    now = int(time.time() * 1000)
    entries = []
    for key, value in values.items():
        step = base_step
        if force and key in row and not _isnan(row[key]):
            step = max([step, *(m.step for m in client.get_metric_history(run_id, key))])
        entries.append(Metric(key, float(value), now, step))
    client.log_batch(run_id, metrics=entries, synchronous=True)


def _refresh_live(name: str, base: Any, conn: Any, parent: str, log: Callable[[str], None]) -> None:
    """The live tau table and figures of the parent run, from the trials as recorded now."""
    from ..service.live import LiveCorrelation, live_target
    from ..service.tracking import Tracker
    from .queries import results

    if not parent:
        return
    tracker = Tracker(conn.tracking_uri, conn.artifact_root)

    def write(metrics: dict[str, float], step: int, figures: Path) -> None:
        tracker.log_metrics(parent, [(metrics, step, int(time.time() * 1000))])
        tracker.client.log_artifacts(parent, str(figures), artifact_path="live")

    live = LiveCorrelation(
        live_target(base.objective.metrics),
        list(base.search.space),
        write,
        log,
        history=lambda: results(name, conn.tracking_uri),
    )
    live.refresh()


def _report(name: str, conn: Any, log: Callable[[str], None]) -> Path | None:
    from .report import report_sweep

    try:
        done = report_sweep(name, tracking_uri=conn.tracking_uri, results_dir=conn.results_dir)
    except (ValueError, LookupError) as err:
        log(f"sweep {name}: no analysis report ({err})")
        return None
    except Exception:  # the values are logged; a report that fails is said, not raised
        log(f"sweep {name}: analysis report failed: {traceback.format_exc().strip().splitlines()[-1]}")
        return None
    log(f"sweep {name}: analysis report {done.html} (also on the MLflow parent run)")
    return done.html


def command(args: Any) -> int:
    """``sweeps measure`` (the parsed ``args`` of :mod:`sweeps.cli`): exit 0 when every trial to
    measure was measured, 3 when some could not be (each named on stderr), 130 interrupted
    (running it again continues), 2 bad input, a store that cannot be reached or a sweep that a
    driver is running (nothing written)."""
    import sys

    from ..service.connections import redact
    from ..service.lease import LeaseHeldError

    options = parse_measure_options(args.overrides, args.metrics)
    log: Callable[[str], None] = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr))
    try:
        summary = measure_sweep(
            args.name,
            args.metrics,
            options=options,
            force=args.force,
            address=args.address,
            max_concurrent=args.max_concurrent,
            tracking_uri=args.tracking_uri,
            storage=args.storage,
            results_dir=args.results_dir,
            report=args.report,
            log=log,
        )
    except KeyboardInterrupt:
        print(
            "sweeps measure: interrupted; run it again to continue (trials measured so far are kept)", file=sys.stderr
        )
        return 130
    except ConfigError:
        raise  # sweeps.cli.main: "invalid config", exit 2
    except (ConnectionError, ValueError, LookupError, LeaseHeldError) as err:
        print(f"sweeps measure: {redact(str(err))}", file=sys.stderr)
        return 2
    flags = "".join(
        f" --{flag.replace('_', '-')} {redact(str(getattr(args, flag)))}"
        for flag in ("results_dir", "storage", "tracking_uri")
        if getattr(args, flag, None)
    )
    print(
        f"sweep {args.name}: measured {len(summary.measured)} trial(s), skipped {len(summary.skipped)} (measured "
        f"already), failed {len(summary.failed)}; results: sweeps results {args.name}{flags}"
        + (
            ""
            if summary.pairs is None
            else f"; {len(summary.pairs)} seed pair(s): sweeps.posthoc.connectivity.seed_barriers"
        )
    )
    return 3 if summary.failed else 0


__all__ = [
    "artifact_bytes",
    "command",
    "INIT_FILE",
    "MODEL_FILE",
    "MeasureSummary",
    "check_metrics",
    "measure_stored",
    "measure_sweep",
    "parse_measure_options",
    "trial_config",
]
