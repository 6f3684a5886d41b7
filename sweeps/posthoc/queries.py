"""What a sweep holds, read back: its results as a pandas DataFrame (from MLflow), its status and the
list of sweeps (from the Optuna storage).

``sweeps.results(name)`` is :func:`results` (the package exports the function; this module is
named for what it does so that the name ``sweeps.results`` stays the function).

Column contract of :func:`results` (one row per finished trial, ordered by trial number):

* ``sweep``, ``trial_number`` (int), ``status`` (``converged`` / ``not_converged`` /
  ``diverged`` / ``failed`` / ``pruned``), ``run_id``;
* hyperparameters: every flattened config key of the trial, dotted exactly as in the config
  (``train.lr``, ``model.width``, ``seed``, ...), search-space keys first, cast to the
  config schema's type (MLflow keeps params as strings): ``float64``, ``int64`` (``Int64``
  where missing), ``bool``, else ``str``;
* metrics: bare names (``test_acc``, ``gen_gap``, ``hessian_top_eig``, ``hessian_top_eig_seconds``,
  ...) as ``float64``; counts (``epochs``, ``steps``, ``n_train``, ``n_test``, ``num_params``)
  as ``Int64``. A metric a trial does not have (a diverged trial's measures) is NaN;
  ``resumes`` (times a trial continued from its checkpoint, :mod:`sweeps.trial.checkpoint`) is there
  once a trial of the sweep did, NaN for the others: a point interrupted and continued is one row.

Interrupted attempts (their points were re-run) are left out unless ``include_interrupted``.

``frame.attrs`` says which columns play which role: ``objective``, ``search_space`` (the varied
hyperparameters) and ``measures`` (see :func:`summary_columns`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient

from ..adapters import mlflow_adapter
from ..service.connections import Connections, redact, resolve
from ..service.outages import retrying_read
from ..service.tracking import PARENT_TAG, ROLE_TAG, STATUS_TAG, TRIAL_TAG
from ..spec.status import FINISHED, TrialStatus

_COUNT_METRICS = ("epochs", "steps", "n_train", "n_test", "num_params")
_ID_COLUMNS = ("sweep", "trial_number", "status", "run_id")


class SweepNotFoundError(LookupError):
    """No sweep of that name in the given store."""


def _connections(tracking_uri: str | None, results_dir: str | Path | None, storage: str | None = None) -> Connections:
    return resolve(tracking_uri=tracking_uri, results_dir=results_dir, storage=storage, create=False)


def find_parent_run(name: str, tracking_uri: str | None = None, *, results_dir: str | Path | None = None) -> str:
    """Run id of sweep ``name``'s parent run (newest one if the sweep was restarted).

    The parent run lives in the experiment named ``name``, has tag ``sweeps.role=parent`` and no
    ``mlflow.parentRunId`` tag (see :mod:`sweeps.service.tracking`). ``tracking_uri=None`` resolves as
    for ``sweeps run``.
    """
    client = MlflowClient(tracking_uri=_connections(tracking_uri, results_dir).tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise LookupError(
            f"name: no sweep named {name!r} (MLflow experiment) in {redact(client.tracking_uri)}; "
            "check NAME and --tracking-uri"
        )
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    if not parents:
        raise LookupError(f"sweep {name!r}: experiment has no parent run (tag {ROLE_TAG}=parent)")
    return parents[0].info.run_id


def _all_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=5000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a read builds many small objects (MLflow and
    Optuna entities, SQLAlchemy rows): at 10,000 trials its full passes cost more than the read."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _trial_runs(
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str | None,
    *,
    use_sql: bool | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The sweep's active trial runs (children of ``parent_run_id`` when given), as three frames:
    ``runs`` (``sweep``-less id columns ``trial_number``, ``status``, ``run_id``, ``_end``),
    ``params`` and ``metrics`` (latest values; one row per run id, one column per key).

    A database tracking store (SQLite, PostgreSQL, MySQL) is read with four SQL queries on
    MLflow's own tables (:func:`_sql_runs`); any other (an ``mlflow server``) with paged
    ``search_runs``. ``use_sql`` forces one way (tests compare them). The SQL way leaves
    MLflow's public API: :mod:`sweeps.adapters.mlflow_adapter` holds what it uses.
    """
    engine = mlflow_adapter.sql_engine(client)
    if use_sql is None:
        use_sql = engine is not None
    if use_sql:
        return _sql_runs(engine, experiment_id, parent_run_id)
    filter_string = f"tags.`{ROLE_TAG}` = 'trial'"
    if parent_run_id is not None:
        filter_string += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
    ids, rows, params, metrics = [], [], [], []
    for run in _all_runs(client, experiment_id, filter_string):
        tags = run.data.tags
        ids.append(run.info.run_id)
        rows.append((tags.get(TRIAL_TAG, "-1"), tags.get(STATUS_TAG), run.info.run_id, run.info.end_time or 0))
        params.append(run.data.params)
        metrics.append(run.data.metrics)
    runs = pd.DataFrame(rows, columns=["trial_number", "status", "run_id", "_end"])
    return (
        _typed_runs(runs),
        pd.DataFrame(params, index=pd.Index(ids, name="run_id")),
        pd.DataFrame(metrics, index=pd.Index(ids, name="run_id"), dtype="float64"),
    )


def _sql_runs(engine: Any, experiment_id: str, parent_run_id: str | None) -> tuple[pd.DataFrame, ...]:
    """:func:`_trial_runs` on MLflow's SQL tables (:func:`~sweeps.adapters.mlflow_adapter.read_trial_tables`):
    what ``search_runs`` returns for an active run, without building an ORM object and an MLflow
    entity per tag, param and metric (``search_runs`` builds ~800,000 of each at 10,000 trials;
    see docs/benchmarks.md)."""
    runs, tags, params, metrics = mlflow_adapter.read_trial_tables(
        engine, experiment_id, parent_run_id, role_tag=ROLE_TAG, parent_tag=PARENT_TAG, tags=(TRIAL_TAG, STATUS_TAG)
    )
    ids = pd.Index(runs["run_uuid"], name="run_id")
    wide_tags = _wide(tags, ids)
    out = pd.DataFrame(
        {
            "trial_number": wide_tags.get(TRIAL_TAG, "-1"),
            "status": wide_tags.get(STATUS_TAG),
            "run_id": ids,
            "_end": runs["end_time"].fillna(0).to_numpy(),
        },
        index=ids,
    ).reset_index(drop=True)
    if not metrics.empty:
        metrics["value"] = metrics["value"].astype("float64").where(~metrics["is_nan"].astype(bool), float("nan"))
    return _typed_runs(out), _wide(params, ids), _wide(metrics, ids).astype("float64")


def _wide(long: pd.DataFrame, ids: pd.Index) -> pd.DataFrame:
    """``(run_uuid, key, value)`` rows as one row per run id (in ``ids`` order), one column per key."""
    if long.empty:
        return pd.DataFrame(index=ids)
    return long.pivot(index="run_uuid", columns="key", values="value").reindex(ids).rename_axis(columns=None)


def _typed_runs(runs: pd.DataFrame) -> pd.DataFrame:
    runs["trial_number"] = pd.to_numeric(runs["trial_number"].fillna("-1"), errors="coerce").fillna(-1).astype("int64")
    runs["_end"] = pd.to_numeric(runs["_end"]).fillna(0).astype("int64")
    return runs


def _parent(client: MlflowClient, experiment_id: str) -> Any | None:
    parents = _all_runs(client, experiment_id, f"tags.`{ROLE_TAG}` = 'parent'")
    return max(parents, key=lambda r: r.info.start_time or 0) if parents else None


def _parent_json(client: MlflowClient, run_id: str, file_name: str) -> dict[str, Any]:
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as progress_bar

    previous = os.environ.get(progress_bar.name)
    os.environ[progress_bar.name] = "false"  # no progress bar for a small JSON file
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, file_name, tmp)
            return json.loads(Path(path).read_text())
    except Exception:  # an older or foreign parent run without the file: types are inferred
        return {}
    finally:
        if previous is None:
            os.environ.pop(progress_bar.name, None)
        else:
            os.environ[progress_bar.name] = previous


def _cast(values: pd.Series, example: Any) -> pd.Series:
    """Cast string params to the type of ``example`` (the base config's value of the key).

    Without an example (a key unset in the base config, e.g. ``model.width: null``), the type is
    inferred: booleans, integers (no ``.``/exponent), floats, else strings. A value that does not
    fit the type (``batch_size: full`` among integers) keeps the column as strings.
    """
    text = values.astype(object).where(values.notna(), None)
    present = text.notna()
    if not present.any():
        return text
    if isinstance(example, bool) or (example is None and set(text[present]) <= {"True", "False"}):
        flags = text.map({"True": True, "False": False})
        if flags[present].notna().all():
            return flags.astype(bool) if present.all() else flags.astype("boolean")
    if not isinstance(example, (str, bool)):
        numbers = pd.to_numeric(text, errors="coerce")
        if numbers[present].notna().all():
            whole = bool((numbers[present] % 1 == 0).all())
            if example is None:
                wants_int = not text[present].astype(str).str.contains(r"[.eEna]").any()
            else:
                wants_int = isinstance(example, int)
            if wants_int and whole:
                return numbers.astype("int64") if present.all() else numbers.astype("Int64")
            return numbers.astype("float64")
    return text.astype(str) if present.all() else text.astype("string")


@retrying_read
def results(
    name: str,
    tracking_uri: str | None = None,
    *,
    results_dir: str | Path | None = None,
    include_interrupted: bool = False,
) -> pd.DataFrame:
    """One row per trial of the sweep ``name`` (see the module docstring for the columns).

    Args:
        name: sweep name (MLflow experiment).
        tracking_uri: MLflow tracking URI; default as for ``sweeps run`` (``$SWEEPS_TRACKING_URI``,
            ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<results dir>/mlflow.db``).
        results_dir: results directory of the embedded default (``$SWEEPS_RESULTS_DIR`` or
            ``./sweeps-results``).
        include_interrupted: also return attempts stopped by an interrupt (status ``interrupted``).

    Raises:
        SweepNotFoundError: no such sweep in the store.
        StoreUnavailableError: a store stayed unreachable past ``SWEEPS_READ_RETRY_SECONDS``
            (60 s; shorter outages are waited out).
    """
    conn = _connections(tracking_uri, results_dir)
    client = MlflowClient(tracking_uri=conn.tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise SweepNotFoundError(f"name: no sweep named {name!r} in {redact(conn.tracking_uri)}; see `sweeps list`")
    parent = _parent(client, experiment.experiment_id)
    base = _parent_json(client, parent.info.run_id, "flat_config.json") if parent else {}
    resolved = _parent_json(client, parent.info.run_id, "resolved_config.json") if parent else {}
    space = list((resolved.get("search") or {}).get("space") or {})

    keep = set(FINISHED) | ({TrialStatus.INTERRUPTED} if include_interrupted else set())
    with _no_gc():  # hundreds of thousands of small objects: the collector would rescan them all
        runs, params, metrics = _trial_runs(client, experiment.experiment_id, parent.info.run_id if parent else None)
        runs = runs[runs["status"].isin(keep)]
        if runs.empty:
            return pd.DataFrame(columns=list(_ID_COLUMNS))
        if not include_interrupted:  # a finished trial number appears once; keep its latest record
            runs = runs.sort_values("_end", kind="stable").drop_duplicates("trial_number", keep="last")
        runs = runs.sort_values("trial_number", kind="stable")
        runs.insert(0, "sweep", name)
        frame = pd.concat(
            [
                runs.reset_index(drop=True),
                params.reindex(runs["run_id"]).add_prefix("param:").reset_index(drop=True),
                metrics.reindex(runs["run_id"]).add_prefix("metric:").reset_index(drop=True),
            ],
            axis=1,
        )
        frame = frame.drop(columns="_end").dropna(axis=1, how="all").reset_index(drop=True)

        columns: dict[str, pd.Series] = {c: frame[c] for c in _ID_COLUMNS}
        columns["trial_number"] = frame["trial_number"].astype("int64")
        columns["status"] = frame["status"].astype(str)
        names = [c.removeprefix("param:") for c in frame if c.startswith("param:")]
        ordered = [k for k in space if k in names] + sorted(k for k in names if k not in space)
        for key in ordered:
            columns[key] = _cast(frame[f"param:{key}"], base.get(key))
        for column in sorted(c for c in frame if c.startswith("metric:")):
            key = column.removeprefix("metric:")
            values = pd.to_numeric(frame[column], errors="coerce").astype("float64")
            if key in _COUNT_METRICS and bool((values.dropna() % 1 == 0).all()):
                values = values.astype("Int64")
            columns[key if key not in columns else f"metric.{key}"] = values
        out = pd.DataFrame(columns)
    out.attrs.update(_column_roles(resolved, list(out.columns)))
    return out


def _column_roles(resolved: dict[str, Any], columns: list[str]) -> dict[str, list[str]]:
    """``DataFrame.attrs`` of :func:`results`: which columns are the ``objective``, the varied
    hyperparameters (``search_space``) and the landscape ``measures`` (each measure's output keys)."""
    from landscape.metrics import METRICS, result_keys

    present = set(columns)
    measures = [k for k in result_keys(m for m in resolved.get("measure") or [] if m in METRICS) if k in present]
    measures += [k for k in result_keys(METRICS) if k in present and k not in measures]  # added by `sweeps measure`
    objective = (resolved.get("objective") or {}).get("metrics") or []
    space = list((resolved.get("search") or {}).get("space") or {})
    return {
        "objective": [c for c in objective if c in present],
        "search_space": [c for c in space if c in present],
        "measures": [c for c in measures if c not in objective],
    }


def summary_columns(frame: pd.DataFrame) -> list[str]:
    """The columns a person looks at first: trial number, status, objective, varied
    hyperparameters, measures (from ``frame.attrs``, see :func:`results`)."""
    roles = frame.attrs
    wanted = [
        "trial_number",
        "status",
        *roles.get("objective", []),
        *roles.get("search_space", []),
        *roles.get("measures", []),
    ]
    return [c for c in dict.fromkeys(wanted) if c in frame.columns]


def _live(tracking_uri: str, parent_run_id: str | None, objective: list[str]) -> dict[str, Any] | None:
    """The latest live correlation table of the sweep's parent run (:mod:`sweeps.service.live`), or
    ``None`` (no parent run, nothing logged yet, or the tracking store unreachable)."""
    from ..service.live import live_target, read_live_table

    if not parent_run_id:
        return None
    try:
        metrics = MlflowClient(tracking_uri=tracking_uri).get_run(parent_run_id).data.metrics
    except Exception:  # the status of the study is still worth printing
        return None
    table = read_live_table(metrics)
    if table.empty:
        return None
    return {
        "target": live_target(objective),
        "n_models": table.attrs["n_models"],
        "measures": table.reset_index().to_dict("records"),
    }


@retrying_read
def sweep_status(
    name: str,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    results_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Counts per status, budget, best trial(s), the driver holding the sweep's lease (``driver``:
    host, pid, since, heartbeat, alive; ``None`` when no driver runs it), the live correlation
    (``live``: ``target``, ``n_models`` and per measure n, tau and its interval, see
    :mod:`sweeps.service.live`; ``None`` before the first update) and where the sweep lives."""
    import optuna

    from ..service import search

    conn = _connections(tracking_uri, results_dir, storage)
    try:
        study = optuna.load_study(study_name=name, storage=search.make_storage(conn.storage))
    except KeyError:
        raise SweepNotFoundError(
            f"name: no sweep named {name!r} in {redact(conn.storage)}; see `sweeps list`"
        ) from None
    with _no_gc():
        # One read of the trials: the study's storage caches them, so the counts, the finished
        # trials and the best trials below come from that read (load_study does not read them).
        study.get_trials(deepcopy=False)
        counts = search.status_counts(study)
        finished = len(search.finished_trials(study))
        config = study.user_attrs.get("config", {})
        budget = study.user_attrs.get("budget", (config.get("search") or {}).get("n_trials"))
        try:
            best = [{"number": t.number, "values": t.values, "params": t.params} for t in study.best_trials]
        except ValueError:
            best = []
    from ..service.lease import current_holder

    holder = current_holder(conn.storage, name)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    return {
        "name": name,
        "driver": None if holder is None else holder.as_dict(),
        "counts": counts,
        "finished": finished,
        "budget": budget,
        "objective": dict(zip(study.user_attrs.get("objective", []), [d.name.lower() for d in study.directions])),
        "best": best,
        "mlflow_parent_run_id": parent,
        "live": _live(conn.tracking_uri, parent, study.user_attrs.get("objective", [])),
        "storage": redact(conn.storage),
        "tracking_uri": study.user_attrs.get("tracking_uri", redact(conn.tracking_uri)),
    }


@retrying_read
def list_sweeps(*, storage: str | None = None, results_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per sweep in the Optuna storage: name, trials, finished, best values, start time."""
    import optuna

    from ..service import search

    conn = _connections(None, results_dir, storage)
    if conn.storage.startswith("sqlite:///") and not Path(conn.storage.removeprefix("sqlite:///")).exists():
        return pd.DataFrame(columns=["name", "trials", "finished", "sampler", "objective", "started"])
    store = search.make_storage(conn.storage)
    rows = []
    with _no_gc():
        for frozen in store.get_all_studies():
            # one read of each study's trials (optuna.get_all_study_summaries would read them
            # once more, and load_study's cache could not reuse that read)
            study = optuna.load_study(study_name=frozen.study_name, storage=store)
            trials = study.get_trials(deepcopy=False)
            config = frozen.user_attrs.get("config", {})
            rows.append(
                {
                    "name": frozen.study_name,
                    "trials": len(trials),
                    "finished": len(search.finished_trials(study)),
                    "sampler": (config.get("search") or {}).get("sampler", "?"),
                    "objective": ",".join(
                        f"{m}:{d.name.lower()}"
                        for m, d in zip(frozen.user_attrs.get("objective", []), frozen.directions)
                    ),
                    "started": min((t.datetime_start for t in trials if t.datetime_start is not None), default=None),
                }
            )
    return pd.DataFrame(rows, columns=["name", "trials", "finished", "sampler", "objective", "started"])
