"""What a config would run, checked before anything runs: the checks ``sweeps run`` makes before its first trial, and the plan ``sweeps check`` prints.

:func:`preflight` is what :func:`sweeps.runner.run_sweep` calls after the config and the stores
are validated and before it writes anything: no write of the sweep may land outside the
results directory (:func:`sweeps.service.connections.check_inside`), the dataset must load here (its
files present, or downloadable) and the model must build for the dataset's inputs and classes
and run a forward pass. Each problem is a :class:`~sweeps.spec.errors.ConfigError` naming the field.

:func:`make_plan` adds what the sweep would do: its trials (grid size or sampler and budget),
the populations they form, the resources per task, and where results, MLflow and Optuna data go.
It creates nothing: no results directory, no study, no MLflow run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..spec.errors import ConfigError
from .connections import Connections, check_inside, redact, written_paths

#: Most (dataset, model) variants of a search space that :func:`preflight` builds (each one loads
#: its dataset and builds the model once; the space's other dimensions do not change either).
MAX_BUILD_VARIANTS = 16


def _variants(config: Any) -> list[Any]:
    """The base config and one config per value of each ``dataset.*`` and ``model.name`` search
    dimension (a range: its two ends), at most :data:`MAX_BUILD_VARIANTS`.

    The data and the architecture must fit each other: a pairing that cannot work is a config
    error. The model's other hyperparameters (``width``, ``depth``, ``kwargs``...) are the trials':
    a value for which a factory raises fails that trial, recorded with its traceback."""
    out: list[Any] = []
    seen: set[str] = set()

    def add(cfg: Any) -> None:
        key = repr((cfg.dataset.model_dump(mode="json"), cfg.model.model_dump(mode="json")))
        if key not in seen and len(out) < MAX_BUILD_VARIANTS:
            seen.add(key)
            out.append(cfg)

    add(config)
    for name, dim in config.search.space.items():
        if not (name.startswith("dataset.") or name == "model.name"):
            continue
        for value in dim.values if dim.values is not None else [dim.low, dim.high]:
            add(config.with_point({name: value}))
    return out


def check_dataset(cfg: Any) -> Any:
    """Load ``cfg.dataset`` (downloading missing files when allowed) or raise ``ConfigError``."""
    from ..trial.data import cache_dir, load_dataset

    try:
        return load_dataset(cfg.dataset)
    except ConfigError:
        raise
    except Exception as err:  # a failed download, unreadable files, an options error of the loader
        root = cfg.dataset.root or cache_dir() / cfg.dataset.name
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise ConfigError(
            f"dataset.name: {cfg.dataset.name!r} cannot be loaded from {root} ({reason}); put its "
            "files there or let it download (dataset.download: true, network access)"
        ) from None


def check_model(cfg: Any, data: Any) -> int:
    """Build ``cfg.model`` for ``data`` and run a forward pass on two samples; returns its parameter
    count. ``ConfigError`` naming ``model.name`` when either fails or the output is not ``[2, classes]``.

    Built on PyTorch's ``meta`` device first (shapes only: no memory, no arithmetic, so a huge
    width costs nothing); a model that does not run there (a factory doing data-dependent work) is
    built and run on the CPU instead.
    """
    import torch

    from ..trial.models import build_model, count_parameters

    what = (
        f"model.name: {cfg.model.name!r} cannot be built for the dataset's inputs {list(data.input_shape)} "
        f"and {data.num_classes} classes"
    )

    def run(device: str) -> tuple[Any, int]:
        with torch.device(device):
            model = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.seed)
        model.eval()
        with torch.no_grad():
            return model(data.x_train[:2].to(device)), count_parameters(model)

    try:
        try:
            out, params = run("meta")
        except ConfigError:
            raise
        except Exception:
            out, params = run("cpu")
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{what}: {' '.join(f'{type(err).__name__}: {err}'.split())[:300]}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, data.num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{what}: its output for 2 samples is {shape}, not [2, {data.num_classes}]")
    return params


@dataclass
class Built:
    """One (dataset, model) variant that :func:`preflight` loaded and built."""

    dataset: str
    n_train: int
    n_test: int
    input_shape: list[int]
    num_classes: int
    model: str
    num_params: int


def preflight(config: Any, conn: Connections, *, build: bool = True) -> list[Built]:
    """Refuse (``ConfigError``/``ValueError``) what would fail only after the sweep started.

    Args:
        config: the sweep's validated :class:`~sweeps.spec.config.SweepConfig`.
        conn: where it would write (:func:`sweeps.service.connections.resolve`).
        build: also load the dataset and build the model (each ``dataset.*``/``model.name``
            variant of the search space, at most :data:`MAX_BUILD_VARIANTS`); ``False`` when a
            replacement trial function does not use them.

    Returns:
        what was built, one entry per variant (empty without ``build``).
    """
    check_inside(conn.results_dir, written_paths(conn.results_dir, config.name), "--results-dir")
    built = []
    if build:
        for cfg in _variants(config):
            data = check_dataset(cfg)
            params = check_model(cfg, data)
            built.append(
                Built(
                    cfg.dataset.name,
                    data.n_train,
                    data.n_test,
                    list(data.input_shape),
                    data.num_classes,
                    cfg.model.name,
                    params,
                )
            )
    return built


@dataclass
class Plan:
    """What ``sweeps check`` prints (:meth:`lines`)."""

    name: str
    trials: int
    search: str
    populations: str
    resources: str
    built: list[Built] = field(default_factory=list)
    where: dict[str, str] = field(default_factory=dict)
    study: str = ""

    def lines(self) -> list[str]:
        out = [
            f"sweep {self.name}: the config and its stores check out; `sweeps run` would run:",
            f"  trials: {self.trials} ({self.search})",
            f"  populations: {self.populations}",
            f"  resources per task: {self.resources}",
        ]
        for b in self.built:
            out.append(
                f"  data/model: {b.dataset} ({b.n_train} train / {b.n_test} test, inputs {b.input_shape}, "
                f"{b.num_classes} classes) -> {b.model} ({b.num_params:,} parameters)"
            )
        out += [f"  {key}: {value}" for key, value in self.where.items()]
        if self.study:
            out.append(f"  study: {self.study}")
        return out


def _search_text(config: Any, trials: int) -> str:
    from . import search

    if config.search.sampler == "grid":
        sizes = " x ".join(f"{k} {len(v)}" for k, v in search.grid_space(config).items()) or "no dimensions"
        size = search.grid_size(config)
        part = f"; search.n_trials {trials} of the {size} points" if trials < size else ""
        return f"grid: {sizes}{part}"
    dims = ", ".join(config.search.space) or "no dimensions"
    return f"sampler {config.search.sampler} (seed {config.search.seed}) over {dims}"


def _slots(config: Any, max_concurrent: int | None) -> tuple[int, str]:
    limit = max_concurrent or config.resources.max_concurrent
    if limit:
        source = "--max-concurrent" if max_concurrent else "resources.max_concurrent"
        return int(limit), f"at most {limit} tasks in flight ({source})"
    fits = max(1, int((os.cpu_count() or 1) // config.resources.cpus_per_trial))
    return fits, (
        f"as many tasks in flight as the cluster fits ({fits} on this machine's {os.cpu_count()} CPUs with a local Ray)"
    )


def _per_task(size: int) -> str:
    return "one trial per task" if size <= 1 else f"up to {size} trials trained together per task"


def _populations(config: Any, trials: int, slots: int) -> str:
    from ..trial.population import population_key, stack_check
    from .batching import AUTO_POPULATION_CAP

    setting = config.resources.population_size
    if setting == 1:
        return "population_size 1: one trial per task"
    try:
        reason = stack_check(config)
    except Exception as err:
        reason = f"the stack check failed: {type(err).__name__}: {err}"
    if reason is not None:
        return f"one trial per task ({reason})"
    shape_dims, shapes = [], 1
    for name, dim in config.search.space.items():
        values = dim.values if dim.values is not None else [dim.low, dim.high]
        keys = {population_key(config.with_point({name: v})) for v in values}
        if len(keys) > 1:
            shape_dims.append(name)
            shapes *= len(values) if config.search.sampler == "grid" else len(keys)
    cap = AUTO_POPULATION_CAP if setting == "auto" else int(setting)
    if config.search.sampler == "grid":
        per_shape = max(1, trials // shapes) if shape_dims else trials
        size = (
            min(cap, per_shape, math.ceil(trials / slots), math.ceil(per_shape / slots))
            if setting == "auto"
            else min(cap, per_shape)
        )
        split = (
            f"{shapes} shapes ({', '.join(shape_dims)} change the tensor shapes), about {per_shape} trials each"
            if shape_dims
            else f"one shape of {trials} trial{'s' if trials != 1 else ''}"
        )
        return f"{split}; {_per_task(size)} (population_size {setting})"
    varied = f"; trials of equal {', '.join(shape_dims)} train together" if shape_dims else ""
    size = min(cap, math.ceil(trials / slots)) if setting == "auto" else cap
    return f"{_per_task(size)} (population_size {setting}){varied}"


def make_plan(
    config: Any, conn: Connections, *, max_concurrent: int | None = None, built: list[Built] | None = None
) -> Plan:
    """The :class:`Plan` of ``config`` run with the stores ``conn`` (reads the study if it exists)."""
    from . import search

    trials = search.n_trials(config)
    if config.search.sampler == "grid":
        trials = min(trials, search.grid_size(config))
    slots, concurrency = _slots(config, max_concurrent)
    res = config.resources
    resources = f"{res.cpus_per_trial:g} CPU, {res.gpus_per_trial:g} GPU; {concurrency}"
    name = config.name
    where = {
        "results": f"{conn.results_dir} (report: {conn.results_dir / 'reports' / name})",
        "mlflow": redact(conn.tracking_uri)
        + (
            f" (experiment {name}; artifacts {conn.artifact_root}/{name})"
            if conn.artifact_root
            else f" (experiment {name}; artifacts: the server's)"
        ),
        "optuna": f"{redact(conn.storage)} (study {name})",
        "ray": conn.describe()["ray"],
    }
    return Plan(
        name,
        trials,
        _search_text(config, trials),
        _populations(config, trials, slots),
        resources,
        built or [],
        where,
        study_state(config, conn),
    )


def with_launch_options(
    config: Any, *, name: str | None = None, max_concurrent: int | None = None, max_retries: int = 2
) -> Any:
    """``config`` with ``--name`` and ``--max-concurrent`` applied, checked as the config fields they
    override, and ``--max-retries`` checked; ``ConfigError`` naming the flag."""
    if name is not None and name != config.name:
        config = config.with_point({"name": name})
    if max_concurrent is not None:
        try:
            config = config.with_point({"resources.max_concurrent": max_concurrent})
        except ConfigError as err:
            raise ConfigError(
                [
                    f"max_concurrent (--max-concurrent, overrides resources.max_concurrent): {p.split(': ', 1)[-1]}"
                    for p in err.problems
                ]
            ) from None
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(f"max_retries (--max-retries): must be an integer >= 0 (got {max_retries!r})")
    return config


def check_sweep(
    source: Any,
    overrides: Any = (),
    *,
    name: str | None = None,
    results_dir: Any = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    address: str | None = None,
    max_concurrent: int | None = None,
) -> Plan:
    """What ``sweeps check`` does: validate the config (``source``: path, dict or config, with
    ``overrides``), its search, its stores (reachable, database present, name not taken by
    another config), its paths, dataset and model, as ``sweeps run`` would; return the plan.
    Writes nothing (a dataset download fills its own cache folder).

    Raises:
        ConfigError, ValueError (incl. ``StudyConflictError``), ConnectionError: as ``sweeps run``.
    """
    from ..spec.config import SweepConfig, load_config
    from . import search
    from .connections import check_reachable, resolve

    config = source if isinstance(source, SweepConfig) and not overrides else load_config(source, overrides)
    config = with_launch_options(config, name=name, max_concurrent=max_concurrent)
    search.validate_search(config)
    conn = resolve(results_dir=results_dir, tracking_uri=tracking_uri, storage=storage, address=address, create=False)
    check_reachable(conn)
    built = preflight(config, conn)
    return make_plan(config, conn, max_concurrent=max_concurrent, built=built)


def study_state(config: Any, conn: Connections) -> str:
    """``new``, or how far the existing study of the same config is; ``StudyConflictError`` when
    the name is taken by another config (as ``sweeps run`` would refuse). Reads only an existing store."""
    import optuna

    from . import search
    from .connections import journal_path, sqlite_path

    local = journal_path(conn.storage) if conn.is_journal else sqlite_path(conn.storage)
    if local is not None and not local.exists():
        return "new"
    store = search.make_storage(conn.storage)
    names = {s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)}
    if config.name not in names:
        return "new"
    study = optuna.load_study(study_name=config.name, storage=store)
    fingerprint = search.config_fingerprint(config.model_dump(mode="json"))
    if study.user_attrs.get("fingerprint") != fingerprint:
        raise search.StudyConflictError(
            search.name_taken(config.name, conn.storage, study.user_attrs.get("fingerprint"), fingerprint)
        )
    counts = search.status_counts(study)
    done = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no trials yet"
    return f"exists with this config ({done}): `sweeps run` continues it"


__all__ = [
    "MAX_BUILD_VARIANTS",
    "Built",
    "Plan",
    "check_dataset",
    "check_model",
    "check_sweep",
    "make_plan",
    "preflight",
    "study_state",
    "with_launch_options",
]
