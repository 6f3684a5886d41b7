"""sweeps.service.batching.PointQueue: every grid point handed out once, grouped by shape, and auto
populations split each shape over the task slots."""

from __future__ import annotations

import itertools

import pytest

from sweeps.service import search
from sweeps.service.batching import PointQueue, population_size
from sweeps.spec.config import load_config


def grid_config(population_size="auto"):
    space = {
        "model.width": {"values": [8, 16]},
        "train.lr": {"values": [0.05, 0.1, 0.2]},
        "seed": {"values": [0, 1, 2]},
    }
    return load_config(
        {
            "name": "split",
            "dataset": {"name": "digits", "train_size": 64},
            "model": {"name": "mlp", "width": 8},
            "train": {"max_epochs": 1},
            "measure": [],
            "search": {"sampler": "grid", "space": space},
            "resources": {"population_size": population_size},
        }
    )


@pytest.mark.parametrize(
    ("setting", "slots", "sizes"),
    [("auto", 2, [5, 4, 5, 4]), ("auto", 1, [9, 9]), ("auto", 4, [3, 3, 3, 3, 3, 3]), (4, 2, [4, 4, 1, 4, 4, 1])],
)
def test_auto_populations_split_each_shape_over_the_slots(tmp_path, setting, slots, sizes):
    config = grid_config(setting)
    study = search.open_study(config, f"sqlite:///{tmp_path / 'optuna.db'}", resume=False)
    queue = PointQueue(study, config, slots=slots)
    groups, left = [], 18
    while left:
        group = queue.take(population_size(config.resources.population_size, left, 1), left - len(queue.pending))
        assert len({a.key for a in group}) == 1  # one shape per population
        groups.append(group)
        left -= len(group)
    assert [len(g) for g in groups] == sizes
    points = [(a.point["model.width"], a.point["train.lr"], a.point["seed"]) for g in groups for a in g]
    assert sorted(points) == sorted(itertools.product([8, 16], [0.05, 0.1, 0.2], [0, 1, 2]))  # each exactly once


def test_a_shape_that_does_not_stack_is_handed_out_one_trial_at_a_time(tmp_path):
    config = load_config(
        {
            "name": "bn",
            "dataset": {"name": "digits", "train_size": 64},
            "model": {"name": "mlp", "width": 8, "batch_norm": True},
            "train": {"max_epochs": 1},
            "measure": [],
            "search": {"sampler": "grid", "space": {"train.lr": {"values": [0.05, 0.1, 0.2]}}},
        }
    )
    study = search.open_study(config, f"sqlite:///{tmp_path / 'optuna.db'}", resume=False)
    queue = PointQueue(study, config, slots=1)
    groups = [queue.take(population_size("auto", left, 1), left - len(queue.pending)) for left in (3, 2, 1)]
    assert [len(g) for g in groups] == [1, 1, 1]  # auto would give one population of 3
    assert sorted(g[0].point["train.lr"] for g in groups) == [0.05, 0.1, 0.2]
    assert "batch norm" in queue.stack_reason(groups[0][0])  # the reason the driver logs once for the shape
