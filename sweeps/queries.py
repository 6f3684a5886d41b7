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
  as ``Int64``. A metric a trial does not have (a diverged trial's measures) is NaN.

Interrupted attempts (their points were re-run) are left out unless ``include_interrupted``.

``frame.attrs`` says which columns play which role: ``objective``, ``search_space`` (the varied
hyperparameters) and ``measures`` (see :func:`summary_columns`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient

from .connections import Connections, redact, resolve
from .status import FINISHED, TrialStatus
from .tracking import PARENT_TAG, ROLE_TAG, STATUS_TAG, TRIAL_TAG

_COUNT_METRICS = ("epochs", "steps", "n_train", "n_test", "num_params")
_ID_COLUMNS = ("sweep", "trial_number", "status", "run_id")


class SweepNotFoundError(LookupError):
    """No sweep of that name in the given store."""


def _connections(tracking_uri: str | None, results_dir: str | Path | None, storage: str | None = None) -> Connections:
    return resolve(tracking_uri=tracking_uri, results_dir=results_dir, storage=storage, create=False)


def _all_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=5000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
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

    filter_string = f"tags.`{ROLE_TAG}` = 'trial'"
    if parent is not None:
        filter_string += f" and tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    keep = set(FINISHED) | ({TrialStatus.INTERRUPTED} if include_interrupted else set())
    rows = []
    for run in _all_runs(client, experiment.experiment_id, filter_string):
        status = run.data.tags.get(STATUS_TAG)
        if status not in keep:
            continue
        row: dict[str, Any] = {
            "sweep": name,
            "trial_number": int(run.data.tags.get(TRIAL_TAG, -1)),
            "status": status,
            "run_id": run.info.run_id,
            "_end": run.info.end_time or 0,
        }
        row |= {f"param:{k}": v for k, v in run.data.params.items()}
        row |= {f"metric:{k}": v for k, v in run.data.metrics.items()}
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(_ID_COLUMNS))
    if not include_interrupted:  # a finished trial number appears once; keep its latest record
        frame = frame.sort_values("_end").drop_duplicates("trial_number", keep="last")
    frame = frame.sort_values("trial_number").drop(columns="_end").reset_index(drop=True)

    columns: dict[str, pd.Series] = {c: frame[c] for c in _ID_COLUMNS}
    columns["trial_number"] = frame["trial_number"].astype("int64")
    columns["status"] = frame["status"].astype(str)
    params = [c.removeprefix("param:") for c in frame if c.startswith("param:")]
    ordered = [k for k in space if k in params] + sorted(k for k in params if k not in space)
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
    wanted = ["trial_number", "status", *roles.get("objective", []), *roles.get("search_space", []),
              *roles.get("measures", [])]
    return [c for c in dict.fromkeys(wanted) if c in frame.columns]


def sweep_status(
    name: str,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    results_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Counts per status, budget, best trial(s), the driver holding the sweep's lease (``driver``:
    host, pid, since, heartbeat, alive; ``None`` when no driver runs it) and where the sweep lives."""
    import optuna

    from . import search

    conn = _connections(tracking_uri, results_dir, storage)
    try:
        study = optuna.load_study(study_name=name, storage=search.make_storage(conn.storage))
    except KeyError:
        raise SweepNotFoundError(f"name: no sweep named {name!r} in {redact(conn.storage)}; see `sweeps list`") from None
    counts = search.status_counts(study)
    config = study.user_attrs.get("config", {})
    budget = study.user_attrs.get("budget", (config.get("search") or {}).get("n_trials"))
    try:
        best = [{"number": t.number, "values": t.values, "params": t.params} for t in study.best_trials]
    except ValueError:
        best = []
    from .lease import current_holder

    holder = current_holder(conn.storage, name)
    return {
        "name": name,
        "driver": None if holder is None else holder.as_dict(),
        "counts": counts,
        "finished": len(search.finished_trials(study)),
        "budget": budget,
        "objective": dict(zip(study.user_attrs.get("objective", []), [d.name.lower() for d in study.directions])),
        "best": best,
        "mlflow_parent_run_id": study.user_attrs.get("mlflow_parent_run_id"),
        "storage": redact(conn.storage),
        "tracking_uri": study.user_attrs.get("tracking_uri", redact(conn.tracking_uri)),
    }


def list_sweeps(*, storage: str | None = None, results_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per sweep in the Optuna storage: name, trials, finished, best values, start time."""
    import optuna

    from . import search

    conn = _connections(None, results_dir, storage)
    if conn.storage.startswith("sqlite:///") and not Path(conn.storage.removeprefix("sqlite:///")).exists():
        return pd.DataFrame(columns=["name", "trials", "finished", "sampler", "objective", "started"])
    store = search.make_storage(conn.storage)
    rows = []
    for summary in optuna.get_all_study_summaries(store, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=store)
        config = summary.user_attrs.get("config", {})
        rows.append({
            "name": summary.study_name,
            "trials": summary.n_trials,
            "finished": len(search.finished_trials(study)),
            "sampler": (config.get("search") or {}).get("sampler", "?"),
            "objective": ",".join(
                f"{m}:{d.name.lower()}" for m, d in zip(summary.user_attrs.get("objective", []), summary.directions)
            ),
            "started": summary.datetime_start,
        })
    return pd.DataFrame(rows, columns=["name", "trials", "finished", "sampler", "objective", "started"])
