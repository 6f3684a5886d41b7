"""`sweeps import MANIFEST.yaml`: models trained by a plain torch script (written here, run as a
subprocess) recorded as a sweep that `sweeps results` and `sweeps report` read unchanged.

Real MLflow and Optuna sqlite stores; no Ray (an import computes in this process).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from mlflow import MlflowClient

import sweeps
from sweeps.cli import main
from sweeps.spec.config import load_config
from sweeps.trial.data import load_dataset
from sweeps.trial.losses import evaluate

MODELS_PY = '''
import math

from torch import nn


def mlp(input_shape, num_classes, width=12):
    """What the researcher's own code builds."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.Tanh(), nn.Linear(width, num_classes))
'''

TRAIN_PY = """
import sys
import torch
from torch import nn
from ext_models import mlp

data = torch.load(sys.argv[1])
x, y = data["x"], data["y"]
for lr in (0.05, 0.2):
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = mlp(tuple(x.shape[1:]), 10)
        torch.save(model.state_dict(), f"init-{lr}-{seed}.pt")
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for step in range(30):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        torch.save(model.state_dict(), f"model-{lr}-{seed}.pt")
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The folder holding the script's models and the manifest naming them (trained once)."""
    tmp_path = tmp_path_factory.mktemp("external")
    (tmp_path / "ext_models.py").write_text(MODELS_PY)
    (tmp_path / "train.py").write_text(TRAIN_PY)
    data = load_dataset(load_config({"name": "x", "dataset": {"name": "digits", "train_size": 256}}).dataset)
    torch.save({"x": data.x_train, "y": data.y_train}, tmp_path / "data.pt")
    subprocess.run([sys.executable, "train.py", "data.pt"], cwd=tmp_path, check=True, env={"PYTHONPATH": str(tmp_path)})
    sys.path.insert(0, str(tmp_path))  # the factory, as the user's package would be importable
    models = [
        {
            "state": f"model-{lr}-{seed}.pt",
            "init": f"init-{lr}-{seed}.pt",
            "hyperparameters": {"train.lr": lr, "seed": seed},
            **({"metrics": {"test_acc": 0.5}} if (lr, seed) == (0.2, 1) else {}),
        }
        for lr in (0.05, 0.2)
        for seed in (0, 1)
    ]
    manifest = {
        "name": "external",
        "dataset": {"name": "digits", "train_size": 256},
        "model": {"name": "ext_models:mlp"},
        "measure": ["param_norm", "dist_from_init"],
        "measure_subset": 64,
        "models": models,
    }
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    sys.modules.pop("ext_models", None)


def test_import_records_a_sweep_that_reaches_the_report(trained, tmp_path_factory, capsys):
    results_dir = tmp_path_factory.mktemp("stores")
    code = main(["import", str(trained / "manifest.yaml"), "--results-dir", str(results_dir)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "sweep external: 4 model(s) imported" in out.out

    frame = sweeps.results("external", results_dir=results_dir)
    assert len(frame) == 4 and set(frame["status"]) == {"converged"}
    assert sorted(frame.attrs["search_space"]) == ["seed", "train.lr"]
    assert {"param_norm", "dist_from_init"} <= set(frame.attrs["measures"])
    row = frame[(frame["train.lr"] == 0.05) & (frame["seed"] == 0)].iloc[0]
    state = torch.load(trained / "model-0.05-0.pt")
    from ext_models import mlp

    data = load_dataset(load_config({"name": "x", "dataset": {"name": "digits", "train_size": 256}}).dataset)
    model = mlp(data.input_shape, 10)
    model.load_state_dict(state)
    loss, acc = evaluate(model, torch.nn.CrossEntropyLoss(), data.x_test, data.y_test)
    assert row["test_acc"] == pytest.approx(acc) and row["test_loss"] == pytest.approx(loss)  # computed here
    assert row["param_norm"] == pytest.approx(sum(float((p**2).sum()) for n, p in state.items() if "weight" in n))
    given = frame[(frame["train.lr"] == 0.2) & (frame["seed"] == 1)].iloc[0]
    assert given["test_acc"] == 0.5  # measured elsewhere: kept

    client = MlflowClient(f"sqlite:///{results_dir / 'mlflow.db'}")
    assert {a.path for a in client.list_artifacts(row["run_id"])} == {"model.pt", "init_state.pt"}

    out_dir = results_dir / "report"
    assert main(["report", "external", "--results-dir", str(results_dir), "--out", str(out_dir), "--n-boot", "20"]) == 0
    assert "param_norm" in (out_dir / "report.html").read_text()

    # the same name again is refused, nothing written
    assert main(["import", str(trained / "manifest.yaml"), "--results-dir", str(results_dir)]) == 2
    assert "a sweep named 'external' exists" in capsys.readouterr().err


def test_import_names_the_bad_field(trained, tmp_path_factory, capsys):
    results_dir = tmp_path_factory.mktemp("stores")
    manifest = yaml.safe_load((trained / "manifest.yaml").read_text())
    manifest["models"][1]["state"] = "missing.pt"
    manifest["models"][2]["init"] = "model-0.2-0.pt"  # fits: a state dict of the same model
    manifest["model"] = {"name": "ext_models:mlp", "kwargs": {"width": 7}}  # not the width trained
    (trained / "bad.yaml").write_text(yaml.safe_dump(manifest))
    assert main(["import", str(trained / "bad.yaml"), "--results-dir", str(results_dir)]) == 2
    err = capsys.readouterr().err
    assert "models[0].state: not a state dict of model 'ext_models:mlp' as configured" in err
    manifest["model"] = {"name": "ext_models:mlp"}
    (trained / "bad.yaml").write_text(yaml.safe_dump(manifest))
    assert main(["import", str(trained / "bad.yaml"), "--results-dir", str(results_dir)]) == 2
    assert "models[1].state: no file" in capsys.readouterr().err
    manifest["models"][1] = {**manifest["models"][0], "hyperparameters": {"train.lrr": 0.1, "seed": 0}}
    (trained / "bad.yaml").write_text(yaml.safe_dump(manifest))
    assert main(["import", str(trained / "bad.yaml"), "--results-dir", str(results_dir)]) == 2
    assert "models[1].hyperparameters: give the keys of models[0]" in capsys.readouterr().err
    manifest["models"][1] = manifest["models"][0]
    manifest["search"] = {"sampler": "random"}
    (trained / "bad.yaml").write_text(yaml.safe_dump(manifest))
    assert main(["import", str(trained / "bad.yaml"), "--results-dir", str(results_dir)]) == 2
    assert "search: not part of a manifest" in capsys.readouterr().err
    assert not (results_dir / "mlflow.db").exists()  # nothing written
