"""Bad input, refused as a new user meets it: one line, exit 2, no traceback, nothing written.

Each refusal is checked through the CLI in this process (`sweeps run`, `sweeps check`, ...):
exit code 2, the message naming the field or flag and the fix, no ``Traceback``, and no results
directory, study or MLflow store left behind. `sweeps check` is also fed generated configs
(Hypothesis) and must never exit 1. Stores are real (SQLite files, the local PostgreSQL).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sweeps.cli import main
from sweeps.spec.config import NAME_RULE, load_config

ROOT = Path(__file__).resolve().parents[1]


def small_config(name: str = "small", **sections) -> dict:
    """Two trials of a tiny MLP on digits (seconds): the grid of train.lr."""
    data = {
        "name": name,
        "dataset": {"name": "digits", "train_size": 128},
        "model": {"name": "mlp", "width": 8, "depth": 1},
        "train": {"lr": 0.1, "batch_size": 32, "max_epochs": 1, "stop": {}},
        "measure": ["hessian_top_eig"],
        "measure_subset": 64,
        "search": {"sampler": "grid", "space": {"train.lr": {"values": [0.05, 0.2]}}},
    }
    data.update(sections)
    return data


def write(path: Path, data: dict | str | bytes) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def cli(capsys, *args: str) -> subprocess.CompletedProcess:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def assert_refused(done: subprocess.CompletedProcess, *expected: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    for text in expected:
        assert text in done.stderr, (text, done.stderr)


# --- 1. names and paths ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../etc", "a b;rm -rf x", ".hidden", "a/b", "x" * 101, "/abs", "ü"])
def test_an_unsafe_sweep_name_is_refused_before_anything_is_written(tmp_path, capsys, name):
    results = tmp_path / "results"
    config = write(tmp_path / "sweep.yaml", small_config(name))
    for command in ("run", "check"):
        done = cli(capsys, command, config, "--results-dir", results)
        assert_refused(done, "name: must be", NAME_RULE)
    flag = cli(capsys, "run", write(tmp_path / "ok.yaml", small_config("ok")), "--name", name, "--results-dir", results)
    assert_refused(flag, "name: must be")
    for command in ("resume", "status", "results", "report"):
        assert_refused(cli(capsys, command, name, "--results-dir", results), "NAME: must be")
    assert not results.exists() and not (tmp_path / "etc").exists()


def test_the_longest_safe_name_is_accepted():
    assert load_config(small_config("a" * 100 + "")).name == "a" * 100
    assert load_config(small_config("v1.2_lr-sweep")).name == "v1.2_lr-sweep"


def test_a_results_dir_with_dotdot_is_the_directory_it_names(tmp_path, capsys):
    config = write(tmp_path / "sweep.yaml", small_config("dots"))
    (tmp_path / "a").mkdir()
    done = cli(capsys, "check", config, "--results-dir", tmp_path / "a" / ".." / "b")
    assert done.returncode == 0, done.stderr
    assert f"results: {tmp_path / 'b'} " in done.stdout
    assert f"artifacts {(tmp_path / 'b' / 'mlartifacts').as_uri()}/dots" in done.stdout
    assert not (tmp_path / "b").exists()  # check writes nothing


@pytest.mark.parametrize("link", ["mlartifacts", "reports", "optuna.db"])
def test_a_symlink_leading_out_of_the_results_dir_is_refused(tmp_path, capsys, link):
    results, outside = tmp_path / "results", tmp_path / "outside"
    results.mkdir()
    outside.mkdir()
    (results / link).symlink_to(outside / link if link.endswith(".db") else outside)
    config = write(tmp_path / "sweep.yaml", small_config("linked"))
    done = cli(capsys, "run", config, "--results-dir", results, "--quiet")
    assert_refused(done, f"--results-dir: {results / link} is a symbolic link", "outside")
    assert list(outside.iterdir()) == [] and sorted(p.name for p in results.iterdir()) == [link]


def test_a_symlink_inside_the_results_dir_is_allowed(tmp_path, capsys):
    results = tmp_path / "results"
    (results / "store").mkdir(parents=True)
    (results / "mlartifacts").symlink_to(results / "store")
    done = cli(capsys, "check", write(tmp_path / "sweep.yaml", small_config("inside")), "--results-dir", results)
    assert done.returncode == 0, done.stderr


def test_trial_out_refuses_a_symlink_leading_elsewhere(tmp_path, capsys):
    out, victim = tmp_path / "out", tmp_path / "victim.pt"
    out.mkdir()
    victim.write_text("keep me")
    (out / "model.pt").symlink_to(victim)
    done = cli(capsys, "trial", write(tmp_path / "sweep.yaml", small_config()), "--out", out)
    assert_refused(done, f"--out: {out / 'model.pt'} is a symbolic link to {victim}")
    assert victim.read_text() == "keep me"


def test_a_relative_dataset_root_with_dotdot_is_written_where_it_points(tmp_path, monkeypatch):
    from sweeps.trial.data import load_dataset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    cfg = load_config(small_config(dataset={"name": "mnist1d", "root": "work/../data"}))
    load_dataset(cfg.dataset)
    assert (tmp_path / "data" / "mnist1d.npz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "work"]


# --- 2, 3. files that are not UTF-8 or YAML, duplicated keys -----------------------------------
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"name: caf\xe9\n", ["is not UTF-8 text (byte 0xe9 on line 1); save it as UTF-8"]),
        (b"\xff\xfe n\x00a\x00", ["is not UTF-8 text"]),
        ("name: x\ntrain: {lr: [\n", ["is not valid YAML", "line"]),
        (
            "name: dup\ntrain: {lr: 0.1}\nmodel: {width: 8}\ntrain: {lr: 0.2}\n",
            ["duplicated key 'train' on lines 2 and 4", "merge them"],
        ),
        ("name: dup\ntrain:\n  lr: 0.1\n  lr: 0.2\n", ["duplicated key 'lr' on lines 3 and 4"]),
        ("- a\n- b\n", ["must be a mapping of sections (got list)"]),
        ("", ["is empty"]),
    ],
    ids=["latin1", "utf16", "yaml", "dup-section", "dup-field", "list", "empty"],
)
def test_unreadable_configs_exit_2_in_one_line(tmp_path, capsys, content, expected):
    config = write(tmp_path / "sweep.yaml", content)
    for command in ("run", "check", "trial"):
        done = (
            cli(capsys, command, config, "--results-dir", tmp_path / "results")
            if command != "trial"
            else cli(capsys, command, config)
        )
        assert_refused(done, *expected)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "results").exists()


def test_a_duplicated_key_in_a_set_value_is_refused(tmp_path, capsys):
    config = write(tmp_path / "sweep.yaml", small_config())
    done = cli(capsys, "check", config, "--set", "train={lr: 0.1, lr: 0.2}")
    assert_refused(done, "--set train: value is not valid YAML: duplicated key 'lr'")


def test_a_missing_config_file_and_a_directory_exit_2(tmp_path, capsys):
    assert_refused(cli(capsys, "check", tmp_path / "nope.yaml"), "no such file")
    assert_refused(cli(capsys, "run", tmp_path), "no such file")


# --- 2. a PostgreSQL database that does not exist ----------------------------------------------
@pytest.mark.postgres
@pytest.mark.parametrize("flag", ["--storage", "--tracking-uri"])
def test_a_missing_database_exits_2_naming_it_and_how_to_create_it(tmp_path, capsys, postgres_url, flag):
    missing = postgres_url.rsplit("/", 1)[0] + "/sweeps_nosuchdb"
    config = write(tmp_path / "sweep.yaml", small_config())
    for command in ("run", "check"):
        done = cli(capsys, command, config, "--results-dir", tmp_path / "results", flag, missing)
        assert_refused(
            done,
            f"{flag}: database 'sweeps_nosuchdb' does not exist on 127.0.0.1:5432",
            "createdb -h 127.0.0.1 -p 5432 -U postgres sweeps_nosuchdb",
        )
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


# --- 4. dataset and model checked before the first trial ----------------------------------------
def test_a_dataset_without_files_exits_2_before_any_trial(tmp_path, capsys):
    empty = tmp_path / "empty"
    results = tmp_path / "results"
    for download, expected in (
        (True, "needs torchvision to download its files into"),
        (False, "dataset.download is false"),
    ):
        if download and _has_torchvision():  # then the download itself is tried (no network in CI)
            continue
        data = small_config("nodata", dataset={"name": "mnist", "root": str(empty), "download": download})
        config = write(tmp_path / "sweep.yaml", data)
        for command in ("run", "check"):
            assert_refused(cli(capsys, command, config, "--results-dir", results), "dataset.", expected)
    assert not results.exists()  # no study, no MLflow store: the name is not taken


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


FACTORIES = """
import torch
from torch import nn


def fixed_input(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(40, num_classes))  # ignores the dataset's shape


def wrong_classes(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), 3))


def raises(input_shape, num_classes):
    raise RuntimeError("no GPU kernels for this layer")
"""


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("fixed_input", "mat1 and mat2 shapes cannot be multiplied"),
        ("wrong_classes", "its output for 2 samples is [2, 3], not [2, 10]"),
        ("raises", "RuntimeError: no GPU kernels for this layer"),
    ],
)
def test_a_model_that_cannot_be_built_for_the_data_exits_2(tmp_path, capsys, monkeypatch, factory, expected):
    (tmp_path / "my_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = write(tmp_path / "sweep.yaml", small_config("factory", model={"name": f"my_factories:{factory}"}))
    results = tmp_path / "results"
    for command in ("run", "check"):
        done = cli(capsys, command, config, "--results-dir", results)
        assert_refused(
            done, f"model.name: 'my_factories:{factory}' cannot be built for the dataset's inputs [1, 8, 8]", expected
        )
    assert not results.exists()


def test_a_model_factory_that_cannot_be_imported_exits_2(tmp_path, capsys):
    config = write(tmp_path / "sweep.yaml", small_config(model={"name": "no_such_module_xyz:build"}))
    assert_refused(cli(capsys, "check", config), "model.name", "no_such_module_xyz")


def test_every_model_variant_of_the_space_is_built(tmp_path, capsys):
    """A CNN over a flat dataset fails only for the variant that names it."""
    data = small_config("variants", dataset={"name": "mnist1d"})
    data["search"]["space"] = {"model.name": {"values": ["mlp", "cnn"]}}
    done = cli(capsys, "check", write(tmp_path / "sweep.yaml", data))
    assert_refused(done, "model.name: 'cnn' needs image inputs [C, H, W]; the dataset gives [40]")


# --- 7. sweeps check --------------------------------------------------------------------------------
def test_check_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    data = small_config("planned", resources={"cpus_per_trial": 1, "max_concurrent": 2})
    data["search"]["space"] = {
        "train.lr": {"values": [0.05, 0.1, 0.2]},
        "model.width": {"values": [8, 16]},
        "seed": {"values": [0, 1]},
    }
    results = tmp_path / "results"
    done = cli(capsys, "check", write(tmp_path / "sweep.yaml", data), "--results-dir", results)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "trials: 12 (grid: train.lr 3 x model.width 2 x seed 2)" in out
    assert (
        "populations: 2 shapes (model.width change the tensor shapes), about 6 trials each; up to 3 trials "
        "trained together per task (population_size auto)" in out
    )
    assert "resources per task: 1 CPU, 0 GPU; at most 2 tasks in flight (resources.max_concurrent)" in out
    assert "digits (128 train / 540 test, inputs [1, 8, 8], 10 classes) -> mlp (" in out and out.count("-> mlp") == 1
    assert f"results: {results} (report: {results / 'reports' / 'planned'})" in out
    assert f"mlflow: sqlite:///{results / 'mlflow.db'} (experiment planned; artifacts " in out
    assert f"optuna: sqlite:///{results / 'optuna.db'} (study planned)" in out
    assert "study: new" in out and "ray: local" in out
    assert not results.exists()

    flags = cli(
        capsys,
        "check",
        write(tmp_path / "sweep.yaml", data),
        "--set",
        "search.sampler=random",
        "--set",
        "search.n_trials=5",
        "--max-concurrent",
        "1",
        "--set",
        "resources.population_size=1",
    )
    assert flags.returncode == 0, flags.stderr
    assert "trials: 5 (sampler random (seed 0) over train.lr, model.width, seed)" in flags.stdout
    assert (
        "population_size 1: one trial per task" in flags.stdout
        and "at most 1 tasks in flight (--max-concurrent)" in flags.stdout
    )


def test_check_sees_a_name_taken_by_another_config(tmp_path, capsys):
    from sweeps.service import search

    results = tmp_path / "results"
    results.mkdir()
    search.open_study(load_config(small_config("taken")), f"sqlite:///{results / 'optuna.db'}")
    same = cli(capsys, "check", write(tmp_path / "a.yaml", small_config("taken")), "--results-dir", results)
    assert same.returncode == 0 and "study: exists with this config (no trials yet)" in same.stdout
    other = small_config("taken")
    other["train"]["lr"] = 0.3
    done = cli(capsys, "check", write(tmp_path / "b.yaml", other), "--results-dir", results)
    assert_refused(done, "a sweep named 'taken' already exists", "sweeps resume taken")


def test_check_refuses_an_unreachable_store_and_bad_flags(tmp_path, capsys):
    config = write(tmp_path / "sweep.yaml", small_config())
    port = _closed_port()
    assert_refused(
        cli(capsys, "check", config, "--tracking-uri", f"http://127.0.0.1:{port}"),
        f"--tracking-uri: cannot reach http://127.0.0.1:{port}",
    )
    assert_refused(cli(capsys, "check", config, "--max-concurrent", "0"), "--max-concurrent")
    assert_refused(cli(capsys, "check", config, "--storage", "ftp://x/y"), "--storage: unsupported URI")


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_example_checks_out(capsys):
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        if "dataset: {name: mnist}" in path.read_text() or "cifar" in path.read_text():
            continue
        done = cli(capsys, "check", path, "--results-dir", "/nonexistent-sweeps-results-dir/x")
        assert done.returncode == 0, (path, done.stderr)


def test_check_in_a_fresh_interpreter_is_one_line_and_exit_2(tmp_path):
    """As a user runs it: the installed entry point, a separate process."""
    config = write(tmp_path / "sweep.yaml", "name: a\nname: b\n")
    done = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "check", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
        check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    expected = (
        f"sweeps check: invalid config: config: {config} is not valid YAML: duplicated key 'name' on lines 1 "
        "and 2 (YAML would keep only the last one): merge them into one"
    )
    assert done.stderr.strip().splitlines() == [expected]


# --- 7. sweeps check never exits 1, whatever the config -------------------------------------------

_BASE = small_config("fuzz")
_BASE["search"]["space"] = {"train.lr": {"values": [0.05, 0.2]}, "model.width": {"values": [8, 16]}}
_BASE["objective"] = {"metric": "test_acc", "direction": "maximize"}
_BASE["resources"] = {"cpus_per_trial": 1, "max_concurrent": 2}


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path of the base config (sections, fields, search dimensions, their keys)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    return out


_PATHS = _paths(_BASE)
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**4), 10**4),
    st.sampled_from([0, -1, 10**30, -(2**63), 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
    st.sampled_from(["", " ", "full", "auto", "grid", "nan", "ünïcødé", "名前", "../..", "a" * 5000, "1e999", "~"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)),
    max_leaves=12,
)


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


_deep = st.integers(1, 300).map(_nested)
_keys = st.one_of(_text, st.sampled_from(["lr", "name", "values", "low", "high", "optimzer", "space", "stop"]))
# Keys whose size allocates or loops at build time: a value there is a size the user asked for.
_SIZED = {("model", "depth"), ("dataset", "options")}


@st.composite
def _configs(draw) -> object:
    import copy

    data = copy.deepcopy(_BASE)
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.sampled_from(_PATHS))
        kind = draw(st.sampled_from(["value", "unknown key", "deep", "delete"]))
        parent = data
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if kind == "delete":
            parent.pop(path[-1], None)
        elif kind == "unknown key":
            target = parent.get(path[-1])
            (target if isinstance(target, dict) else parent)[draw(_keys)] = draw(_values)
        elif kind == "deep":
            parent[path[-1]] = draw(_deep)
        elif path[:2] not in _SIZED:
            parent[path[-1]] = draw(_values)
    return draw(st.one_of(st.just(data), st.just(data), st.just(data), _values))


@settings(
    max_examples=int(os.environ.get("SWEEPS_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(config=_configs(), as_text=st.booleans(), junk=st.binary(max_size=40))
def test_check_never_exits_1_on_generated_configs(tmp_path, capsys, config, as_text, junk):
    path = tmp_path / "fuzz.yaml"
    if as_text:
        write(path, yaml.safe_dump(config, allow_unicode=True, sort_keys=False, width=10**6))
    else:
        write(path, yaml.safe_dump(config, sort_keys=False).encode() + junk)
    done = cli(capsys, "check", path, "--results-dir", tmp_path / "results")
    event(f"exit {done.returncode}")  # --hypothesis-show-statistics: how many configs passed, how many were refused
    assert done.returncode in (0, 2), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    if done.returncode == 2:  # the command's own refusal (not argparse's usage text), and nothing else
        assert done.stderr.startswith("sweeps check: ") and done.stdout == "", done.stderr
    else:
        assert re.match(r"sweep \S+: the config and its stores check out", done.stdout), done.stdout
    assert not (tmp_path / "results").exists()


def test_report_out_refuses_a_symlink_leading_elsewhere(tmp_path, capsys):
    out, victim = tmp_path / "report", tmp_path / "victim.html"
    out.mkdir()
    victim.write_text("keep me")
    (out / "report.html").symlink_to(victim)
    done = cli(capsys, "report", "any-sweep", "--out", out, "--results-dir", tmp_path / "results")
    assert_refused(done, f"--out: {out / 'report.html'} is a symbolic link to {victim}")
    assert victim.read_text() == "keep me" and not (tmp_path / "results").exists()
