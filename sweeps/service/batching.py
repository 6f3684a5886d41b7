"""Which trials train together: the driver's queue of asked points, handed out as populations.

The driver asks Optuna for points ahead of launching them, and launches the points that share a
:func:`~sweeps.trial.population.population_key` as one Ray task (one population). This module holds
the asked-but-not-launched trials and decides what to ask next:

* **grid**: the grid's remaining points are computed once, when the driver starts (every point
  minus those of finished trials and of trials waiting to be re-run), shuffled with
  ``search.seed`` and grouped by shape, so a population is filled from one shape at a time. A
  point becomes a RUNNING trial in one storage transaction (:func:`sweeps.service.search.start_trial`, as
  an enqueued and asked trial would be): the grid sampler never rescans the study, and the grid
  stays complete and without repeats (each remaining point is started once; re-enqueued points
  of interrupted trials are asked before new ones).
* **other samplers** (random, TPE, CMA-ES, NSGA-II): up to a population's worth of points is
  asked at once and grouped by shape; points of another shape wait for the next population.

Points asked but not launched are RUNNING trials in Optuna: if the driver dies, the next one
recovers them like any trial it left running.

Population size: ``resources.population_size`` (an integer), or ``auto`` (the default): the
trials left divided by the free task slots, at most :data:`AUTO_POPULATION_CAP`, so every task
slot gets work and a population is as large as the sweep allows; on a grid, ``auto`` also splits
each shape's points over the task slots (a shape of 9 points on 2 slots: populations of 5 and 4),
so that the most expensive shape does not train on one CPU while the others idle. A population
of one is the same code path.
"""

from __future__ import annotations

import itertools
import math
import random
import traceback
from collections import defaultdict, deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from ..trial.population import population_key, stack_check
from . import search

#: Largest population ``auto`` forms. The population benchmark (benchmarks/population.md) gains
#: little past 16 members for the MLP widths of the examples, while larger populations delay
#: each member's result and make a lost worker cost more trials.
AUTO_POPULATION_CAP = 16


@dataclass
class AskedTrial:
    """A trial asked from Optuna, not launched yet.

    Attributes:
        trial: the Optuna trial (RUNNING).
        point: ``{dotted key: value}``.
        config: the trial's config, or ``None`` when the point does not validate (``error``).
        key: its population key (``None`` with ``error``).
        error: the traceback of an invalid point.
    """

    trial: optuna.Trial
    point: dict[str, Any]
    config: Any = None
    key: Hashable | None = None
    error: str | None = None


class PointQueue:
    """The sweep's next trials, asked from ``study`` and handed out one population at a time.

    Args:
        study: the sweep's study (its sampler built by :func:`sweeps.service.search.build_sampler`).
        config: the sweep's config.
        slots: task slots of the sweep: with ``resources.population_size: auto`` a grid shape's
            points are split into at least this many populations.
    """

    def __init__(self, study: optuna.Study, config: Any, slots: int = 1) -> None:
        self.study, self.config = study, config
        self.split = slots if config.resources.population_size == "auto" else 1
        self._shape_dims: list[str] = []
        self._shape_total: dict[Hashable, int] = {}
        self.pending: list[AskedTrial] = []
        self._stackable: dict[Hashable, str | None] = {}
        self._grid: dict[Hashable, deque[dict[str, Any]]] | None = None
        # Points re-enqueued for trials a stopped driver left are asked first, in their order.
        for _ in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            self.pending.append(self._ask())
        if config.search.sampler == "grid":
            self._distributions = search.grid_distributions(config)
            self._grid = self._remaining_grid()

    # -- asking -----------------------------------------------------------------------------
    def _ask(self, point: Mapping[str, Any] | None = None) -> AskedTrial:
        """Start one trial: at ``point`` (a grid point, written directly: :func:`sweeps.service.search.start_trial`),
        or asked from the sampler (a re-enqueued point first) and its point read back."""
        if point is not None:
            asked = AskedTrial(search.start_trial(self.study, point, self._distributions), dict(point))
        else:
            trial = self.study.ask()
            asked = AskedTrial(trial, search.suggest_point(trial, self.config))
        try:
            asked.config = self.config.with_point(asked.point)
        except ValueError:
            asked.error = traceback.format_exc()
            return asked
        asked.key = population_key(asked.config)
        return asked

    def _remaining_grid(self) -> dict[Hashable, deque[dict[str, Any]]]:
        """Grid points not finished and not pending, shuffled by ``search.seed``, grouped by shape."""
        space = search.grid_space(self.config)
        names = list(space)
        taken = {tuple(t.params.get(n) for n in names) for t in search.finished_trials(self.study)}
        taken |= {tuple(a.point.get(n) for n in names) for a in self.pending}
        points = [p for p in itertools.product(*space.values()) if p not in taken]
        random.Random(self.config.search.seed).shuffle(points)
        self._shape_dims = self._find_shape_dims(space)
        grid: dict[Hashable, deque[dict[str, Any]]] = defaultdict(deque)
        for values in points:
            point = dict(zip(names, values))
            grid[self._shape_of(point)].append(point)
        self._shape_total = {shape: len(queue) for shape, queue in grid.items()}
        return grid

    def _shape_of(self, point: Mapping[str, Any]) -> Hashable:
        return tuple(point.get(d) for d in self._shape_dims)

    def _split_size(self, asked: AskedTrial) -> int:
        """The largest population for ``asked``'s grid shape: its points over :attr:`split`."""
        total = self._shape_total.get(self._shape_of(asked.point)) if self._grid is not None else None
        return math.ceil(total / self.split) if total else AUTO_POPULATION_CAP

    def _find_shape_dims(self, space: Mapping[str, list[Any]]) -> list[str]:
        """The search dimensions that change the population key (probed value by value)."""
        dims = []
        for name, values in space.items():
            keys = set()
            for value in values:
                try:
                    keys.add(population_key(self.config.with_point({name: value})))
                except ValueError:  # an invalid value fails its own trial; it cannot group
                    keys.add(("invalid", name, repr(value)))
            if len(keys) > 1:
                dims.append(name)
        return dims

    # -- handing out ----------------------------------------------------------------------------
    def remaining(self) -> int | None:
        """Grid points not asked yet (``None`` for other samplers)."""
        return None if self._grid is None else sum(len(q) for q in self._grid.values())

    def stack_reason(self, asked: AskedTrial) -> str | None:
        """Why ``asked`` cannot share a task with others (``None``: it can); cached per shape."""
        if asked.key not in self._stackable:
            try:
                self._stackable[asked.key] = stack_check(asked.config)
            except Exception as err:  # e.g. a factory that raises: the trial's own task records it
                self._stackable[asked.key] = f"the stack check failed: {type(err).__name__}: {err}"
        return self._stackable[asked.key]

    def take(self, size: int, can_ask: int) -> list[AskedTrial]:
        """Up to ``size`` trials of one shape (a trial with an invalid point comes alone).

        Asks at most ``can_ask`` new trials (the budget left); pending trials come first.
        """
        if not self.pending and can_ask > 0:
            self._ask_more(size, can_ask)
            can_ask -= len(self.pending)
        if not self.pending:
            return []
        first = self.pending[0]
        size = min(size, self._split_size(first))
        if first.error is not None or size <= 1 or self.stack_reason(first) is not None:
            return [self.pending.pop(0)]
        group = [a for a in self.pending if a.key == first.key][:size]
        if len(group) < size and can_ask > 0 and self._grid is not None:
            more = self._take_grid(first.key, min(size - len(group), can_ask))
            self.pending += more
            group += [a for a in more if a.key == first.key]
        chosen = {id(a) for a in group}
        self.pending = [a for a in self.pending if id(a) not in chosen]
        return group

    def _ask_more(self, size: int, can_ask: int) -> None:
        if self._grid is None:
            self.pending += [self._ask() for _ in range(min(size, can_ask))]
            return
        for shape in list(self._grid):
            if self._grid[shape]:
                split = math.ceil(self._shape_total[shape] / self.split)
                self.pending += self._take_grid_shape(shape, min(size, can_ask, split))
                return

    def _take_grid(self, key: Hashable, n: int) -> list[AskedTrial]:
        """Ask up to ``n`` remaining grid points whose population key is ``key``."""
        assert self._grid is not None
        for shape, points in self._grid.items():
            if points and population_key(self.config.with_point(points[0])) == key:
                return self._take_grid_shape(shape, n)
        return []

    def _take_grid_shape(self, shape: Hashable, n: int) -> list[AskedTrial]:
        assert self._grid is not None
        points = self._grid[shape]
        return [self._ask(points.popleft()) for _ in range(min(n, len(points)))]


def population_size(setting: int | str, left: int, slots: int) -> int:
    """Members per task: ``setting`` if an integer, else (``auto``) the trials ``left`` spread over
    the task ``slots``, at most :data:`AUTO_POPULATION_CAP`; at least 1."""
    if setting != "auto":
        return max(1, int(setting))
    return max(1, min(AUTO_POPULATION_CAP, math.ceil(left / max(1, slots))))


__all__ = ["AUTO_POPULATION_CAP", "AskedTrial", "PointQueue", "population_size"]
