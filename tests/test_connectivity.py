"""Linear mode connectivity (landscape.connectivity) against closed forms and brute force."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_unchanged, make_batches, make_classifier, snapshot
from torch import nn

from landscape.connectivity import barrier, linear_path


def test_double_well_has_barrier_one_in_closed_form():
    """w in {-1, 1} are minima of (w^2 - 1)^2 (input 1): at a = 1/2, w = 0 and the loss is 1."""
    model = nn.Linear(1, 1, bias=False).double()
    data = [(torch.ones(3, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))]

    def loss_fn(out, _):
        return ((out.squeeze(-1) ** 2 - 1) ** 2).mean()

    a, b = (
        {"weight": torch.tensor([[-1.0]], dtype=torch.float64)},
        {"weight": torch.tensor([[1.0]], dtype=torch.float64)},
    )
    path = linear_path(model, loss_fn, data, a, b, points=5)
    assert path.loss_barrier == pytest.approx(1.0)
    expected = [(w**2 - 1) ** 2 for w in (-1.0, -0.5, 0.0, 0.5, 1.0)]
    assert path.loss.tolist() == pytest.approx(expected)
    assert torch.isnan(path.error).all()  # no class labels


def test_mlp_path_matches_brute_force_and_leaves_the_model_alone():
    model = make_classifier("tanh")
    other = make_classifier("tanh", seed=1)
    batches = make_batches()
    loss_fn = nn.CrossEntropyLoss()
    before = snapshot(model)
    path = linear_path(model, loss_fn, batches, model.state_dict(), other.state_dict(), points=6)
    assert_unchanged(model, before)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    for i, alpha in enumerate(path.alphas.tolist()):
        net = copy.deepcopy(model)
        with torch.no_grad():
            for p, q in zip(net.parameters(), other.parameters()):
                p.copy_((1 - alpha) * p + alpha * q)
            out = net(x)
        assert path.loss[i] == pytest.approx(float(loss_fn(out, y)), rel=1e-10)
        assert path.error[i] == pytest.approx(float((out.argmax(-1) != y).double().mean()))
    chords = [(1 - a) * path.loss[0] + a * path.loss[-1] for a in path.alphas.tolist()]
    assert path.loss_barrier == pytest.approx(max(float(v - c) for v, c in zip(path.loss, chords)))
    same = linear_path(model, loss_fn, batches, model.state_dict(), model.state_dict(), points=3)
    assert same.loss_barrier == pytest.approx(0.0, abs=1e-12) and same.error_barrier == 0.0


def test_barrier_is_the_largest_excess_over_the_chord():
    alphas = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert barrier(torch.tensor([1.0, 1.0, 3.0, 2.0, 1.0]), alphas) == pytest.approx(2.0)
    assert barrier(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]), alphas) == pytest.approx(0.0)
