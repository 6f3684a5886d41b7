"""sweeps.spec.config: schema, overrides, field-level error messages, points, flattening."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from sweeps.spec.config import ConfigError, Dim, SweepConfig, load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"

BASE = {
    "name": "mnist1d-lr-bs-width",
    "dataset": {"name": "mnist1d", "train_size": 4000, "label_noise": 0.0, "seed": 0},
    "model": {"name": "mlp", "depth": 2, "width": 256, "activation": "relu"},
    "train": {
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "batch_size": 128,
        "schedule": "constant",
        "loss": "cross_entropy",
        "max_epochs": 300,
        "stop": {"train_loss": 0.01},
        "track": {"every_steps": 50, "metrics": ["hessian_top_eig"]},
    },
    "measure": ["hessian_top_eig", "hessian_trace", "adaptive_sharpness_worst", "pacbayes_mag_flatness"],
    "search": {
        "sampler": "grid",
        "n_trials": 24,
        "space": {
            "train.lr": {"values": [0.005, 0.05, 0.2]},
            "train.batch_size": {"values": [32, 128, 512]},
            "model.width": {"values": [64, 256]},
            "seed": {"values": [0, 1]},
        },
    },
    "objective": {"metric": "test_acc", "direction": "maximize"},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 2},
}


def errors_of(data: dict, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(data, overrides)
    return str(info.value)


def test_spec_config_loads_with_normalized_fields():
    cfg = load_config(BASE)
    assert cfg.train.batch_size == 128 and cfg.train.stop.train_loss == 0.01
    assert cfg.objective.metrics == ["test_acc"] and cfg.objective.directions == ["maximize"]
    assert isinstance(cfg.resources.cpus_per_trial, float) and cfg.resources.max_concurrent == 2
    assert cfg.search.space["train.lr"].values == [0.005, 0.05, 0.2]
    assert cfg.search.n_trials == 24 and cfg.search.seed == 0


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path):
    cfg = load_config(path)
    assert cfg.name and cfg.search.space
    for key, dim in cfg.search.space.items():  # every grid point is a valid trial config
        for value in dim.grid():
            assert cfg.with_point({key: value}).model_dump()  # no error


def test_yaml_file_and_overrides_parse_values_as_yaml(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(path, ["train.lr=0.1", "model.width=64", "train.batch_size=full", "measure=[hessian_trace]"])
    assert cfg.train.lr == 0.1 and cfg.model.width == 64 and cfg.train.batch_size == "full"
    assert cfg.measure == ["hessian_trace"]
    assert load_config(str(path)).train.lr == 0.05  # the file itself is untouched


def test_defaults_fill_a_minimal_config():
    cfg = load_config({"name": "x"})
    assert cfg.dataset.name == "mnist1d" and cfg.model.name == "mlp" and cfg.train.optimizer == "sgd"
    assert cfg.train.stop.train_loss == 0.01 and cfg.train.track.subset == 512 and cfg.seed == 0


def _mutate(path: str, value):
    def apply(data):
        *parents, last = path.split("/")
        node = data
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value

    return apply


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            _mutate("train/optimzer", "sgd"),
            "train.optimzer: unknown key (did you mean 'optimizer'?); allowed keys: optimizer,",
        ),
        (_mutate("colour", 1), "colour: unknown key"),
        (_mutate("train/lr", "fast"), "train.lr: must be a number (got 'fast')"),
        (_mutate("train/lr", -0.1), "train.lr: must be > 0"),
        (_mutate("train/max_epochs", 2.5), "train.max_epochs: must be an integer (got 2.5)"),
        (_mutate("train/momentum", 1.0), "train.momentum: must be < 1"),
        (_mutate("train/batch_size", "fulll"), "train.batch_size: must be a positive integer or 'full' (got 'fulll')"),
        (
            _mutate("train/optimizer", "rmsprop"),
            "train.optimizer: must be one of 'sgd', 'adam' or 'adamw' (got 'rmsprop')",
        ),
        (_mutate("dataset/label_noise", 1.5), "dataset.label_noise: must be < 1"),
        (
            _mutate("measure", ["hessian_trace", "hesian_top_eig"]),
            "measure.1: unknown metric 'hesian_top_eig' (did you mean 'hessian_top_eig'?)",
        ),
        (_mutate("train/track/metrics", ["sharpnes"]), "train.track.metrics.0: unknown metric 'sharpnes'"),
        (_mutate("dataset/name", "imagenet"), "dataset.name: unknown dataset 'imagenet'; known datasets:"),
        (_mutate("model/name", "transformer"), "model.name: unknown model 'transformer'; known models:"),
        (_mutate("model/name", "no_such_pkg.mod:build"), "model.name: cannot import module 'no_such_pkg.mod'"),
        (_mutate("model/activation", "swish"), "model.activation: must be one of"),
        (_mutate("search/space/trian.lr", {"values": [1]}), "search.space.trian.lr: not a config field"),
        (
            _mutate("search/space/train.lr", {"low": -0.1, "high": 0.2, "log": True}),
            "search.space.train.lr.low: must be > 0 for log: true (got -0.1)",
        ),
        (
            _mutate("search/space/train.lr", {"low": 0.2, "high": 0.1, "values": None}),
            "search.space.train.lr: low must be < high",
        ),
        (
            _mutate("search/space/train.lr", {"values": [0.1], "low": 0.1}),
            "search.space.train.lr: give either values or low/high",
        ),
        (
            _mutate("search/space/train.lr", {"low": 0.01, "high": 0.1}),
            "search.space.train.lr: the grid sampler needs values",
        ),
        (
            _mutate("search/space/train.batch_size", {"values": [32, 0]}),
            "search.space.train.batch_size: value 0 is invalid: train.batch_size: must be a positive integer",
        ),
        (
            _mutate("search/space/model.width", {"values": ["wide"]}),
            "search.space.model.width: value 'wide' is invalid: model.width: must be an integer",
        ),
        (_mutate("search/sampler", "annealing"), "search.sampler: must be one of"),
        (_mutate("objective", {"metric": "tset_acc"}), "objective.metrics.0: 'tset_acc' is not a trial result"),
        (
            _mutate("objective", {"metric": ["test_acc", "hessian_trace"], "direction": ["maximize"] * 3}),
            "objective: metric and direction lists differ in length",
        ),
        (
            _mutate("objective", {"metric": "test_acc", "direction": "up"}),
            "objective.directions.0: must be one of 'maximize' or 'minimize' (got 'up')",
        ),
        (_mutate("resources/cpus_per_trial", 0), "resources.cpus_per_trial: must be > 0"),
        (
            _mutate("resources/population_size", 0),
            "resources.population_size: must be a positive integer or 'auto' (got 0)",
        ),
        (
            _mutate("resources/population_size", "max"),
            "resources.population_size: must be a positive integer or 'auto' (got 'max')",
        ),
        (
            _mutate("resources/compile", "always"),
            "resources.compile: must be auto, true or false (got 'always')",
        ),
        (
            _mutate("train/stop", {"train_loss": 0.01, "train_acc": 1.0}),
            "train.stop: give either train_loss or train_acc, not both",
        ),
        (_mutate("name", KeyError), "name: required"),
        (_mutate("train", 5), "train: must be a mapping (key: value) (got 5)"),
    ],
)
def test_invalid_configs_name_the_field_and_the_fix(change, expected):
    data = copy.deepcopy(BASE)
    change(data)
    message = errors_of(data)
    assert expected in message, message
    assert all(": " in line for line in message.splitlines())


def test_every_problem_is_reported_one_line_each():
    data = copy.deepcopy(BASE)
    data["train"]["lr"] = -1
    data["model"]["width"] = 0
    data["dataset"]["nme"] = "x"
    lines = errors_of(data).splitlines()
    assert len(lines) == 3
    assert {line.split(":")[0] for line in lines} == {"train.lr", "model.width", "dataset.nme"}


def test_non_grid_samplers_need_n_trials_and_accept_ranges():
    data = copy.deepcopy(BASE)
    data["search"] = {"sampler": "tpe", "space": {"train.lr": {"low": 0.001, "high": 0.3, "log": True}}}
    assert "search.n_trials: required for sampler 'tpe'" in errors_of(data)
    data["search"]["n_trials"] = 10
    assert load_config(data).search.space["train.lr"].log


def test_bad_overrides_and_files():
    assert "--set: expected dotted.key=value (got 'train.lr')" in errors_of(BASE, ["train.lr"])
    assert "train.lrr: unknown key (did you mean 'lr'?)" in errors_of(BASE, ["train.lrr=0.1"])
    assert "train.lr: must be a number (got '[1')" in errors_of(BASE, ["train.lr='[1'"])
    with pytest.raises(ConfigError, match="config: no such file"):
        load_config("/nonexistent/sweep.yaml")


def test_measure_options_are_checked_against_measure():
    data = copy.deepcopy(BASE)
    data["measure_options"] = {"hessian_spectrum": {}}
    assert "measure_options.hessian_spectrum: 'hessian_spectrum' is not in measure" in errors_of(data)
    data["measure_options"] = {"adaptive_sharpness_worst": {"rhoo": 0.1}}
    assert "measure_options.adaptive_sharpness_worst: unknown option(s) ['rhoo']; accepted: [" in errors_of(data)
    data["measure_options"] = {"adaptive_sharpness_worst": {"rho": 0.1}}
    assert load_config(data).measure_options == {"adaptive_sharpness_worst": {"rho": 0.1}}


def test_with_point_sets_dotted_keys_and_validates():
    cfg = load_config(BASE)
    trial = cfg.with_point({"train.lr": 0.2, "model.width": 64, "seed": 1, "train.batch_size": "full"})
    assert (trial.train.lr, trial.model.width, trial.seed, trial.train.batch_size) == (0.2, 64, 1, "full")
    assert cfg.train.lr == 0.05  # original untouched
    with pytest.raises(ConfigError, match=r"^train\.lrr: not a config field"):
        cfg.with_point({"train.lrr": 0.1})
    with pytest.raises(ConfigError, match=r"^train\.lr: must be > 0"):
        cfg.with_point({"train.lr": -1.0})
    assert cfg.with_point({"model.kwargs.hidden": 3}).model.kwargs == {"hidden": 3}


def test_flat_gives_dotted_scalars():
    flat = load_config(BASE).flat()
    assert flat["train.lr"] == 0.05 and flat["model.width"] == 256 and flat["dataset.name"] == "mnist1d"
    assert flat["measure"] == "hessian_top_eig,hessian_trace,adaptive_sharpness_worst,pacbayes_mag_flatness"
    assert flat["train.stop.train_loss"] == 0.01 and "train.stop.train_acc" not in flat
    assert flat["search.space.train.lr"] == "values=[0.005, 0.05, 0.2]"
    assert flat["objective.metrics"] == "test_acc"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_multi_objective_lists():
    data = copy.deepcopy(BASE)
    data["objective"] = {"metric": ["test_acc", "hessian_trace"], "direction": ["maximize", "minimize"]}
    obj = load_config(data).objective
    assert obj.metrics == ["test_acc", "hessian_trace"] and obj.directions == ["maximize", "minimize"]


def test_dim_grid_enumerates_steps():
    assert Dim(low=32, high=128, step=32).grid() == [32, 64, 96, 128]
    assert Dim(values=[1, "a"]).grid() == [1, "a"]
    assert SweepConfig.model_fields["search"]  # schema is introspectable


@pytest.mark.parametrize("name", sorted(__import__("landscape").METRICS))
def test_every_metric_option_is_checked_at_load(name):
    """Walks the whole registry: an unknown option of any metric fails at config load, naming it
    and the accepted ones; each accepted option name passes the name check."""
    from landscape.metrics import METRICS

    data = copy.deepcopy(BASE)
    data["measure"] = [name]
    data["measure_options"] = {name: {"no_such_option": 1}}
    problems = errors_of(data)
    assert f"measure_options.{name}: unknown option(s) ['no_such_option']; accepted: " in problems
    for option in sorted(METRICS[name].options):
        assert repr(option) in problems  # listed as accepted


def test_config_error_and_import_object_are_importable_from_config():
    from sweeps import ConfigError as exported
    from sweeps.spec.config import import_object
    from sweeps.spec.errors import ConfigError as defined
    from sweeps.spec.imports import import_object as imported

    assert ConfigError is defined is exported and import_object is imported
