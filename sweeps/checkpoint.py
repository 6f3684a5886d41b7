"""Trial checkpoints: the state a training trial needs to continue exactly where it was.

A trial (each member of a population) saves, while it trains, everything its next step depends
on (:func:`sweeps.train.train_population` builds it): the parameters, the optimizer state
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
(:class:`sweeps.connections.Connections`); on a cluster it must be a folder every node and the
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
from collections.abc import Mapping
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
    :class:`~sweeps.config.SweepConfig` with its point set) without ``resources``, ``search`` and
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


__all__ = ["DIRECTORY", "ENV", "FORMAT", "Cleaner", "checkpoint_path", "discard", "discard_sweep", "load", "save",
           "sweep_folder", "trial_key"]
