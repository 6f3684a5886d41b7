"""One trial: a config (with its point set) -> data, model, training, landscape measures.

:func:`run_trial` is what a sweep worker runs and what ``sweeps trial`` runs locally (no Ray, no
MLflow); :func:`run_population` runs K trials of one shape as one stack (``run_trial`` is K = 1). Divergence is a status, not an exception; errors in the trial's own code propagate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import torch

from landscape.generalization import steps_to_loss

from ..spec.config import SweepConfig
from ..spec.status import TrialStatus
from . import checkpoint as checkpoints
from .data import Dataset, load_dataset
from .models import build_model, count_parameters
from .population import population_key, stack_check
from .train import LOSSES, TrainingRecord, TrainResult, train_population

#: The training loss whose first crossing ``steps_to_loss_<target>`` reports (Jiang et al. 2020's
#: optimization-based measure: optimizer steps from the initialization to cross-entropy 0.1).
STEPS_TO_LOSS_TARGET = 0.1


@dataclass
class TrialResult:
    """The outcome of :func:`run_trial`.

    Attributes:
        status: a :class:`~sweeps.spec.status.TrialStatus`: ``converged``, ``not_converged``
            (``max_epochs`` without reaching the target; measures are still computed),
            ``diverged`` or ``pruned`` (no measures).
        metrics: final scalars: train_loss, train_acc, test_loss, test_acc, gen_gap (test error
            - train error), epochs, steps, train_seconds (tracking included), track_seconds,
            n_train, n_test, num_params, and every measure key with its ``<name>_seconds``;
            ``resumes`` (times training continued from a checkpoint) only when it did.
        history: per-epoch and tracking records in step order, each with ``"step"`` and
            ``"kind"`` (``"epoch"`` or ``"track"``).
        artifacts: files written into ``out_dir``, by name: ``history.json``, ``result.json``,
            ``training.png``, ``init_state.pt`` and ``model.pt`` (state dicts), ``<measure>.npz``
            for non-scalar results (surfaces: alphas, betas, loss, accuracy) and
            ``<measure>.png`` for surfaces and spectra.
        config: the trial's config.
        reason: one line on why training stopped.
    """

    status: TrialStatus
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    artifacts: dict[str, Path]
    config: SweepConfig
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (non-finite floats become ``None``; the config as plain data)."""
        return {
            "status": self.status,
            "reason": self.reason,
            "metrics": _finite(self.metrics),
            "history": [_finite(r) for r in self.history],
            "artifacts": {k: str(p) for k, p in self.artifacts.items()},
            "config": self.config.model_dump(mode="json"),
        }


def _finite(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _cuda_indices(device: str) -> list[int]:
    """CUDA device indices whose RNG state :func:`torch.random.fork_rng` must save/restore."""
    d = torch.device(device)
    if d.type != "cuda":
        return []
    return [d.index if d.index is not None else torch.cuda.current_device()]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def measure_batches(data: Dataset, config: SweepConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training set (or ``measure_subset`` samples of it, seeded by ``config.seed``) as
    in-memory batches of ``train.eval_batch_size`` for :func:`landscape.measure`."""
    x, y = data.x_train, data.y_train
    if config.measure_subset is not None and config.measure_subset < len(y):
        gen = torch.Generator().manual_seed(config.seed + 104729)
        idx = torch.randperm(len(y), generator=gen)[: config.measure_subset].sort().values.to(y.device)
        x, y = x[idx], y[idx]
    size = config.train.eval_batch_size
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def run_trial(
    config: SweepConfig,
    *,
    log: Callable[[dict[str, float], int], None] | None = None,
    out_dir: str | Path | None = None,
    device: str | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrialResult:
    """Train the model of ``config`` to convergence and measure its landscape: a population of
    one (:func:`run_population`).

    Args:
        config: a validated :class:`~sweeps.spec.config.SweepConfig` (its search point already set,
            see :meth:`~sweeps.spec.config.SweepConfig.with_point`).
        log: ``log(metrics, step)`` during training (per epoch and per tracking point), ``step``
            being optimizer steps so far; for live streaming to MLflow.
        out_dir: if given, history, result, plots and arrays are written there.
        device: torch device; default ``"cuda"`` when available, else ``"cpu"``. On CPU the
            trial uses ``resources.cpus_per_trial`` torch threads (restored afterwards).
        checkpoint_dir: if given, the trial checkpoints there and continues from its checkpoint
            (see :func:`run_population`).

    Returns:
        :class:`TrialResult`. Divergence is ``status="diverged"``, not an exception.
    """
    member_log = None if log is None else (lambda _, record: log(record.values, record.step))
    out_dirs = None if out_dir is None else [out_dir]
    result = run_population(
        [config],
        on_result=lambda _, __: None,
        log=member_log,
        out_dirs=out_dirs,
        device=device,
        checkpoint_dir=checkpoint_dir,
    )[0]
    assert result is not None
    return result


def run_population(
    configs: Sequence[SweepConfig],
    *,
    on_result: Callable[[int, TrialResult], None],
    log: Callable[[int, TrainingRecord], None] | None = None,
    out_dirs: Sequence[str | Path] | None = None,
    device: str | None = None,
    on_error: Callable[[int, str], None] | None = None,
    on_trained: Callable[[int, TrainedMember], None] | None = None,
    stop: Callable[[int], str | None] | None = None,
    checkpoint_dir: str | Path | None = None,
) -> list[TrialResult | None]:
    """Train the models of ``configs`` as one population and measure each as it finishes.

    The data is loaded once; member i's model is built and seeded from ``configs[i]`` as
    :func:`run_trial` does. When a member converges, diverges or reaches its max_epochs it
    leaves the stack, then its landscape measures run, its files are written into
    ``out_dirs[i]`` and ``on_result(i, result)`` is called, before the others go on.

    Args:
        configs: trials with one :func:`~sweeps.trial.run.population.population_key`; more than one
            needs a stackable model (:func:`~sweeps.trial.run.population.stack_check`).
        on_result: called once per member, in the order they finish.
        log: ``log(i, record)``: member i's epoch and tracking records
            (:class:`~sweeps.trial.run.train.TrainingRecord`: kind, step, values).
        out_dirs: one folder per member for its files, or ``None``.
        device: as for :func:`run_trial`; threads from ``configs[0].resources.cpus_per_trial``.
        on_error: if given, a member whose measures or files raise is reported as
            ``on_error(i, traceback text)`` (its entry in the returned list is ``None``) and the
            others go on; without it the exception propagates.
        on_trained: if given, a member that has landscape measures to compute is not measured
            here: ``on_trained(i, member)`` gets its :class:`TrainedMember` (for
            :func:`measure_trained`, e.g. in a task of its own) and ``on_result`` is not called
            for it. Members without measures (diverged, pruned, ``measure`` empty) still go to
            ``on_result``.
        stop: ``stop(i)`` after each epoch: a reason to stop member i now (status ``pruned``,
            no measures) or ``None``; see :func:`~sweeps.trial.run.train.train_population`.
        checkpoint_dir: if given (and ``train.checkpoint`` not off), each member checkpoints
            to its file under it (:func:`sweeps.trial.run.checkpoint.checkpoint_path`) and a member with a
            checkpoint there continues from it, exactly. Members whose checkpoints are at
            different positions (none counts as one) train as successive populations, the
            furthest first. Each member's ``log`` first receives its records so far again.

    Returns:
        The members' :class:`TrialResult`, in the order of ``configs`` (``None`` for members
        handed to ``on_trained`` or ``on_error``).

    Raises:
        ValueError: configs with different shape keys, a non-stackable model for K > 1, or
            ``out_dirs`` of another length.
    """
    configs = list(configs)
    keys = [population_key(c) for c in configs]
    for i, key in enumerate(keys[1:], 1):
        if key != keys[0]:
            raise ValueError(
                f"configs[{i}]: its shape key differs from configs[0]'s (dataset, model, shared train fields, resources)"
            )
    if len(configs) > 1 and (reason := stack_check(configs[0])) is not None:
        raise ValueError(f"configs do not stack: {reason}")
    if out_dirs is not None and len(out_dirs) != len(configs):
        raise ValueError(f"out_dirs: need one per config (got {len(out_dirs)} for {len(configs)})")
    device = device or _default_device()
    with _cpu_threads(configs[0].resources.cpus_per_trial if device == "cpu" else None):
        return _run(configs, on_result, log, out_dirs, device, on_error, on_trained, stop, checkpoint_dir)


@contextlib.contextmanager
def _cpu_threads(cpus: float | None) -> Iterator[None]:
    """Use ``cpus`` (rounded, at least 1) intra-op threads for the block; restore after.
    Oversubscribed threads make small-model CPU training many times slower."""
    saved = torch.get_num_threads()
    if cpus is not None:
        torch.set_num_threads(max(1, int(cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _run(
    configs: list[SweepConfig],
    on_result: Callable[[int, TrialResult], None],
    log: Callable[[int, TrainingRecord], None] | None,
    out_dirs: Sequence[str | Path] | None,
    device: str,
    on_error: Callable[[int, str], None] | None,
    on_trained: Callable[[int, TrainedMember], None] | None,
    stop: Callable[[int], str | None] | None,
    checkpoint_dir: str | Path | None,
) -> list[TrialResult | None]:
    data = load_dataset(configs[0].dataset).to(device)
    models = [build_model(c.model, data.input_shape, data.num_classes, seed=c.seed).to(device) for c in configs]
    results: list[TrialResult | None] = [None] * len(configs)

    def finished(i: int, trained: TrainResult) -> None:
        out_dir = None if out_dirs is None else out_dirs[i]
        try:
            if on_trained is not None and _has_measures(configs[i], trained):
                state = {k: v.detach().cpu().clone() for k, v in models[i].state_dict().items()}
                init = {k: v.detach().cpu() for k, v in trained.init_state.items()}
                on_trained(i, TrainedMember(configs[i], dataclasses.replace(trained, init_state=init), state))
                return
            result = _measured(configs[i], data, models[i], trained, out_dir)
            results[i] = result
        except Exception:
            if on_error is None:
                raise
            on_error(i, traceback.format_exc())
            return
        on_result(i, result)

    paths = states = None
    if checkpoint_dir is not None and configs[0].train.checkpoint.enabled:
        paths = [checkpoints.checkpoint_path(checkpoint_dir, c) for c in configs]
        states = [checkpoints.load(p, key=p.stem) for p in paths]
    for group, resume in _by_position(states, len(configs)):
        with torch.random.fork_rng(devices=_cuda_indices(device)):
            torch.manual_seed(configs[group[0]].seed)  # dropout masks (only a population of one has dropout)
            train_population(
                [models[i] for i in group],
                data,
                [configs[i].train for i in group],
                seeds=[configs[i].seed for i in group],
                log=None if log is None else _by_member(group, log),
                on_result=_by_member(group, finished),
                stop=None if stop is None else _by_member(group, stop),
                checkpoint_paths=None if paths is None else [paths[i] for i in group],
                resume=resume,
                compile=configs[0].resources.compile,
            )
    return results


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _by_member(group: list[int], f: Callable[Concatenate[int, _P], _R]) -> Callable[Concatenate[int, _P], _R]:
    """``f`` with the group's member index ``j`` replaced by the population index ``group[j]``."""

    def call(j: int, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return f(group[j], *args, **kwargs)

    return call


def _by_position(
    states: Sequence[dict[str, Any] | None] | None, k: int
) -> list[tuple[list[int], list[dict[str, Any]] | None]]:
    """Members grouped by their checkpoint's position (step, epoch, batch), the furthest first,
    those without one last: ``[(member indices, their checkpoints or None)]``."""
    if states is None or all(s is None for s in states):
        return [(list(range(k)), None)]
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(states):
        groups.setdefault(
            None if s is None else (s["step"], s["epoch"], -1 if s["batch"] is None else s["batch"]), []
        ).append(i)
    order = sorted((key for key in groups if key is not None), reverse=True) + ([None] if None in groups else [])
    return [
        (groups[key], None if key is None else [c for i in groups[key] if (c := states[i]) is not None])
        for key in order
    ]


@dataclass
class TrainedMember:
    """A trained model whose landscape measures are still to compute (see ``on_trained`` of
    :func:`run_population`): plain data, on the CPU, to send to another process.

    Attributes:
        config: the trial's config.
        trained: its training outcome (``init_state`` on the CPU).
        state: the trained model's ``state_dict`` (CPU tensors).
    """

    config: SweepConfig
    trained: TrainResult
    state: dict[str, torch.Tensor]


def measure_trained(
    member: TrainedMember, *, out_dir: str | Path | None = None, device: str | None = None
) -> TrialResult:
    """The measures and files of a member trained elsewhere: the same :class:`TrialResult` that
    :func:`run_population` gives a member measured in place (the data and model are rebuilt
    from the config; the data is cached per process)."""
    config, device = member.config, device or _default_device()
    with _cpu_threads(config.resources.cpus_per_trial if device == "cpu" else None):
        data = load_dataset(config.dataset).to(device)
        model = build_model(config.model, data.input_shape, data.num_classes, seed=config.seed)
        model.load_state_dict(member.state)
        trained = dataclasses.replace(
            member.trained, init_state={k: v.to(device) for k, v in member.trained.init_state.items()}
        )
        return _measured(config, data, model.to(device), trained, out_dir)


def _has_measures(config: SweepConfig, trained: TrainResult) -> bool:
    """Landscape measures are computed for trained models (not diverged or pruned ones):
    :attr:`TrialStatus.measured`, the rule ``sweeps measure`` follows too."""
    return bool(config.measure) and TrialStatus(trained.status).measured


def _measured(
    config: SweepConfig, data: Dataset, model: torch.nn.Module, trained: TrainResult, out_dir: str | Path | None
) -> TrialResult:
    """A trained member's final metrics, landscape measures (not for diverged models) and files."""
    f = trained.final
    metrics: dict[str, float] = {
        **f,
        "gen_gap": (1 - f["test_acc"]) - (1 - f["train_acc"]),
        "epochs": trained.epochs,
        "steps": trained.steps,
        "train_seconds": trained.seconds,
        "track_seconds": trained.track_seconds,
        "n_train": data.n_train,
        "n_test": data.n_test,
        "num_params": count_parameters(model),
    }
    if trained.resumes:
        metrics["resumes"] = trained.resumes
    reached = steps_to_loss(trained.history, STEPS_TO_LOSS_TARGET)
    if math.isfinite(reached):  # a trial that never got there has no value (MLflow would store inf as 1.8e308)
        metrics[f"steps_to_loss_{STEPS_TO_LOSS_TARGET:g}"] = reached
    results: dict[str, Any] = {}
    if _has_measures(config, trained):
        from landscape.metrics import measure

        metrics.update(
            measure(
                model,
                LOSSES[config.train.loss],
                measure_batches(data, config),
                config.measure,
                seed=config.seed,
                options=config.measure_options,
                init_state=trained.init_state,
                artifacts=results,
            )
        )
    metrics = {k: float(v) for k, v in metrics.items()}
    result = TrialResult(trained.status, metrics, trained.history, {}, config, trained.reason)
    if out_dir is not None:
        result.artifacts = write_artifacts(Path(out_dir), result, results, trained, model)
    return result


# --- files -----------------------------------------------------------------------------------
def _arrays(obj: Any) -> dict[str, np.ndarray]:
    """Numeric fields of a result dataclass as numpy arrays (tensors moved to CPU)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, (np.ndarray, int, float, np.floating)) and not isinstance(value, bool):
            out[f.name] = np.asarray(value)
    return out


def _plot_training(history: list[dict[str, Any]]) -> Any:
    """Loss and accuracy curves (and tracked lambda_max against its stability threshold)."""
    from matplotlib.figure import Figure

    epochs = [r for r in history if r["kind"] == "epoch"]
    tracks = [r for r in history if r["kind"] == "track" and "hessian_top_eig" in r]
    fig = Figure(figsize=(13 if tracks else 9, 3.5))
    axes = fig.subplots(1, 3 if tracks else 2)
    steps = [r["step"] for r in epochs]
    for ax, key in zip(axes, ("loss", "acc")):
        for split in ("train", "test"):
            ax.plot(steps, [r[f"{split}_{key}"] for r in epochs], label=split)
        ax.set(xlabel="step", ylabel=key, yscale="log" if key == "loss" else "linear")
        ax.legend()
    if tracks:
        ax = axes[2]
        ax.plot([r["step"] for r in tracks], [r["hessian_top_eig"] for r in tracks], label="lambda_max (subset)")
        if "eos_ratio" in tracks[0]:
            ax.plot(
                [r["step"] for r in tracks],
                [r["hessian_top_eig"] / r["eos_ratio"] for r in tracks],
                "--",
                label="(2 + 2 momentum) / lr",
            )
        ax.set(xlabel="step", ylabel="top Hessian eigenvalue")
        ax.legend()
    fig.tight_layout()
    return fig


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def _measure_files(name: str, value: Any, out_dir: Path) -> dict[str, Path]:
    """Arrays (``.npz``) and figures (``.png``, via :mod:`landscape.plots`) of one non-scalar
    result: a surface measure's 2D surface, a spectrum, or any result dataclass's arrays."""
    from landscape import plots
    from landscape.surface import Surface2D

    files: dict[str, Path] = {}
    surfaces = [s for s in getattr(value, "surfaces", []) if isinstance(s, Surface2D)]
    if surfaces:
        surface = surfaces[0]
        files[f"{name}.npz"] = out_dir / f"{name}.npz"
        acc: dict[str, Any] = {} if surface.accuracy is None else {"accuracy": surface.accuracy}
        np.savez(
            files[f"{name}.npz"],
            alphas=surface.alphas,
            betas=surface.betas,
            loss=surface.loss,
            center_loss=surface.center_loss,
            **acc,
        )
        files[f"{name}.png"] = out_dir / f"{name}.png"
        _save_figure(plots.plot_surface_2d(surface, title=name), files[f"{name}.png"])
        return files
    if dataclasses.is_dataclass(value):
        arrays: dict[str, Any] = _arrays(value)
        if arrays:
            files[f"{name}.npz"] = out_dir / f"{name}.npz"
            np.savez(files[f"{name}.npz"], **arrays)
    if hasattr(value, "grid") and hasattr(value, "density"):
        files[f"{name}.png"] = out_dir / f"{name}.png"
        _save_figure(plots.plot_spectrum(value, title=name), files[f"{name}.png"])
    return files


def write_artifacts(
    out_dir: Path, result: TrialResult, measured: dict[str, Any], trained: TrainResult, model: torch.nn.Module
) -> dict[str, Path]:
    """Write history/result JSON, the training figure, the initial and final weights
    (``init_state.pt``, ``model.pt``: state dicts), and arrays + figures of non-scalar measures
    into ``out_dir``; return ``{name: path}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["history.json"] = out_dir / "history.json"
    files["history.json"].write_text(json.dumps([_finite(r) for r in result.history], indent=1))
    files["training.png"] = out_dir / "training.png"
    _save_figure(_plot_training(result.history), files["training.png"])
    for name, state in (("init_state.pt", trained.init_state), ("model.pt", model.state_dict())):
        files[name] = out_dir / name
        torch.save({k: v.detach().cpu() for k, v in state.items()}, files[name])
    for name, value in measured.items():
        files.update(_measure_files(name, value, out_dir))
    files["result.json"] = out_dir / "result.json"
    result.artifacts = files
    files["result.json"].write_text(json.dumps(result.to_dict(), indent=1))
    return files
