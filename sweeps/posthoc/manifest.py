"""``sweeps import MANIFEST.yaml``: models trained elsewhere, recorded as a finished sweep.

A manifest is a sweep config (``name``, ``dataset``, ``model``: a registered name or a
``pkg.mod:factory``, ``train.loss``, ``measure``, ``measure_subset``, ``objective``; no search
section needed) plus ``models``, one entry per trained model::

    name: my-models
    dataset: {name: digits, train_size: 256}
    model: {name: my_pkg.models:make_mlp, kwargs: {width: 32}}
    measure: [param_norm]                      # computed here at import (optional)
    models:
      - state: runs/a/model.pt                 # a torch.save-d state dict, relative to the manifest
        init: runs/a/init.pt                   # its initialization (optional; distance measures need it)
        hyperparameters: {train.lr: 0.1, seed: 0}   # config keys (dotted), as the model was trained
        metrics: {test_acc: 0.91}              # measured elsewhere (optional)

Each model's config is the manifest's with its ``hyperparameters`` set; its model is built from
it (initialized with its ``seed``) and the state dict loaded (strict: every key and shape must
fit). The four outcomes ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc`` not given in
``metrics`` are computed here on the dataset (full training and test sets, eval mode, the loss of
``train.loss``), then ``gen_gap`` (test error - train error), ``n_train``, ``n_test``,
``num_params``, and the ``measure`` list as a trial measures it (:func:`sweeps.posthoc.remeasure.measure_stored`,
in this process). Units: losses in nats per sample, accuracies in [0, 1].

Recorded as a sweep: an Optuna study whose search space is a grid of the values the
hyperparameters take (one COMPLETE trial per model, status ``converged``), an MLflow parent run
and one child run per model holding its params, metrics and ``model.pt`` / ``init_state.pt``
artifacts. So ``sweeps measure``, ``results``, ``report``, ``correlations`` and ``status`` work on
it unchanged. A sweep of the same name that exists already is refused.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..spec.errors import ConfigError

#: The keys of one ``models`` entry.
ENTRY_KEYS = ("state", "init", "hyperparameters", "metrics")
#: Outcomes computed here for a model whose ``metrics`` do not give them.
OUTCOMES = ("train_loss", "train_acc", "test_loss", "test_acc")


@dataclass
class ImportedModel:
    """One ``models`` entry, read: its config, weights (state dict bytes) and metrics."""

    config: Any
    point: dict[str, Any]
    state: bytes
    init: bytes | None
    metrics: dict[str, float]
    source: str


@dataclass
class ImportSummary:
    """What :func:`import_manifest` returns: the sweep ``name``, its ``parent_run_id`` and the
    ``trials`` recorded (trial numbers, in manifest order)."""

    name: str
    parent_run_id: str
    trials: list[int]


def _read(path: Path) -> dict[str, Any]:
    from ..spec.config_text import parse_yaml, read_config_text

    data = parse_yaml(read_config_text(path))
    if not isinstance(data, dict):
        raise ConfigError(f"manifest: {path} must hold a mapping (name, dataset, model, models, ...)")
    return data


def _entries(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError("models: a non-empty list of {state, init, hyperparameters, metrics} is required")
    problems = []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict):
            problems.append(f"models[{i}]: must be a mapping with state (got {entry!r})")
            continue
        stray = [k for k in entry if k not in ENTRY_KEYS]
        if stray:
            problems.append(f"models[{i}].{stray[0]}: not a key of a models entry ({', '.join(ENTRY_KEYS)})")
        if not isinstance(entry.get("state"), str):
            problems.append(f"models[{i}].state: the path of the model's state dict is required")
        for key in ("hyperparameters", "metrics"):
            if not isinstance(entry.get(key) or {}, dict):
                problems.append(f"models[{i}].{key}: must be a mapping (got {entry[key]!r})")
    first = sorted((models[0].get("hyperparameters") or {}) if isinstance(models[0], dict) else [])
    for i, entry in enumerate(models):
        keys = sorted((entry.get("hyperparameters") or {}) if isinstance(entry, dict) else [])
        if not problems and keys != first:
            problems.append(f"models[{i}].hyperparameters: give the keys of models[0] ({first}), got {keys}")
    if problems:
        raise ConfigError(problems)
    return models


def sweep_config(data: Mapping[str, Any], entries: list[dict[str, Any]]) -> Any:
    """The sweep config of a manifest: its fields less ``models``, a grid search space of the
    values each hyperparameter takes, ``n_trials`` the number of models."""
    from ..spec.config import load_config

    space: dict[str, list[Any]] = {}
    for entry in entries:
        for key, value in (entry.get("hyperparameters") or {}).items():
            if value not in space.setdefault(key, []):
                space[key].append(value)
    if "search" in data:
        raise ConfigError("search: not part of a manifest (its search space is the models' hyperparameters); remove it")
    config = {k: v for k, v in data.items() if k != "models"}
    config["search"] = {
        "sampler": "grid",
        "n_trials": len(entries),
        "space": {k: {"values": v} for k, v in space.items()},
    }
    return load_config(config)


def _file(folder: Path, value: str, field: str) -> bytes:
    path = (folder / value).expanduser()
    if not path.is_file():
        raise ConfigError(f"{field}: no file {str(path)!r} (paths are relative to the manifest's folder)")
    return path.read_bytes()


def read_model(folder: Path, base: Any, entry: Mapping[str, Any], i: int) -> ImportedModel:
    """Entry ``i`` of ``models`` checked and read: its config validated, its state dict loaded into
    the model its config builds (strict), its outcomes and ``measure`` list computed here."""
    import torch

    point = dict(entry.get("hyperparameters") or {})
    try:
        config = base.with_point(point)
    except ConfigError as err:
        raise ConfigError([f"models[{i}].hyperparameters.{p}" for p in err.problems]) from None
    state = _file(folder, entry["state"], f"models[{i}].state")
    init = _file(folder, entry["init"], f"models[{i}].init") if entry.get("init") else None
    given = {}
    for key, value in (entry.get("metrics") or {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"models[{i}].metrics.{key}: must be a finite number (got {value!r})")
        given[key] = float(value)
    from ..trial.data import load_dataset
    from ..trial.models import build_model, count_parameters

    data = load_dataset(config.dataset)
    model = build_model(config.model, data.input_shape, data.num_classes, seed=config.seed)
    for field, blob in (("state", state), ("init", init)):
        if blob is None:
            continue
        try:
            loaded = torch.load(io.BytesIO(blob), map_location="cpu")
            if field == "state":
                model.load_state_dict(loaded)
            else:
                model_copy = build_model(config.model, data.input_shape, data.num_classes, seed=config.seed)
                model_copy.load_state_dict(loaded)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"models[{i}].{field}: not a state dict of model {config.model.name!r} as configured ({first})"
            ) from None
    metrics = {**_outcomes(config, data, model, given), **given}
    metrics.update(gen_gap=(1 - metrics["test_acc"]) - (1 - metrics["train_acc"]))
    metrics.update(n_train=data.n_train, n_test=data.n_test, num_params=count_parameters(model))
    if config.measure:
        from .remeasure import measure_stored

        threads = torch.get_num_threads()
        try:
            metrics.update(measure_stored(config, state, init, device="cpu"))
        finally:
            torch.set_num_threads(threads)
    return ImportedModel(config, point, state, init, metrics, str(entry["state"]))


def _outcomes(config: Any, data: Any, model: Any, given: Mapping[str, float]) -> dict[str, float]:
    from ..trial.losses import evaluate
    from ..trial.train import LOSSES

    out: dict[str, float] = {}
    for split in ("train", "test"):
        if f"{split}_loss" in given and f"{split}_acc" in given:
            continue
        x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
        out[f"{split}_loss"], out[f"{split}_acc"] = evaluate(model, LOSSES[config.train.loss], x, y)
    return out


def import_manifest(
    path: str | Path,
    *,
    name: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    results_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> ImportSummary:
    """Record the models of the manifest at ``path`` as the finished sweep ``name`` (default: the
    manifest's ``name``); see the module docstring. Everything is read and checked before anything
    is written.

    Raises:
        ConfigError: a manifest field that does not validate (named, with the fix).
        ValueError: a sweep of that name exists already. ConnectionError: a store that cannot be reached.
    """
    import optuna

    from ..service import search
    from ..service.connections import check_reachable, redact, resolve
    from ..service.lease import DriverLease
    from ..service.tracking import Tracker

    path = Path(path)
    data = _read(path)
    if name is not None:
        data["name"] = name
    entries = _entries(data)
    config = sweep_config(data, entries)
    models = []
    for i, entry in enumerate(entries):
        models.append(read_model(path.parent, config, entry, i))
        log(f"model {i} ({models[-1].source}): " + ", ".join(f"{k}={models[-1].metrics[k]:.4g}" for k in OUTCOMES))
    conn = resolve(results_dir=results_dir, tracking_uri=tracking_uri, storage=storage)
    check_reachable(conn)
    store = search.make_storage(conn.storage)
    if config.name in {s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)}:
        raise ValueError(
            f"name: a sweep named {config.name!r} exists in {redact(conn.storage)}; import with --name NEW"
        )
    with DriverLease(conn.storage, config.name):
        study = search.open_study(config, conn.storage)
        study.set_user_attr("budget", len(models))
        tracker = Tracker(conn.tracking_uri, conn.artifact_root)
        parent = tracker.start_parent(
            config.name,
            flat_config=config.flat(),
            resolved_config=config.model_dump(mode="json"),
            config_yaml=path.read_text(),
        )
        study.set_user_attr("mlflow_parent_run_id", parent)
        study.set_user_attr("tracking_uri", redact(conn.tracking_uri))
        distributions = search.grid_distributions(config)
        numbers = []
        for model in models:
            trial = search.start_trial(study, model.point, distributions)
            run = tracker.start_child(config.name, parent, trial.number, model.config.flat())
            trial.set_user_attr("mlflow_run_id", run)
            files = {"model.pt": model.state, **({"init_state.pt": model.init} if model.init is not None else {})}
            tracker.finish_child(
                run, "converged", model.metrics, artifacts=files, tags={"sweeps.imported": model.source}
            )
            search.tell(study, trial.number, "converged", model.metrics)
            numbers.append(trial.number)
        tracker.end_parent(parent, "FINISHED", {"trials_converged": float(len(models))})
    return ImportSummary(config.name, parent, numbers)


def command(args: Any) -> int:
    """``sweeps import`` (the parsed ``args`` of :mod:`sweeps.cli`): exit 0 imported, 2 bad input
    (a manifest field, a taken name, a store that cannot be reached; nothing written)."""
    import sys

    from ..service.connections import redact
    from ..spec.names import check_name

    if args.name is not None:
        check_name(args.name, "--name")
    try:
        summary = import_manifest(
            args.manifest,
            name=args.name,
            tracking_uri=args.tracking_uri,
            storage=args.storage,
            results_dir=args.results_dir,
            log=lambda line: print(line, file=sys.stderr),
        )
    except ConfigError:
        raise  # sweeps.cli.main: "invalid config", exit 2
    except (ConnectionError, ValueError, LookupError, OSError) as err:
        print(f"sweeps import: {redact(str(err))}", file=sys.stderr)
        return 2
    print(
        f"sweep {summary.name}: {len(summary.trials)} model(s) imported (status converged); "
        f"next: sweeps report {summary.name}, sweeps measure {summary.name} --metric M"
    )
    return 0


__all__ = [
    "command",
    "ENTRY_KEYS",
    "OUTCOMES",
    "ImportSummary",
    "ImportedModel",
    "import_manifest",
    "read_model",
    "sweep_config",
]
