"""MLflow records of a sweep: one experiment and one parent run per sweep, one nested child run per trial.

Only the driver writes to MLflow (see :mod:`sweeps.runner` for why), always through an
``MlflowClient`` bound to an explicit tracking URI, never through the fluent API's global
state, so ``MLFLOW_RUN_ID`` or a stray ``mlflow.db`` in the current directory cannot redirect
a write.

Layout:

* experiment = sweep name (artifacts under ``<results dir>/mlartifacts/<name>`` for local stores),
  tagged ``mlflow.experimentKind = custom_model_development`` (:data:`EXPERIMENT_KIND`, a
  model-training experiment), and linked to in the UI's Model training view (:func:`ui_links`);
* parent run (tags ``sweeps.sweep``, ``sweeps.role=parent``, ``sweeps.git_commit``,
  ``sweeps.versions.<package>``; artifacts ``config.yaml`` and ``resolved_config.json``; the
  flattened config as params);
* child run per trial (tags ``mlflow.parentRunId``, ``sweeps.sweep``, ``sweeps.role=trial``,
  ``optuna.trial_number``, ``status``; params = flattened config of the trial; metrics streamed
  with steps while training, final metrics at the last step; artifacts from the trial's
  output directory, ``traceback.txt`` for failures).
"""

from __future__ import annotations

import importlib.metadata
import math
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, overload

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from ..spec.status import TrialStatus
from .connections import redact

ROLE_TAG, SWEEP_TAG, STATUS_TAG, TRIAL_TAG = "sweeps.role", "sweeps.sweep", "status", "optuna.trial_number"
PARENT_TAG = "mlflow.parentRunId"
_BATCH = 100  # MLflow's per-request limit on params (metrics: 1000)
#: Experiment tag of MLflow 3's UI (``mlflow.experimentKind`` in its bundle): this kind is "Model
#: training". MLflow 3.17's UI honours it only with its GenAI / Model training switch off; the switch
#: is on by default and opens every experiment in its GenAI view, whatever the tag, so the links of
#: :func:`ui_links` also select Model training (:data:`UI_WORKFLOW`).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
#: The UI's URL parameter that selects its Model training view (runs, metrics, artifacts).
UI_WORKFLOW = "workflowType=machine_learning"


def ui_links(base_url: str, experiment_id: str, parent_run_id: str | None = None) -> dict[str, str]:
    """Links into the MLflow UI at ``base_url``, in its Model training view: ``runs``, the
    experiment's runs table (``#/experiments/<id>/runs``), and ``parent``, the sweep's parent run
    page (``#/experiments/<id>/runs/<run id>``)."""
    base = f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    links = {"runs": f"{base}?{UI_WORKFLOW}"}
    if parent_run_id:
        links["parent"] = f"{base}/{parent_run_id}?{UI_WORKFLOW}"
    return links


#: Where ``mlflow ui`` serves by default (the address :func:`ui_hint` gives for a local store).
MLFLOW_UI_DEFAULT = "http://127.0.0.1:5000"


def ui_hint(tracking_uri: str, parent_run_id: str | None) -> str:
    """One line saying where the sweep of ``parent_run_id`` is in the MLflow UI: against a tracking
    server its runs table and parent run (:func:`ui_links`); for a local store the ``mlflow ui``
    command to start and the same links on :data:`MLFLOW_UI_DEFAULT`. ``""`` without a parent run."""
    from urllib.parse import urlsplit, urlunsplit

    if not parent_run_id:
        return ""
    experiment_id = MlflowClient(tracking_uri=tracking_uri).get_run(parent_run_id).info.experiment_id
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("http", "https"):
        netloc = parts.netloc.rpartition("@")[2]  # no credentials in a printed link
        links = ui_links(urlunsplit((parts.scheme, netloc, parts.path, "", "")), experiment_id, parent_run_id)
        return f"mlflow: runs {links['runs']} ; parent run {links['parent']}"
    links = ui_links(MLFLOW_UI_DEFAULT, experiment_id, parent_run_id)
    return (
        f"mlflow: `mlflow ui --backend-store-uri {redact(tracking_uri)}`, then runs {links['runs']} ; "
        f"parent run {links['parent']}"
    )


#: The artifact files of a trial's run that hold its final and initial weights (state dicts).
MODEL_FILE, INIT_FILE = "model.pt", "init_state.pt"


def artifact_bytes(client: Any, run_id: str, file_name: str) -> bytes | None:
    """The bytes of one artifact file of a run (``file_name`` may be in a folder:
    ``"connectivity/pairs.csv"``), ``None`` when it has none by that name."""
    import os

    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as progress_bar

    folder = file_name.rpartition("/")[0]
    if file_name not in {a.path for a in client.list_artifacts(run_id, folder or None)}:
        return None
    previous = os.environ.get(progress_bar.name)
    os.environ[progress_bar.name] = "false"  # no progress bar per file
    try:
        with tempfile.TemporaryDirectory(prefix="sweeps-measure-") as tmp:
            return Path(client.download_artifacts(run_id, file_name, tmp)).read_bytes()
    finally:
        if previous is None:
            os.environ.pop(progress_bar.name, None)
        else:
            os.environ[progress_bar.name] = previous


def now_ms() -> int:
    return int(time.time() * 1000)


def git_commit(cwd: str | Path | None = None) -> str:
    """The current git commit (with ``-dirty``), or ``unknown`` outside a repository."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a sweep's numbers."""
    versions = {}
    for package in ("landscape-sweeps", "torch", "numpy", "ray", "optuna", "mlflow", "pandas"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "missing"
    import platform

    versions["python"] = platform.python_version()
    return versions


class Tracker:
    """The driver's writer to one MLflow tracking store.

    Args:
        tracking_uri: explicit MLflow tracking URI.
        artifact_root: artifact location for a new experiment (``None``: the server's default).
    """

    def __init__(self, tracking_uri: str, artifact_root: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._experiment_of: dict[str, str] = {}  # parent run id -> experiment id

    def __repr__(self) -> str:
        return f"Tracker({redact(self.tracking_uri)!r})"

    # experiment and parent ------------------------------------------------------------------
    @overload
    def experiment_id(self, name: str, *, create: Literal[True] = True) -> str: ...
    @overload
    def experiment_id(self, name: str, *, create: bool) -> str | None: ...
    def experiment_id(self, name: str, *, create: bool = True) -> str | None:
        """Id of the experiment ``name`` (restored if deleted, created if missing and ``create``)."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            if not create:
                return None
            location = f"{self.artifact_root}/{name}" if self.artifact_root else None
            return self.client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND[0] not in experiment.tags:  # made by an older version
            self.client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id

    def start_parent(
        self,
        name: str,
        *,
        flat_config: Mapping[str, Any],
        resolved_config: Mapping[str, Any],
        config_yaml: str,
        run_id: str | None = None,
    ) -> str:
        """Create the sweep's parent run, or reopen ``run_id`` (a resumed sweep); returns its id."""
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except Exception:  # deleted or from another store: start a new parent
                run = None
            if run is not None and run.info.lifecycle_stage == "active":
                self.client.update_run(run_id, status="RUNNING")
                self.client.set_tag(run_id, "sweeps.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
                return run_id
        tags = {ROLE_TAG: "parent", SWEEP_TAG: name, "sweeps.git_commit": git_commit()}
        tags |= {f"sweeps.versions.{k}": v for k, v in package_versions().items()}
        run = self.client.create_run(self.experiment_id(name), run_name=name, tags=tags)
        parent = run.info.run_id
        self.log_params(parent, flat_config)
        self.client.log_text(parent, config_yaml, "config.yaml")
        self.client.log_dict(parent, dict(resolved_config), "resolved_config.json")
        self.client.log_dict(parent, dict(flat_config), "flat_config.json")
        return parent

    # children -------------------------------------------------------------------------------
    def start_child(self, name: str, parent_run_id: str, trial_number: int, params: Mapping[str, Any]) -> str:
        """Create the RUNNING child run of trial ``trial_number`` with its params; returns its id."""
        experiment = self._experiment(parent_run_id)
        tags = {
            PARENT_TAG: parent_run_id,
            ROLE_TAG: "trial",
            SWEEP_TAG: name,
            TRIAL_TAG: str(trial_number),
            STATUS_TAG: TrialStatus.RUNNING.value,
        }
        run = self.client.create_run(experiment, run_name=f"{name}-{trial_number:04d}", tags=tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def child_run(self, parent_run_id: str, trial_number: int) -> str | None:
        """The id of trial ``trial_number``'s child run of ``parent_run_id``, if it was created."""
        runs = self.client.search_runs(
            [self._experiment(parent_run_id)],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_number}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _experiment(self, parent_run_id: str) -> str:
        if parent_run_id not in self._experiment_of:
            self._experiment_of[parent_run_id] = self.client.get_run(parent_run_id).info.experiment_id
        return self._experiment_of[parent_run_id]

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[start : start + _BATCH], synchronous=True)

    def log_metrics(
        self,
        run_id: str,
        records: Iterable[tuple[Mapping[str, float], int, int]],
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Log ``(metrics, step, timestamp_ms)`` records in batches (non-numeric values skipped); ``tags``
        go with the last batch."""
        metrics = [
            Metric(key, float(value), timestamp, int(step))
            for values, step, timestamp in records
            for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        starts = range(0, len(metrics), 1000) if metrics else [0]
        for start in starts:
            last = start + 1000 >= len(metrics)
            self.client.log_batch(
                run_id, metrics=metrics[start : start + 1000], tags=tag_list if last else [], synchronous=True
            )

    def finish_child(
        self,
        run_id: str,
        status: str,
        metrics: Mapping[str, float],
        *,
        step: int = 0,
        timestamp_ms: int | None = None,
        artifacts: Mapping[str, bytes] | None = None,
        traceback: str | None = None,
        tags: Mapping[str, str] | None = None,
        before_final: Callable[[], None] | None = None,
    ) -> None:
        """Log final metrics and artifacts, then the status tag (with ``tags``), then end the run.

        The order matters: a run whose status tag is final has all its data (an interrupted
        driver leaves the tag at ``running`` and the run is cleaned up on resume).
        ``before_final`` is called after the artifacts, right before the status tag: the driver's
        lease check, so that a driver paused while uploading them, whose run another driver has
        meanwhile ended ``interrupted``, raises instead of overwriting that status.
        ``timestamp_ms`` stamps the final metrics (default now): a write tried again keeps the
        stamp of its first try, so the store holds each value once.
        """
        files = dict(artifacts or {})
        if traceback:
            files["traceback.txt"] = traceback.encode()
        if files:
            with tempfile.TemporaryDirectory(prefix="sweeps-artifacts-") as tmp:
                for file_name, content in files.items():
                    path = Path(tmp, file_name)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(content)
                self.client.log_artifacts(run_id, tmp)
        if before_final is not None:
            before_final()
        stamp = now_ms() if timestamp_ms is None else timestamp_ms
        self.log_metrics(run_id, [(metrics, step, stamp)], tags={**(tags or {}), STATUS_TAG: status})
        self.client.set_terminated(run_id, status=TrialStatus(status).mlflow_status)

    def end(self, run_id: str, status: str) -> None:
        """Set the ``status`` tag and terminate the run (FINISHED, FAILED for failed, KILLED for interrupted)."""
        self.client.set_tag(run_id, STATUS_TAG, str(status))
        self.client.set_terminated(run_id, status=TrialStatus(status).mlflow_status)

    def end_parent(self, run_id: str, status: str, summary: Mapping[str, float]) -> None:
        """Log the sweep's summary counts on the parent run and terminate it with MLflow ``status``."""
        finite = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.log_metrics(run_id, [(finite, 0, now_ms())])
        self.client.set_terminated(run_id, status=status)

    def run_info(self, run_id: str) -> tuple[str, str | None, dict[str, float]]:
        """(MLflow status, status tag, metrics) of a run."""
        run = self.client.get_run(run_id)
        return run.info.status, run.data.tags.get(STATUS_TAG), dict(run.data.metrics)

    def active_children(self, parent_run_id: str) -> list[str]:
        """Ids of child runs of ``parent_run_id`` still RUNNING (orphans of a killed driver)."""
        experiment = self._experiment(parent_run_id)
        runs = self.client.search_runs(
            [experiment],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
            max_results=10_000,
        )
        return [r.info.run_id for r in runs]


__all__ = [
    "EXPERIMENT_KIND",
    "INIT_FILE",
    "MODEL_FILE",
    "artifact_bytes",
    "MLFLOW_UI_DEFAULT",
    "UI_WORKFLOW",
    "Tracker",
    "git_commit",
    "package_versions",
    "ui_hint",
    "ui_links",
]
