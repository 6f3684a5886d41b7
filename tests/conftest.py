"""Shared fixtures: tiny models on tiny data, and ground truth by dense differentiation."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

BATCH_SIZES = (10, 7, 6)  # uneven on purpose: the data-set loss must weight batches by size


def make_classifier(activation: str = "tanh", *, seed: int = 0, width: int = 8, dtype=torch.float64) -> nn.Module:
    """MLP 4 -> width -> width -> 3 (P = 139 for width 8) in ``dtype``."""
    torch.manual_seed(seed)
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    return nn.Sequential(nn.Linear(4, width), act(), nn.Linear(width, width), act(), nn.Linear(width, 3)).to(dtype)


def make_batches(seed: int = 1, sizes=BATCH_SIZES, dtype=torch.float64) -> list[tuple[Tensor, Tensor]]:
    """Classification batches ``(x [n, 4], labels [n] in 0..2)`` of the given sizes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), 4, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (sum(sizes),), generator=g)
    return list(zip(torch.split(x, list(sizes)), torch.split(y, list(sizes))))


def rescaled(model: nn.Sequential, scale: float = 4.0) -> nn.Sequential:
    """A copy computing the same function (Dinh et al. 2017): layer 0 (weight and bias) times
    ``scale``, layer 2's weight divided by it (ReLU is positively homogeneous)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[0].weight.mul_(scale)
        out[0].bias.mul_(scale)
        out[2].weight.div_(scale)
    return out


def dense_hessian_of(
    model: nn.Module, loss_fn: Callable, batches: list[tuple[Tensor, Tensor]], names: list[str] | None = None
) -> Tensor:
    """Ground truth: ``torch.func.hessian`` of the mean loss over all samples (concatenated
    batches), w.r.t. the named parameters flattened in order. ``[P, P]``, float64."""
    named = {n: p.detach().double() for n, p in model.named_parameters()}
    names = names or list(named)
    x = torch.cat([b[0] for b in batches]).double()
    y = torch.cat([b[1] for b in batches])
    y = y.double() if y.is_floating_point() else y
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    model64 = copy.deepcopy(model).double()

    def loss_of(flat: Tensor) -> Tensor:
        parts = {n: p.reshape(s) for n, p, s in zip(names, torch.split(flat, sizes), shapes)}
        return loss_fn(functional_call(model64, {**named, **parts}, (x,)), y)

    flat = torch.cat([named[n].reshape(-1) for n in names])
    return torch.func.hessian(loss_of)(flat)


def snapshot(model: nn.Module) -> dict:
    """Everything about a model's state that a measurement must not change."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "dtypes": {n: p.dtype for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["dtypes"] == before["dtypes"]
    for n, p in before["params"].items():
        assert torch.equal(after["params"][n], p), n  # bitwise
    for n, g in before["grads"].items():
        assert (after["grads"][n] is None) == (g is None), n
        if g is not None:
            assert torch.equal(after["grads"][n], g), n
    for n, b in before["buffers"].items():
        assert torch.equal(after["buffers"][n], b), n


@pytest.fixture
def classifier_data():
    """``(model, loss_fn, batches, dense H)`` for the tanh MLP on uneven batches (float64)."""
    model = make_classifier("tanh")
    batches = make_batches()
    loss_fn = nn.CrossEntropyLoss()
    return model, loss_fn, batches, dense_hessian_of(model, loss_fn, batches)


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread (restored after): tiny models are many times faster
    that way on a loaded machine, where threads wait for each other."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def postgres_url():
    """A fresh database on the local PostgreSQL (dropped afterwards); skipped outside CI when the
    server is down (see tests/_cluster.Postgres)."""
    from _cluster import Postgres

    Postgres.require()
    pg = Postgres()
    try:
        yield pg.create("t")
    finally:
        pg.drop_all()


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def compiled(request, monkeypatch):
    """Run a population test eagerly and with ``resources.compile`` (the default ``auto`` made to
    compile every population that can: :data:`sweeps.trial.compiled_step.AUTO_MIN_STEPS` set to 0).
    Compiling costs seconds per program, so only the tests of the populations' ground truth ask
    for it, on tiny models."""
    if request.param:
        from sweeps.trial import compiled_step

        monkeypatch.setattr(compiled_step, "AUTO_MIN_STEPS", 0)
    return request.param
