"""sweeps.trial.population and train_population / run_population against ground truth: each member of
a stack equals the same model trained alone by a plain torch.optim loop (float64), leaves the
stack with the status it gets alone, and tracks the same lambda_max; a member that turns NaN leaves
the others equal to that loop, and the worker hands each member to the driver as it leaves."""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest
import torch
from torch import nn

from sweeps.service.worker import MetricStream, _members
from sweeps.spec.config import load_config
from sweeps.trial.data import load_dataset
from sweeps.trial.models import build_model
from sweeps.trial.population import module_stack_reason, population_key, stack_check
from sweeps.trial.run import measure_trained, run_population, run_trial
from sweeps.trial.train import LOSSES, lr_factor, train, train_population

TEACHER = {"name": "teacher", "train_size": 250, "options": {"input_dim": 6, "num_classes": 3, "test_size": 100}}
SCHEDULES = ["constant", "cosine", "step", "warmup_cosine"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SWEEPS_CACHE", str(tmp_path_factory.getbasetemp() / "sweeps-cache"))


def config(train=None, model=None, seed=0, **extra):
    return load_config(
        {
            "name": "p",
            "seed": seed,
            "dataset": TEACHER,
            "model": model or {"name": "mlp", "width": 12},
            "train": train or {},
            "measure": [],
            **extra,
        }
    )


def double(data):
    return dataclasses.replace(data, x_train=data.x_train.double(), x_test=data.x_test.double())


def flat(model):
    """The model's parameters as one vector (``named_parameters`` order)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference_sgd_loop(model, data, cfg, seed, steps):
    """Ground truth: the plain torch.optim loop (one model) for ``steps`` steps."""
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    else:
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        opt = cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(data.n_train / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, per_epoch))
    gen, step = torch.Generator().manual_seed(seed), 0
    while step < steps:
        order = torch.randperm(data.n_train, generator=gen)
        for idx in order.split(cfg.batch_size)[: steps - step]:
            opt.zero_grad()
            LOSSES[cfg.loss](model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            schedule.step()
            step += 1
    return flat(model)


def eight_members(optimizer, model):
    """8 configs of one shape: different lr, momentum / betas, Nesterov, weight decay, schedule, seed."""
    configs = []
    for i in range(8):
        train_cfg = {
            "optimizer": optimizer,
            "lr": (0.05 if optimizer == "sgd" else 0.005) * (1 + 0.3 * i),
            "momentum": [0.0, 0.9, 0.5, 0.0][i % 4],
            "nesterov": i % 4 == 2,
            "betas": [0.9 - 0.05 * i, 0.999 - 0.01 * i],
            "weight_decay": [0.0, 1e-3, 0.0, 5e-2][(i + 1) % 4],
            "schedule": SCHEDULES[i % 4],
            "warmup_epochs": 1,
            "batch_size": 25,
            "max_epochs": 5,
            "stop": {},
        }  # 5 epochs of 10 steps
        configs.append(config(train_cfg, model, seed=i))
    return configs


MLP, CNN1D = {"name": "mlp", "width": 12}, {"name": "cnn1d", "width": 3, "depth": 2}


@pytest.mark.parametrize(
    "optimizer, model, compiled",
    [(o, m, c) for o in ("sgd", "adam", "adamw") for m in (MLP, CNN1D) for c in (False, True) if not (c and m is CNN1D)]
    + [("sgd", CNN1D, True)],  # compiled: every optimizer on the MLP (batched matmuls), the vmap path with SGD
    ids=lambda v: v["name"] if isinstance(v, dict) else {False: "eager", True: "compiled"}.get(v, v),
    indirect=["compiled"],
)
def test_each_member_equals_the_plain_torch_optim_loop_in_float64(optimizer, model, compiled):
    configs = eight_members(optimizer, model)
    data = double(load_dataset(configs[0].dataset))
    build = lambda c: build_model(c.model, data.input_shape, data.num_classes, seed=c.seed).double()  # noqa: E731
    models = [build(c) for c in configs]
    results = train_population(models, data, [c.train for c in configs], seeds=[c.seed for c in configs])
    assert all(r.steps == 50 and r.status == "converged" for r in results)  # no target: max_epochs done
    for c, trained in zip(configs, models):
        expected = reference_sgd_loop(build(c), data, c.train, c.seed, 50)
        got = flat(trained)
        assert float((got - expected).norm() / expected.norm()) < 1e-8, c.train
        assert not torch.equal(got, flat(build(c)))  # it trained


@pytest.mark.parametrize(
    "model, compiled",
    [(MLP, False), (CNN1D, False), (MLP, True)],
    ids=["mlp", "cnn1d", "mlp-compiled"],
    indirect=["compiled"],
)
def test_a_nan_member_leaves_its_neighbours_equal_to_the_plain_torch_optim_loop_in_float64(model, compiled):
    lrs = [0.05, 1e20, 0.1]  # the middle member runs into inf/nan (its divergence factor never triggers first)
    configs = [
        config(
            {"lr": lr, "momentum": 0.9, "divergence_factor": 1e300, "batch_size": 25, "max_epochs": 5, "stop": {}},
            model,
            seed=i,
        )
        for i, lr in enumerate(lrs)
    ]
    data = double(load_dataset(configs[0].dataset))
    build = lambda c: build_model(c.model, data.input_shape, data.num_classes, seed=c.seed).double()  # noqa: E731
    models = [build(c) for c in configs]
    results = train_population(models, data, [c.train for c in configs], seeds=[c.seed for c in configs])
    assert results[1].status == "diverged" and results[1].steps < 50
    assert not flat(models[1]).isfinite().all()  # it held a NaN/inf
    for i in (0, 2):
        assert (results[i].status, results[i].steps) == ("converged", 50)
        expected = reference_sgd_loop(build(configs[i]), data, configs[i].train, configs[i].seed, 50)
        got = flat(models[i])
        assert float((got - expected).norm() / expected.norm()) < 1e-8


EXITS = {  # member -> (train overrides, status it must get)
    "diverges": ({"lr": 1e20, "divergence_factor": 1e300}, "diverged"),  # runs into inf/nan
    "converges": ({"lr": 0.3, "stop": {"train_acc": 0.7}}, "converged"),
    "max_epochs": ({"lr": 0.01, "max_epochs": 3, "stop": {"train_loss": 1e-6}}, "not_converged"),
    "slow": ({"lr": 0.1, "max_epochs": 6, "stop": {"train_loss": 0.3}, "eval_every_epochs": 2}, None),
}


@pytest.mark.parametrize(
    "batch_size, compiled",
    [(32, False), ("full", False), (32, True)],
    ids=["32", "full", "32-compiled"],
    indirect=["compiled"],
)  # full batch never compiles
def test_each_member_leaves_with_what_it_gets_alone(batch_size, compiled):
    configs = [
        config({"momentum": 0.9, "max_epochs": 20, "batch_size": batch_size, **over}, seed=i)
        for i, (over, _) in enumerate(EXITS.values())
    ]
    data = load_dataset(configs[0].dataset)
    build = lambda c: build_model(c.model, data.input_shape, data.num_classes, seed=c.seed)  # noqa: E731
    alone = [train(build(c), data, c.train, seed=c.seed) for c in configs]
    order, logged = [], []
    models = [build(c) for c in configs]
    together = train_population(
        models,
        data,
        [c.train for c in configs],
        seeds=[c.seed for c in configs],
        log=lambda i, r: logged.append((i, r)),
        on_result=lambda i, r: order.append((i, r.steps)),
    )
    for name, a, b, (_, status) in zip(EXITS, alone, together, EXITS.values()):
        assert (b.status, b.reason, b.epochs, b.steps) == (a.status, a.reason, a.epochs, a.steps), name
        assert status is None or a.status == status, (name, a.reason)
        assert [(r["kind"], r["step"]) for r in b.history] == [(r["kind"], r["step"]) for r in a.history], name
        if a.status != "diverged":
            assert b.final == pytest.approx(a.final, rel=1e-4, abs=1e-6), name
    assert not math.isfinite(together[0].final["train_loss"])  # a NaN/inf member ...
    assert all(flat(m).isfinite().all() for m in models[1:])
    assert [s for _, s in order] == sorted(s for _, s in order) and len(order) == 4  # ... leaves at once, in step order
    for i, r in enumerate(together):
        typed = [
            (rec.kind, rec.step, rec.values.get("train_loss")) for j, rec in logged if j == i
        ]  # typed records, as kept
        assert typed == [(rec["kind"], rec["step"], rec.get("train_loss")) for rec in r.history]


def test_tracked_lambda_max_equals_the_one_tracked_alone():
    track = {"every_steps": 5, "subset": 100, "metrics": ["hessian_top_eig"]}
    configs = [
        config({"lr": lr, "momentum": 0.5, "batch_size": 50, "max_epochs": 4, "stop": {}, "track": track}, seed=i)
        for i, lr in enumerate([0.05, 0.2, 0.5])
    ]
    data = load_dataset(configs[0].dataset)
    build = lambda c: build_model(c.model, data.input_shape, data.num_classes, seed=c.seed)  # noqa: E731
    together = train_population([build(c) for c in configs], data, [c.train for c in configs], seeds=[0, 1, 2])
    for c, b in zip(configs, together):
        a = train(build(c), data, c.train, seed=c.seed)
        ta, tb = ([r for r in res.history if r["kind"] == "track"] for res in (a, b))
        assert [r["step"] for r in tb] == [r["step"] for r in ta] == list(range(0, 21, 5))
        for ra, rb in zip(ta, tb):
            assert rb["hessian_top_eig"] == pytest.approx(ra["hessian_top_eig"], rel=1e-4)
            assert rb["eos_ratio"] == pytest.approx(rb["hessian_top_eig"] * rb["lr"] / (2 + 2 * 0.5))


class _Branchy(nn.Module):
    """Data-dependent control flow: cannot run under vmap."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.lin = nn.Linear(input_shape[0], num_classes)

    def forward(self, x):
        out = self.lin(x)
        return out if float(out.sum()) > 0 else -out


class _Residual(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.a, self.b = nn.Linear(input_shape[0], 8), nn.Linear(8, num_classes)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h + h.pow(2))


def make_branchy(input_shape, num_classes):
    return _Branchy(input_shape, num_classes)


def make_residual(input_shape, num_classes):
    return _Residual(input_shape, num_classes)


def test_what_stacks_and_why_not():
    assert stack_check(config()) is None
    assert stack_check(config(model={"name": "cnn1d", "width": 4})) is None
    assert "batch norm" in stack_check(config(model={"name": "mlp", "batch_norm": True}))
    assert "dropout" in stack_check(config(model={"name": "mlp", "dropout": 0.2}))
    assert "stacked forward fails" in stack_check(config(model={"name": "test_population:make_branchy"}))
    assert stack_check(config(model={"name": "test_population:make_residual"})) is None
    frozen = build_model(config().model, (6,), 3)
    frozen[1].bias.requires_grad_(False)
    assert "frozen" in module_stack_reason(frozen)
    bias, weight = frozen[1].bias.clone(), frozen[1].weight.clone()
    alone = config({"max_epochs": 1, "stop": {}})
    assert train(frozen, load_dataset(alone.dataset), alone.train).steps == 2  # one model: frozen parameters stay put
    assert torch.equal(frozen[1].bias, bias) and not torch.equal(frozen[1].weight, weight)
    bn = [
        load_config({"name": "p", "dataset": TEACHER, "model": {"name": "mlp", "batch_norm": True}, "seed": s})
        for s in (0, 1)
    ]
    data = load_dataset(bn[0].dataset)
    with pytest.raises(ValueError, match="do not stack: .*batch norm"):
        train_population(
            [build_model(c.model, data.input_shape, 3, seed=c.seed) for c in bn],
            data,
            [c.train for c in bn],
            seeds=[0, 1],
        )
    with pytest.raises(ValueError, match="do not stack: model.batch_norm"):
        run_population(bn, on_result=lambda i, r: None)


def test_population_key_is_the_shape_not_the_scalars():
    base = config({"lr": 0.1})
    same = [
        config({"lr": 0.3, "momentum": 0.9, "schedule": "cosine", "stop": {"train_acc": 0.9}, "max_epochs": 7}, seed=5),
        config({"lr": 0.1}, measure=["hessian_top_eig"]),
    ]
    other = [
        config({"batch_size": 64}),
        config(model={"name": "mlp", "width": 13}),
        config({"optimizer": "adam"}),
        load_config(
            {"name": "p", "dataset": {**TEACHER, "seed": 1}, "model": {"name": "mlp", "width": 12}, "measure": []}
        ),
        config({"loss": "mse"}),
        config({"track": {"every_steps": 10}}),
    ]
    assert all(population_key(c) == population_key(base) for c in same)
    assert all(population_key(c) != population_key(base) for c in other)
    with pytest.raises(ValueError, match=r"configs\[1\]: its shape key differs"):
        run_population([base, other[0]], on_result=lambda i, r: None)
    with pytest.raises(ValueError, match=r"cfgs\[1\].batch_size: differs"):
        data = load_dataset(base.dataset)
        train_population([build_model(base.model, (6,), 3)] * 2, data, [base.train, other[0].train], seeds=[0, 0])


def test_run_population_measures_writes_and_reports_each_member_as_run_trial_alone(tmp_path):
    configs = [
        config(
            {"lr": lr, "momentum": 0.9, "batch_size": 50, "max_epochs": mx, "stop": {"train_loss": 0.3}},
            seed=i,
            measure=["hessian_top_eig"],
        )
        for i, (lr, mx) in enumerate([(0.1, 30), (1e4, 30), (0.01, 2)])
    ]
    seen = []
    results = run_population(
        configs,
        on_result=lambda i, r: seen.append((i, r.status, r.artifacts["result.json"].exists())),
        out_dirs=[tmp_path / str(i) for i in range(3)],
        device="cpu",
    )
    assert sorted(i for i, _, _ in seen) == [0, 1, 2] and all(written for _, _, written in seen)
    assert seen[0][:2] == (1, "diverged")  # the diverged member is reported first
    assert [r.status for r in results] == ["converged", "diverged", "not_converged"]
    for c, r in zip(configs, results):
        a = run_trial(c, device="cpu")
        assert (a.status, a.reason) == (r.status, r.reason)
        for key, value in a.metrics.items():
            if not key.endswith("seconds"):
                assert r.metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key
    assert "hessian_top_eig" not in results[1].metrics and "hessian_top_eig" in results[2].metrics


def test_a_stopped_member_leaves_pruned_and_the_others_train_on_as_alone(compiled):
    configs = [
        config({"lr": lr, "momentum": 0.9, "batch_size": 50, "max_epochs": 6, "stop": {}}, seed=i)
        for i, lr in enumerate([0.05, 0.1, 0.2])
    ]
    data = load_dataset(configs[0].dataset)
    build = lambda c: build_model(c.model, data.input_shape, data.num_classes, seed=c.seed)  # noqa: E731
    models, asked = [build(c) for c in configs], []

    def stop(i):  # member 1 is stopped once it has logged 3 epochs (asked after each epoch)
        asked.append(i)
        return "pruned by the test" if i == 1 and asked.count(1) >= 3 else None

    together = train_population(models, data, [c.train for c in configs], seeds=[0, 1, 2], stop=stop)
    assert (together[1].status, together[1].reason, together[1].epochs) == ("pruned", "pruned by the test", 3)
    short = build(configs[1])
    train(short, data, configs[1].train.model_copy(update={"max_epochs": 3}), seed=1)  # the same 3 epochs alone
    for p, q in zip(models[1].parameters(), short.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
    for i in (0, 2):  # the others are untouched by their neighbour leaving
        alone = build(configs[i])
        result = train(alone, data, configs[i].train, seed=i)
        assert (together[i].status, together[i].epochs, together[i].steps) == (result.status, 6, result.steps)
        for p, q in zip(models[i].parameters(), alone.parameters()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
    results = run_population(
        [c.model_copy(update={"measure": ["hessian_top_eig"]}) for c in configs],
        on_result=lambda i, r: None,
        stop=lambda i: "pruned" if i == 0 else None,
        device="cpu",
    )
    assert results[0].status == "pruned" and "hessian_top_eig" not in results[0].metrics  # pruned: no measures
    assert "hessian_top_eig" in results[1].metrics


def test_the_worker_yields_a_member_while_the_rest_of_its_population_trains(tmp_path):
    """sweeps.service.worker's population generator (the body of the Ray task) hands a finished member to
    the driver at once: the long member cannot log its third epoch until the short member's
    record has been taken from the generator."""
    configs = [
        config({"lr": 0.1, "batch_size": 50, "max_epochs": epochs, "stop": {}}, seed=i)
        for i, epochs in enumerate([1, 4])
    ]
    taken, waited = threading.Event(), []

    class GatedStream(MetricStream):
        def record(self, record):
            super().record(record)
            if self.trial_number == 1 and record.kind == "epoch" and record.values["epoch"] == 3:
                waited.append(taken.wait(timeout=60))

    streams = [GatedStream(None, i) for i in range(2)]
    order = []
    for index, result, tb in _members(None, configs, streams, [tmp_path / "0", tmp_path / "1"], "cpu"):
        assert tb is None, tb
        order.append((index, result.status, result.metrics["epochs"]))
        taken.set()
    assert order == [(0, "converged", 1), (1, "converged", 4)] and waited == [True]


def test_members_measured_apart_equal_members_measured_in_place(tmp_path):
    configs = [
        config(
            {"lr": lr, "momentum": 0.9, "batch_size": 50, "max_epochs": 3, "stop": {}},
            seed=i,
            measure=["hessian_top_eig", "dist_from_init"],
        )
        for i, (lr) in enumerate([0.1, 1e4, 0.05])
    ]
    in_place = run_population(configs, on_result=lambda i, r: None, device="cpu")
    trained, direct = {}, []
    apart = run_population(
        configs, on_result=lambda i, r: direct.append(i), on_trained=trained.__setitem__, device="cpu"
    )
    assert direct == [1] and sorted(trained) == [0, 2]  # the diverged member has nothing to measure
    assert apart[1].status == "diverged" and apart[0] is None and apart[2] is None
    for i, member in trained.items():
        assert all(t.device.type == "cpu" for t in member.state.values())
        result = measure_trained(member, out_dir=tmp_path / str(i), device="cpu")
        assert (result.status, result.reason) == (in_place[i].status, in_place[i].reason)
        for key, value in in_place[i].metrics.items():
            if not key.endswith("seconds"):
                assert result.metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        assert {"model.pt", "init_state.pt", "history.json", "result.json"} <= set(result.artifacts)


@pytest.mark.parametrize("name", ["cnn", "nin", "resnet"])
def test_image_models_stack_through_vmap(name):
    configs = [
        load_config(
            {
                "name": "p",
                "seed": i,
                "dataset": {"name": "digits", "train_size": 64, "test_size": 32},
                "model": {"name": name, "width": 2, "depth": 1},
                "train": {"lr": 0.05 * (i + 1), "momentum": 0.9, "batch_size": 16, "max_epochs": 1, "stop": {}},
                "measure": [],
            }
        )
        for i in range(2)
    ]
    assert all(stack_check(c) is None for c in configs)
    data = load_dataset(configs[0].dataset)
    build = lambda c: build_model(c.model, data.input_shape, data.num_classes, seed=c.seed)  # noqa: E731
    together = [build(c) for c in configs]
    train_population(together, data, [c.train for c in configs], seeds=[0, 1])
    for c, model in zip(configs, together):
        alone = build(c)
        train(alone, data, c.train, seed=c.seed)
        for (n, p), q in zip(model.named_parameters(), alone.parameters()):
            assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), n
