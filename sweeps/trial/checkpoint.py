"""Trial checkpoints: the state a training trial needs to continue exactly where it was.

A trial (each member of a population) saves, while it trains, everything its next step depends
on (:func:`sweeps.trial.train.train_population` builds it): the parameters, the optimizer state
(momentum buffer, Adam moments and step count; the schedule is a function of the step), the
model's buffers (batch-norm statistics), every random stream it draws from (its data-order
generator and the position inside the current epoch's order, the global torch generator that
draws dropout masks, the CUDA generator on a GPU), the epoch and step, its history (epoch and
tracking records), the tracker's warm-start eigenvector, and the state of its stop rules
(initial loss for divergence, the running mini-batch loss, the latest full evaluation). Label
noise and the tracking subset are drawn from fixed seeds when the data is loaded, so they need no
state. A trial continued from its checkpoint ends with the same parameters, metrics and measures,
bit for bit on a CPU, as the same trial never interrupted (``tests/test_checkpoint.py``).

Where: ``<checkpoint dir>/<sweep name>/<trial key>.pt``, one file per trial, only the latest
(written to a temporary file in the same folder, flushed to disk, then renamed over the previous
one: a crash mid-write leaves the previous checkpoint whole). The checkpoint dir is
``$SWEEPS_CHECKPOINT_DIR``, else ``<results dir>/checkpoints``
(:class:`sweeps.service.connections.Connections`); on a cluster it must be a folder every node and the
driver mount at the same path (NFS, EFS, a shared PVC). Workers write there, not to MLflow: a
worker never needs the tracking server or its credentials (see :mod:`sweeps.runner`), and a file
system gives the atomic rename that keeps one valid latest checkpoint.

Which: the trial key is a hash of the trial's config (its point applied) without ``resources``
(a trial may move to other hardware), ``search`` (the sweep may be extended) and
``train.checkpoint`` (the cadence changes no number). Whoever runs the trial again (the driver's
retry after a lost worker, the re-run of an interrupted trial after ``sweeps resume``, a
population re-launched with its unrecorded members) finds its checkpoint from the config alone.
Trials with equal configs are one computation and share one checkpoint.

When removed: when the driver has recorded the trial (whatever its status: a recorded trial is
never run again), and the sweep's folder when the sweep completes. An interrupted trial's
checkpoint is kept for its re-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

#: Version of the checkpoint's layout; a file of another version is ignored (the trial starts over).
FORMAT = 1
#: The checkpoint folder under the results directory when ``$SWEEPS_CHECKPOINT_DIR`` is not set.
DIRECTORY = "checkpoints"
ENV = "SWEEPS_CHECKPOINT_DIR"

log = logging.getLogger(__name__)

# Config sections that do not change a trial's numbers (see the module docstring).
_KEY_EXCLUDES = (("resources",), ("search",), ("train", "checkpoint"))


def trial_key(config: Any) -> str:
    """The identity of a trial's training: 24 hex digits of the SHA-256 of its config (a
    :class:`~sweeps.spec.config.SweepConfig` with its point set) without ``resources``, ``search`` and
    ``train.checkpoint``."""
    data = config.model_dump(mode="json")
    for path in _KEY_EXCLUDES:
        node = data
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def _folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def sweep_folder(root: str | Path, name: str) -> Path:
    """The folder of the sweep ``name``'s checkpoints under ``root``."""
    return Path(root) / _folder_name(name)


def checkpoint_path(root: str | Path, config: Any) -> Path:
    """Where the trial of ``config`` keeps its latest checkpoint under ``root``."""
    return sweep_folder(root, config.name) / f"{trial_key(config)}.pt"


def save(path: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed to
    disk (``fsync``), renamed over ``path``, the folder synced; a crash at any point leaves the
    previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({**state, "format": FORMAT}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _quiet():
            os.unlink(tmp)
        raise
    with _quiet():  # the rename itself reaches the disk (POSIX; not possible on every file system)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load(path: Path, key: str | None = None) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or ``None`` when there is none, it is unreadable, of another
    :data:`FORMAT`, or (given ``key``) of another trial; the reason is logged as a warning (the
    trial then starts from the beginning)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a foreign or damaged file: training from scratch is always correct
        log.warning("checkpoint %s unreadable (%s: %s); the trial starts over", path, type(err).__name__, err)
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or (key is not None and state.get("key") != key):
        log.warning("checkpoint %s is of another format or trial; the trial starts over", path)
        return None
    return state


def discard(root: str | Path | None, config: Any) -> None:
    """Remove the checkpoint of the trial of ``config`` (nothing when there is none)."""
    if root is not None:
        with _quiet():
            checkpoint_path(root, config).unlink()


def discard_sweep(root: str | Path | None, name: str) -> None:
    """Remove the folder of the sweep ``name``'s checkpoints (nothing when there is none)."""
    if root is not None:
        shutil.rmtree(sweep_folder(root, name), ignore_errors=True)


class Cadence:
    """When a population checkpoints (``cfg``: a :class:`~sweeps.spec.config.CheckpointConfig`): at the end of
    every ``every_epochs``-th epoch, and after any step once ``every_seconds`` have passed since
    the last checkpoint (or the start). ``paths`` is one file per member (by index), or ``None``:
    no checkpoints."""

    def __init__(self, cfg: Any, paths: Sequence[Path] | None):
        self.every_epochs, self.every_seconds = cfg.every_epochs, cfg.every_seconds
        self.paths = list(paths) if paths is not None and cfg.enabled else None
        self.last = time.monotonic()
        self.seconds, self.count = 0.0, 0  # time spent writing, checkpoints written

    def due(self, epoch: int, epoch_end: bool) -> bool:
        if self.paths is None:
            return False
        if epoch_end and self.every_epochs and epoch % self.every_epochs == 0:
            return True
        return self.every_seconds > 0 and time.monotonic() - self.last >= self.every_seconds

    def saved(self, seconds: float) -> None:
        self.last = time.monotonic()
        self.seconds += seconds
        self.count += 1

    def restored(self, epoch: int) -> None:
        self.last = time.monotonic()


def capture(pop: Any, epoch: int, batch: int | None, orders: torch.Tensor | None) -> None:
    """Checkpoint every live member of ``pop`` (the loop of :func:`sweeps.trial.train.train_population`):
    after ``epoch`` (``batch`` None), or inside ``epoch`` before its batch ``batch``, with the
    epoch's data ``orders`` ``[K, n]``. A write that fails is logged and ends checkpoints for
    ``pop`` (the trial trains on)."""
    started = time.perf_counter()
    shared: dict[str, Any] = {
        "epoch": epoch,
        "batch": batch,
        "step": pop.step,
        "elapsed": started - pop.start,
        "rng": torch.get_rng_state(),
    }
    device = pop.stack.params.flat.device
    if device.type == "cuda":
        shared["cuda_rng"] = torch.cuda.get_rng_state(device)
    opt = pop.stack.optimizer.state
    for row, m in enumerate(pop.live):
        path = pop.saver.paths[m.index]
        member = {
            "params": pop.stack.params.flat[row].detach().cpu().clone(),
            "optimizer": {k: v[row].detach().cpu().clone() for k, v in opt.items()},
            "buffers": {n: b.detach().cpu().clone() for n, b in m.model.named_buffers()},
            "gen": m.gen.get_state(),
            "order": None if orders is None else orders[row].cpu().clone(),
            "v0": None if m.tracker.v0 is None else m.tracker.v0.detach().cpu().clone(),
            "track_seconds": m.tracker.seconds,
            "history": m.history,
            "init_state": {k: v.detach().cpu() for k, v in m.init_state.items()},
            "init_loss": m.init_loss,
            "running": m.running,
            "latest": m.latest,
            "checked": m.checked,
            "resumes": m.resumes,
        }
        try:
            save(path, {**shared, "key": path.stem, "member": member})
        except OSError as err:  # a full or unmounted disk must not fail the trial: train on without
            log.warning(
                "checkpoint %s not written (%s: %s); checkpoints off for this task", path, type(err).__name__, err
            )
            pop.saver.paths = None
            return
    pop.saver.saved(time.perf_counter() - started)


def restore(pop: Any, states: Sequence[dict[str, Any]]) -> None:
    """Make ``pop`` continue from ``states`` (one per member, all at one position; see :func:`capture`)."""
    first = states[0]
    if any((s["epoch"], s["batch"], s["step"]) != (first["epoch"], first["batch"], first["step"]) for s in states):
        raise ValueError("checkpoints of one population must be at one position (epoch, batch, step)")
    flat = pop.stack.params.flat
    with torch.no_grad():
        flat.copy_(torch.stack([s["member"]["params"] for s in states]).to(flat))
    pop.stack.optimizer.state = {
        k: torch.stack([s["member"]["optimizer"][k] for s in states]).to(flat) for k in first["member"]["optimizer"]
    }
    pop.stack.optimizer.steps = pop.step = first["step"]
    for m, s in zip(pop.live, states):
        saved = s["member"]
        with torch.no_grad():
            for name, buffer in m.model.named_buffers():
                buffer.copy_(saved["buffers"][name])
        m.gen.set_state(saved["gen"])
        m.tracker.v0 = None if saved["v0"] is None else saved["v0"].to(flat)
        m.tracker.seconds = saved["track_seconds"]
        m.history = list(saved["history"])
        m.init_state = {k: v.to(flat.device) for k, v in saved["init_state"].items()}
        m.init_loss, m.running, m.latest, m.checked = (
            saved["init_loss"],
            saved["running"],
            saved["latest"],
            saved["checked"],
        )
        m.resumes = saved["resumes"] + 1
    torch.set_rng_state(first["rng"])
    if "cuda_rng" in first and flat.device.type == "cuda":
        torch.cuda.set_rng_state(first["cuda_rng"], flat.device)
    pop.start = time.perf_counter() - first["elapsed"]
    orders = None
    if first["batch"] is not None:
        orders = torch.stack([s["member"]["order"] for s in states]).to(pop.data.y_train.device)
    pop.resumed = (first["epoch"], first["batch"], orders)
    pop.saver.restored(first["epoch"])


class Cleaner:
    """An observer of the driver's loop (``add`` / ``poll`` / ``close``): removes the checkpoint of
    each trial the moment it is recorded (told), whatever its status. ``config`` is the sweep's
    config; a trial's is ``config.with_point(point)``."""

    def __init__(self, root: str | Path | None, config: Any) -> None:
        self.root, self.config = root, config

    def add(self, number: int, status: str, point: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        if self.root is not None:
            discard(self.root, self.config.with_point(dict(point)))

    def poll(self) -> None:
        return None

    def close(self) -> None:
        return None


class _quiet:
    """Ignore ``OSError`` (a file already gone, a file system without directory fsync)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, OSError)


__all__ = [
    "DIRECTORY",
    "ENV",
    "FORMAT",
    "Cadence",
    "Cleaner",
    "capture",
    "checkpoint_path",
    "discard",
    "discard_sweep",
    "load",
    "restore",
    "save",
    "sweep_folder",
    "trial_key",
]
