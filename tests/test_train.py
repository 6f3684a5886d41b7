"""sweeps.trial.train: loss convention, schedules, convergence/divergence rules, tracking against dense
Hessians, and the edge-of-stability phenomenon."""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import dense_hessian_of
from test_data import tiny_cifar_dir, tiny_idx_dir
from torch import nn

from sweeps.spec.config import load_config
from sweeps.trial.data import load_dataset
from sweeps.trial.models import build_model
from sweeps.trial.train import evaluate, half_squared_error, lr_factor, train

TEACHER = {"name": "teacher", "train_size": 200, "options": {"input_dim": 6, "num_classes": 3, "test_size": 500}}


def setup(train=None, model=None, dataset=None, seed=0):
    cfg = load_config(
        {
            "name": "t",
            "seed": seed,
            "dataset": dataset or TEACHER,
            "model": model or {"name": "mlp", "width": 32},
            "train": train or {},
            "measure": [],
        }
    )
    data = load_dataset(cfg.dataset)
    net = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.seed)
    return cfg, data, net


@pytest.fixture(autouse=True)
def _one_thread(single_thread, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SWEEPS_CACHE", str(tmp_path_factory.getbasetemp() / "sweeps-cache"))


def test_mse_is_half_sum_of_squares_per_sample_averaged():
    out = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    y = torch.tensor([1, 2])
    expected = (0.5 * (1 + 1 + 0) + 0.5 * (0 + 0 + 4)) / 2
    assert half_squared_error(out, y).item() == pytest.approx(expected)
    # Hessian of a linear model W x: block diagonal with blocks X^T X / N (one per class).
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    model = nn.Linear(4, 3, bias=False).double()
    H = dense_hessian_of(model, half_squared_error, [(x, y)])
    assert torch.allclose(H, torch.block_diag(*[x.T @ x / 9] * 3), atol=1e-12)


def test_schedules():
    cfg, _, _ = setup({"schedule": "cosine", "max_epochs": 10})
    f = lr_factor(cfg.train, 10)  # 100 steps in all
    assert f(0) == 1 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(0)
    f = lr_factor(setup({"schedule": "step", "max_epochs": 10})[0].train, 10)
    assert (f(49), f(50), f(75)) == (1, pytest.approx(0.1), pytest.approx(0.01))
    f = lr_factor(setup({"schedule": "warmup_cosine", "max_epochs": 10, "warmup_epochs": 2})[0].train, 10)
    assert f(0) == pytest.approx(1 / 20) and f(19) == pytest.approx(1) and f(60) == pytest.approx(0.5)
    assert lr_factor(setup()[0].train, 10)(1234) == 1


def test_converges_to_target_on_the_full_training_set():
    cfg, data, net = setup(
        {"lr": 0.1, "momentum": 0.9, "batch_size": 32, "max_epochs": 200, "stop": {"train_loss": 0.05}}
    )
    calls = []
    res = train(net, data, cfg.train, seed=0, log=lambda m, s: calls.append((s, m)))
    assert res.status == "converged", res.reason
    loss, acc = evaluate(net, nn.functional.cross_entropy, data.x_train, data.y_train)
    assert loss <= 0.05 and res.final["train_loss"] == pytest.approx(loss, rel=1e-6)
    assert res.final["train_acc"] == pytest.approx(acc)
    epochs = [r for r in res.history if r["kind"] == "epoch"]
    assert epochs[-2]["train_loss"] > 0.05  # it stopped at the first check that met the target
    assert [r["step"] for r in epochs] == sorted(r["step"] for r in epochs) and epochs[-1]["step"] == res.steps
    assert res.steps <= res.epochs * math.ceil(200 / 32)
    assert [s for s, _ in calls] == [r["step"] for r in res.history]
    assert {"train_loss", "train_acc", "test_loss", "test_acc", "epoch", "lr"} <= set(calls[-1][1])
    assert all(isinstance(v, float) for _, m in calls for v in m.values())
    assert set(res.init_state) == set(net.state_dict()) and not torch.equal(res.init_state["1.weight"], net[1].weight)


def test_full_batch_stops_without_stepping_past_the_target():
    cfg, data, net = setup({"lr": 0.5, "batch_size": "full", "max_epochs": 3000, "stop": {"train_acc": 1.0}})
    res = train(net, data, cfg.train, seed=0)
    assert res.status == "converged" and res.final["train_acc"] == 1.0
    assert evaluate(net, nn.functional.cross_entropy, data.x_train, data.y_train)[1] == 1.0
    assert res.epochs == res.steps  # one step per epoch
    before = [r for r in res.history if r["kind"] == "epoch"][-2]
    assert before["train_acc"] < 1.0 and before["step"] == res.steps - 1


@pytest.mark.parametrize("batch_size", [32, "full"])
def test_divergence_is_a_status(batch_size):
    cfg, data, net = setup({"lr": 1e4, "momentum": 0.9, "batch_size": batch_size, "max_epochs": 50})
    res = train(net, data, cfg.train, seed=0)
    assert res.status == "diverged" and ("loss" in res.reason) and res.steps < 50 * 7
    assert res.history[-1]["kind"] == "epoch" and res.history[-1]["step"] == res.steps


def test_max_epochs_without_target_is_not_converged():
    cfg, data, net = setup({"lr": 0.01, "max_epochs": 2, "stop": {"train_loss": 1e-6}})
    res = train(net, data, cfg.train, seed=0)
    assert res.status == "not_converged" and res.epochs == 2 and "max_epochs" in res.reason
    cfg, data, net = setup({"lr": 0.01, "max_epochs": 2, "stop": {}})
    assert train(net, data, cfg.train, seed=0).status == "converged"  # no target: done = converged


@pytest.mark.parametrize("optimizer, schedule", [("adam", "cosine"), ("adamw", "warmup_cosine"), ("sgd", "step")])
def test_optimizers_and_schedules_follow_the_config(optimizer, schedule):
    train_cfg = {
        "optimizer": optimizer,
        "schedule": schedule,
        "lr": 0.01,
        "weight_decay": 1e-3,
        "max_epochs": 4,
        "warmup_epochs": 1,
        "batch_size": 50,
        "stop": {"train_loss": 1e-9},
        "momentum": 0.5,
        "nesterov": True,
    }
    cfg, data, net = setup(train_cfg)
    res = train(net, data, cfg.train, seed=0)
    f = lr_factor(cfg.train, 4)
    lrs = {r["step"]: r["lr"] for r in res.history if r["kind"] == "epoch"}
    assert all(lr == pytest.approx(0.01 * f(step)) for step, lr in lrs.items())
    assert res.final["train_loss"] < res.history[0]["train_loss"]


def test_same_seed_same_run_other_seed_other_order():
    runs = []
    for seed in (0, 0, 1):
        cfg, data, net = setup({"lr": 0.05, "max_epochs": 2, "batch_size": 16}, seed=0)
        runs.append(train(net, data, cfg.train, seed=seed).final["train_loss"])
    assert runs[0] == runs[1] != runs[2]


def test_tracked_top_eigenvalue_matches_dense_hessian_and_eos_ratio():
    dataset = {"name": "teacher", "train_size": 60, "options": {"input_dim": 3, "num_classes": 3, "test_size": 50}}
    train_cfg = {
        "lr": 0.3,
        "momentum": 0.5,
        "batch_size": "full",
        "max_epochs": 10,
        "stop": {},
        "track": {
            "every_steps": 5,
            "subset": 60,
            "metrics": ["hessian_top_eig", "hessian_trace"],
            "options": {"hessian_trace": {"rtol": 0.02}},
        },
    }
    cfg, data, net = setup(train_cfg, model={"name": "mlp", "width": 5, "activation": "tanh"}, dataset=dataset)
    res = train(net, data, cfg.train, seed=0)
    tracks = [r for r in res.history if r["kind"] == "track"]
    assert [r["step"] for r in tracks] == [0, 5, 10]
    batches = [(data.x_train, data.y_train)]
    init = build_model(cfg.model, data.input_shape, 3, seed=0)
    for model, record in ((init, tracks[0]), (net, tracks[-1])):  # step 0 and the final weights
        H = dense_hessian_of(model, nn.functional.cross_entropy, batches)
        evals = torch.linalg.eigvalsh(H)
        assert record["hessian_top_eig"] == pytest.approx(float(evals[-1]), rel=1e-3)
        assert record["hessian_trace"] == pytest.approx(float(evals.sum()), rel=0.06)
        assert record["eos_ratio"] == pytest.approx(record["hessian_top_eig"] * 0.3 / (2 + 2 * 0.5))


DATASETS = [
    ("mnist1d", {"name": "mnist1d", "train_size": 256}, {"name": "cnn1d", "width": 4}),
    ("digits", {"name": "digits", "train_size": 256}, {"name": "cnn", "width": 4}),
    ("teacher", TEACHER, {"name": "mlp", "width": 8, "batch_norm": True, "dropout": 0.1}),
    ("mnist-files", "mnist", {"name": "nin", "width": 4, "depth": 1}),
    ("cifar10-files", "cifar10", {"name": "resnet", "width": 4}),
]


@pytest.mark.parametrize("label, dataset, model", DATASETS, ids=[d[0] for d in DATASETS])
@pytest.mark.parametrize("batch_size", [64, "full"])
def test_each_dataset_trains_a_few_steps(label, dataset, model, batch_size, tmp_path):
    if dataset == "mnist":
        tiny_idx_dir(tmp_path, n_train=40, n_test=10)
        dataset = {"name": "mnist", "root": str(tmp_path), "download": False}
    elif dataset == "cifar10":
        tiny_cifar_dir(tmp_path, per_batch=20)
        dataset = {"name": "cifar10", "root": str(tmp_path), "download": False}
    cfg, data, net = setup(
        {"lr": 0.01, "max_epochs": 2, "batch_size": batch_size, "eval_batch_size": 100}, model, dataset
    )
    res = train(net, data, cfg.train, seed=0)
    assert res.status == "not_converged" and res.steps >= 2
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_acc"]) for r in res.history)


@pytest.mark.slow
def test_edge_of_stability_full_batch_gd_mse():
    """Cohen et al. (2021): with full-batch GD on the half squared error, lambda_max rises to
    2/lr ("progressive sharpening") and then hovers there while the loss keeps falling."""
    lr = 0.2
    cfg, data, net = setup(
        {
            "lr": lr,
            "batch_size": "full",
            "loss": "mse",
            "max_epochs": 1200,
            "stop": {},
            "eval_every_epochs": 100,
            "track": {"every_steps": 50, "subset": 1000, "metrics": ["hessian_top_eig"]},
        },
        model={"name": "mlp", "width": 128, "depth": 2, "activation": "tanh"},
        dataset={"name": "mnist1d", "train_size": 1000},
    )
    start = time.perf_counter()
    res = train(net, data, cfg.train, seed=0)
    print(f"edge of stability: {res.steps} steps in {time.perf_counter() - start:.1f} s")
    tracks = [(r["step"], r["hessian_top_eig"]) for r in res.history if r["kind"] == "track"]
    print(" ".join(f"{s}:{lam:.2f}" for s, lam in tracks), f"(2/lr = {2 / lr})")
    threshold = 2 / lr
    assert tracks[0][1] < 0.6 * threshold  # starts well below the edge
    late = [lam for s, lam in tracks if s >= 600]
    assert all(abs(lam / threshold - 1) < 0.15 for lam in late), late
    losses = {r["step"]: r["train_loss"] for r in res.history if r["kind"] == "epoch"}
    assert losses[1200] < losses[600] < losses[0]  # training goes on at the edge
