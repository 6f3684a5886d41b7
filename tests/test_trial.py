"""sweeps.trial.run.run_trial end to end: convergence on MNIST-1D with every measure, divergence as
a status, live logging, files, determinism."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from sweeps.spec.config import load_config
from sweeps.trial.data import load_dataset
from sweeps.trial.models import build_model
from sweeps.trial.run import TrialResult, run_trial
from sweeps.trial.train import LOSSES, evaluate

MEASURES = [
    "hessian_top_eig",
    "hessian_trace",
    "adaptive_sharpness_worst",
    "pacbayes_mag_flatness",
    "surface_2d",
    "dist_from_init",
]

SMALL = {
    "name": "small",
    "dataset": {"name": "teacher", "train_size": 200, "options": {"input_dim": 6, "num_classes": 3, "test_size": 500}},
    "model": {"name": "mlp", "width": 16},
    "train": {
        "lr": 0.1,
        "momentum": 0.9,
        "batch_size": 50,
        "max_epochs": 60,
        "stop": {"train_loss": 0.05},
        "track": {"every_steps": 20, "subset": 100},
    },
    "measure": ["hessian_top_eig", "param_count"],
    "resources": {"cpus_per_trial": 1},
}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SWEEPS_CACHE", str(tmp_path_factory.getbasetemp() / "sweeps-cache"))


def rebuild(config, path) -> torch.nn.Module:
    data = load_dataset(config.dataset)
    model = build_model(config.model, data.input_shape, data.num_classes)
    model.load_state_dict(torch.load(path))
    return model


@pytest.mark.slow
def test_mnist1d_converges_to_ce_001_and_returns_every_measure(tmp_path):
    config = load_config(
        {
            "name": "mnist1d-converge",
            "dataset": {"name": "mnist1d"},
            "model": {"name": "mlp", "depth": 2, "width": 128},
            "train": {
                "lr": 0.1,
                "momentum": 0.9,
                "batch_size": 128,
                "max_epochs": 150,
                "stop": {"train_loss": 0.01},
                "track": {"every_steps": 200, "metrics": ["hessian_top_eig"]},
            },
            "measure": MEASURES,
            "measure_options": {"hessian_trace": {"rtol": 0.05}, "surface_2d": {"steps": 21}},  # keep the test short
        }
    )
    start = time.perf_counter()
    result = run_trial(config, out_dir=tmp_path, device="cpu")
    m = result.metrics
    print(
        f"\nMNIST-1D trial: {result.status} after {m['epochs']} epochs / {m['steps']} steps; "
        f"training {m['train_seconds']:.1f} s, whole trial {time.perf_counter() - start:.1f} s; "
        + ", ".join(f"{k} {m[k + '_seconds']:.1f} s" for k in MEASURES)
    )
    assert result.status == "converged"
    assert m["train_loss"] <= 0.01 and m["n_train"] == 4000 and m["n_test"] == 1000
    assert m["gen_gap"] == pytest.approx((1 - m["test_acc"]) - (1 - m["train_acc"]))
    for name in MEASURES:
        assert math.isfinite(m[name]) and m[f"{name}_seconds"] >= 0, name
    assert m["hessian_top_eig"] > 0 and m["hessian_trace"] > m["hessian_top_eig"]
    # the saved weights are the converged model: its loss and its distance from init match
    model = rebuild(config, result.artifacts["model.pt"])
    data = load_dataset(config.dataset)
    loss, acc = evaluate(model, LOSSES["cross_entropy"], data.x_train, data.y_train)
    assert loss == pytest.approx(m["train_loss"], rel=1e-5) and acc == pytest.approx(m["train_acc"])
    init = torch.load(result.artifacts["init_state.pt"])
    dist = torch.cat([(p.detach() - init[n]).reshape(-1) for n, p in model.named_parameters()]).norm()
    assert m["dist_from_init"] == pytest.approx(float(dist), rel=1e-5)
    with np.load(result.artifacts["surface_2d.npz"]) as surface:
        assert surface["loss"].shape == (21, 21) and surface["alphas"][[0, -1]].tolist() == [-1.0, 1.0]
        assert surface["loss"][10, 10] == pytest.approx(m["train_loss"], rel=1e-4)  # centered on the model
    for name in ("surface_2d.png", "training.png", "history.json", "result.json"):
        assert result.artifacts[name].stat().st_size > 0
    saved = json.loads(result.artifacts["result.json"].read_text())
    assert saved["status"] == "converged" and saved["metrics"]["train_loss"] == m["train_loss"]
    tracks = [r for r in result.history if r["kind"] == "track"]
    assert tracks[0]["step"] == 0 and all(0 < r["eos_ratio"] < 2 for r in tracks)


def test_diverging_lr_returns_status_diverged():
    config = load_config(SMALL, ["train.lr=1000", "measure=[hessian_top_eig, surface_2d]"])
    result = run_trial(config)
    assert isinstance(result, TrialResult) and result.status == "diverged"
    assert "hessian_top_eig" not in result.metrics  # no measures on a diverged model
    assert result.metrics["steps"] < 60 * 4
    json.dumps(result.to_dict(), allow_nan=False)  # strict JSON even with inf/nan losses


def test_log_streams_epochs_and_tracking_points_with_steps():
    calls: list[tuple[int, dict]] = []
    result = run_trial(load_config(SMALL), log=lambda metrics, step: calls.append((step, metrics)))
    assert result.status == "converged"
    steps = [s for s, _ in calls]
    assert steps == sorted(steps) and steps[-1] == result.metrics["steps"]
    epoch_calls = [m for _, m in calls if "test_acc" in m]
    track_calls = [(s, m) for s, m in calls if "hessian_top_eig" in m]
    assert len(epoch_calls) == result.metrics["epochs"] + 1  # epoch 0 too
    assert [s for s, _ in track_calls] == list(range(0, int(result.metrics["steps"]) + 1, 20))
    assert all("eos_ratio" in m for _, m in track_calls)
    assert epoch_calls[-1]["train_loss"] == result.metrics["train_loss"]


def test_same_config_same_numbers_and_threads_restored():
    threads = torch.get_num_threads()
    a, b = (run_trial(load_config(SMALL)) for _ in range(2))
    assert torch.get_num_threads() == threads
    keys = [k for k in a.metrics if not k.endswith("seconds")]
    assert {k: a.metrics[k] for k in keys} == {k: b.metrics[k] for k in keys}
    other = run_trial(load_config(SMALL).with_point({"seed": 1}))
    assert other.metrics["hessian_top_eig"] != a.metrics["hessian_top_eig"]
    assert a.metrics["param_count"] == a.metrics["num_params"] == 6 * 16 + 16 + 16 * 16 + 16 + 16 * 3 + 3


def test_not_converged_still_measured():
    result = run_trial(load_config(SMALL, ["train.max_epochs=1"]))
    assert result.status == "not_converged" and math.isfinite(result.metrics["hessian_top_eig"])
    assert result.to_dict()["config"]["train"]["max_epochs"] == 1


def test_steps_to_loss_is_the_first_recorded_step_at_the_target():
    """Jiang et al.'s optimization measure: the step of the first full-train-set evaluation at
    training loss <= 0.1, read from the trial's own curve; absent when the loss never got there."""
    from sweeps.spec.config import load_config
    from sweeps.trial.run import run_trial

    base = {"name": "s", "dataset": {"name": "digits"}, "model": {"name": "mlp", "depth": 1, "width": 32}}
    fast = run_trial(
        load_config({**base, "train": {"lr": 0.5, "batch_size": 64, "max_epochs": 30, "stop": {"train_loss": 0.05}}})
    )
    first = next(r["step"] for r in fast.history if "train_loss" in r and r["train_loss"] <= 0.1)
    assert fast.metrics["steps_to_loss_0.1"] == first > 0
    slow = run_trial(load_config({**base, "train": {"lr": 0.001, "batch_size": 64, "max_epochs": 2}}))
    assert min(r["train_loss"] for r in slow.history if "train_loss" in r) > 0.1
    assert "steps_to_loss_0.1" not in slow.metrics
