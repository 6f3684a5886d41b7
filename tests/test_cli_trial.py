"""``sweeps trial``: JSON on stdout, files with --out, exit code 2 and a field-level message for
bad configs (and nothing else happens)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from sweeps import cli

CONFIG = {
    "name": "cli-trial",
    "dataset": {"name": "teacher", "train_size": 100, "options": {"input_dim": 5, "num_classes": 3, "test_size": 200}},
    "model": {"name": "mlp", "width": 8},
    "train": {
        "lr": 0.1,
        "momentum": 0.9,
        "batch_size": 25,
        "max_epochs": 5,
        "track": {"every_steps": 10, "subset": 50},
    },
    "measure": ["hessian_top_eig", "surface_2d"],
    "measure_options": {"surface_2d": {"steps": 5, "span": 0.4}},
}


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEPS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_trial_prints_json_and_writes_files(config_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["trial", str(config_file), "--set", "train.lr=0.05", "--set", "model.width=6", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["status"] in ("converged", "not_converged")
    assert result["config"]["train"]["lr"] == 0.05 and result["config"]["model"]["width"] == 6
    assert {"train_loss", "test_acc", "gen_gap", "hessian_top_eig", "surface_2d", "surface_2d_seconds"} <= set(
        result["metrics"]
    )
    for name in ("surface_2d.png", "surface_2d.npz", "history.json", "training.png", "model.pt"):
        assert (out / name).is_file() and result["artifacts"][name] == str(out / name)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.lr=-1"], "train.lr: must be > 0"),
        (["--set", "train.lrr=0.1"], "train.lrr: unknown key (did you mean 'lr'?)"),
        (["--set", "measure=[hessian_trase]"], "measure.0: unknown metric 'hessian_trase'"),
        (["--set", "dataset.name=imagenet"], "dataset.name: unknown dataset 'imagenet'"),
        (["--set", "train.lr"], "--set: expected dotted.key=value"),
    ],
)
def test_bad_config_exits_2_with_the_field_and_does_nothing(config_file, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    code = cli.main(["trial", str(config_file), "--out", str(out), *args])
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err and captured.out == ""
    assert not out.exists()


def test_usage_errors_and_help(capsys, tmp_path):
    assert cli.main(["trial"]) == 2
    assert "CONFIG.yaml" in capsys.readouterr().err
    assert cli.main(["no-such-command"]) == 2
    assert cli.main(["trial", str(tmp_path / "missing.yaml")]) == 2
    assert "config: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse prints help and exits 0; main turns it into 0
        raise SystemExit(cli.main(["--help"]))
    assert "trial" in capsys.readouterr().out


def test_a_subcommand_is_one_decorated_function(capsys):
    def hello_arguments(parser):
        parser.add_argument("--who", default="world")

    @cli.command("hello", help="say hello", arguments=hello_arguments)
    def cmd_hello(args):
        print(f"hello {args.who}")
        return 0

    try:
        assert cli.main(["hello", "--who", "sweeps"]) == 0
        assert capsys.readouterr().out == "hello sweeps\n"
    finally:
        cli._COMMANDS[:] = [c for c in cli._COMMANDS if c.name != "hello"]


def test_console_script_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {optimizer: rmsprop}\n")
    exe = shutil.which("sweeps")
    cmd = [exe] if exe else [sys.executable, "-m", "sweeps.cli"]
    proc = subprocess.run([*cmd, "trial", str(bad)], capture_output=True, text=True, timeout=120)
    assert (
        proc.returncode == 2
        and "train.optimizer: must be one of 'sgd', 'adam' or 'adamw' (got 'rmsprop')" in proc.stderr
    )
    assert proc.stdout == ""
