"""Sharpness measures against closed forms (quadratics, Keskar boxes, Jiang drops with known
Gaussian tails) and the Dinh et al. rescaling invariances."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch
from conftest import rescaled
from torch import nn
from torch.func import functional_call, hessian

from landscape import HessianOperator, ModelLoss
from landscape.curvature import adaptive_trace, filter_curvature
from landscape.sharpness import (
    average_sharpness,
    keskar_sharpness,
    pacbayes_flatness,
    perturbation_scale,
    sharpness_flatness,
    worst_case_sharpness,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is fastest


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
class Quadratic(nn.Module):
    """Loss ``1/2 (w - center)^T A (w - center) + offset`` for every example (inputs ignored)."""

    def __init__(self, A: torch.Tensor, center: torch.Tensor, offset: float = 0.0):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("center", center)
        self.w = nn.Parameter(center.clone())
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.w - self.center
        return (0.5 * d @ self.A @ d + self.offset).expand(x.shape[0])


def mean_output(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs.mean()


def dummy_data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, 1, dtype=F64), torch.zeros(n, dtype=F64)


@pytest.fixture(scope="module")
def quadratic() -> tuple[Quadratic, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=F64))
    eigenvalues = torch.tensor([5.0, 2.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01], dtype=F64)
    A = q @ torch.diag(eigenvalues) @ q.T
    return Quadratic((A + A.T) / 2, torch.zeros(12, dtype=F64)), eigenvalues


def make_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).to(F64)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Sequential, tuple[torch.Tensor, torch.Tensor]]:
    """A small ReLU MLP fitted on a teacher-labelled 3-class problem (96 examples)."""
    torch.manual_seed(0)
    X = torch.randn(96, 6, dtype=F64)
    y = (X @ torch.randn(6, 3, dtype=F64)).argmax(1)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, (X, y)


def dense_hessian(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth ``(H, w)`` over all parameters by torch.func.hessian on the flat vector."""
    ml = ModelLoss(model, nn.CrossEntropyLoss(), (X, y))
    w = ml.theta_flat()
    H = hessian(lambda v: nn.functional.cross_entropy(functional_call(model, ml.unflatten(v), (X,)), y))(w)
    return H, w


# ----------------------------------------------------------------------------------------------
# quadratics: closed forms
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [None, 64])
def test_worst_case_l2_on_quadratic_is_half_rho2_lambda_max(quadratic, m):
    model, eigenvalues = quadratic
    rho = 0.1
    result = worst_case_sharpness(model, mean_output, dummy_data(), rho=rho, p=2, adaptive=False, m=m, n_examples=None)
    expected = 0.5 * rho**2 * float(eigenvalues.max())
    assert result.value == pytest.approx(expected, rel=1e-2)
    assert result.value <= expected * (1 + 1e-9)  # a maximum over the ball cannot exceed it
    assert len(result.per_batch) == (1 if m is None else 4)


def test_worst_case_linf_on_diagonal_quadratic_is_the_corner():
    a = torch.tensor([3.0, 1.0, 0.5, 0.2], dtype=F64)
    model = Quadratic(torch.diag(a), torch.zeros(4, dtype=F64))
    rho = 0.05
    result = worst_case_sharpness(model, mean_output, dummy_data(), rho=rho, p="inf", adaptive=False, m=None)
    assert result.value == pytest.approx(0.5 * rho**2 * float(a.sum()), rel=1e-9)


def test_average_on_quadratic_is_half_rho2_trace(quadratic):
    model, eigenvalues = quadratic
    rho = 0.1
    result = average_sharpness(model, mean_output, dummy_data(), rho=rho, adaptive=False, m=None, n_samples=400)
    expected = 0.5 * rho**2 * float(eigenvalues.sum())
    assert result.std_err > 0
    assert abs(result.value - expected) <= 3 * result.std_err
    assert result.std_err < 0.1 * expected  # the check above is not vacuous


def test_keskar_equals_box_corner_of_diagonal_quadratic():
    gen = torch.Generator().manual_seed(1)
    center = torch.randn(8, generator=gen, dtype=F64)
    a = torch.rand(8, generator=gen, dtype=F64) + 0.5
    offset, eps = 0.3, 1e-3
    model = Quadratic(torch.diag(a), center, offset=offset)
    # convex loss: the maximum over the box sits at a corner, |y_i| = eps (|w_i| + 1)
    hand = 100 * float(0.5 * (a * (eps * (center.abs() + 1)) ** 2).sum()) / (1 + offset)
    pga = keskar_sharpness(model, mean_output, dummy_data(), eps=eps, method="pga")
    lbfgsb = keskar_sharpness(model, mean_output, dummy_data(), eps=eps, method="lbfgsb", max_iter=30)
    default = keskar_sharpness(model, mean_output, dummy_data(), eps=eps)
    assert pga.value == pytest.approx(hand, rel=1e-8)
    assert lbfgsb.value == pytest.approx(hand, rel=1e-6)
    assert 0.5 * hand < default.value <= hand * (1 + 1e-9)
    assert pga.loss == pytest.approx(offset)


# ----------------------------------------------------------------------------------------------
# Jiang et al.: drops with known Gaussian tails
# ----------------------------------------------------------------------------------------------
class OneWeightPerExample(nn.Module):
    """Example ``k`` has logits ``[a_k, 0]`` and label 0: correct iff ``a_k + u_k > 0``."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        logit = self.a[index]
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def one_weight_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n), torch.zeros(n, dtype=torch.long)


def test_perturbation_scale_is_a_standard_deviation():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(200_000, generator=gen, dtype=F64)
    sigma = 0.5
    u = perturbation_scale(w, sigma, magnitude_aware=True, eps=0.0) * torch.randn(w.shape, generator=gen, dtype=F64)
    assert float((u / w.abs()).std()) == pytest.approx(sigma, rel=1e-2)  # sigma^2 would be 0.25
    plain = perturbation_scale(w, sigma, magnitude_aware=False, eps=1e-3) * torch.randn(
        w.shape, generator=gen, dtype=F64
    )
    assert float(plain.std()) == pytest.approx(sigma, rel=1e-2)
    box = perturbation_scale(w, 0.2, magnitude_aware=True, eps=1e-3, box=True)
    assert torch.allclose(box, 0.2 * w.abs() + 1e-3)


def test_pacbayes_sigma_matches_gaussian_tail_magnitude_aware():
    # correct iff 1 + sigma z > 0: accuracy Phi(1/sigma); drop 0.1 at 1/sigma = Phi^-1(0.9)
    n = 4000
    model = OneWeightPerExample(torch.ones(n, dtype=F64))
    result = pacbayes_flatness(model, nn.CrossEntropyLoss(), one_weight_data(n), eps=0.0)
    expected = 1 / scipy.stats.norm.ppf(0.9)  # 0.780; a variance/std mix-up gives 0.883
    assert result.accuracy == 1.0 and result.bracketed
    assert result.level == pytest.approx(expected, abs=0.02)
    assert result.value == pytest.approx(1 / result.level**2)


def test_pacbayes_sigma_matches_gaussian_tail_plain():
    n = 4000
    a = torch.linspace(0.5, 1.5, n, dtype=F64)
    model = OneWeightPerExample(a)
    result = pacbayes_flatness(model, nn.CrossEntropyLoss(), one_weight_data(n), magnitude_aware=False)
    an = a.numpy()
    expected = scipy.optimize.brentq(lambda s: 1 - scipy.stats.norm.cdf(an / s).mean() - 0.1, 0.05, 5)
    assert result.level == pytest.approx(expected, abs=0.02)


def test_sharpness_alpha_is_where_the_adversary_can_flip():
    n = 200
    # magnitude-aware: the box |u_k| <= alpha |a_k| flips every example at alpha = 1 exactly
    model = OneWeightPerExample(torch.linspace(0.5, 1.5, n, dtype=F64))
    mag = sharpness_flatness(model, nn.CrossEntropyLoss(), one_weight_data(n), eps=0.0, steps=5, restarts=1)
    assert mag.level == pytest.approx(1.0, abs=1e-3)
    # plain: |u_k| <= alpha flips the examples with a_k <= alpha: 10% of them at alpha = 0.6
    plain = sharpness_flatness(
        model, nn.CrossEntropyLoss(), one_weight_data(n), magnitude_aware=False, steps=5, restarts=1
    )
    assert plain.level == pytest.approx(0.6, abs=0.01)


def test_flatness_needs_classification(quadratic):
    model, _ = quadratic
    with pytest.raises(ValueError, match="class scores"):
        pacbayes_flatness(model, mean_output, dummy_data())


def last_layer_scaled(model: nn.Sequential, factor: float) -> nn.Sequential:
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[4].weight.mul_(factor)
        out[4].bias.mul_(factor)
    return out


def last_layer_shifted(model: nn.Sequential, shift: float) -> nn.Sequential:
    """Add the same vector to every class row: logits shift equally, predictions unchanged."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[4].weight.add_(shift * torch.ones(1, out[4].weight.shape[1], dtype=F64))
    return out


def test_jiang_levels_shrink_on_a_sharper_model(trained):
    model, data = trained
    loss = nn.CrossEntropyLoss()
    fast = {"n_steps": 10}
    # plain noise is absolute: logits 3x smaller make the same noise 3x stronger
    plain_sharp = last_layer_scaled(model, 1 / 3)
    assert (
        pacbayes_flatness(plain_sharp, loss, data, magnitude_aware=False, **fast).level
        < pacbayes_flatness(model, loss, data, magnitude_aware=False, **fast).level
    )
    assert (
        sharpness_flatness(plain_sharp, loss, data, magnitude_aware=False, steps=8, **fast).level
        < sharpness_flatness(model, loss, data, magnitude_aware=False, steps=8, **fast).level
    )
    # magnitude-aware noise scales with |w|: large cancelling weights make the same function sharper
    mag_sharp = last_layer_shifted(model, 3.0)
    assert torch.equal(mag_sharp(data[0]).argmax(1), model(data[0]).argmax(1))
    assert pacbayes_flatness(mag_sharp, loss, data, **fast).level < pacbayes_flatness(model, loss, data, **fast).level
    assert (
        sharpness_flatness(mag_sharp, loss, data, steps=8, **fast).level
        < sharpness_flatness(model, loss, data, steps=8, **fast).level
    )


def test_jiang_reproducible_by_seed(trained):
    model, data = trained
    loss = nn.CrossEntropyLoss()
    first = pacbayes_flatness(model, loss, data, seed=3, n_steps=10)
    again = pacbayes_flatness(model, loss, data, seed=3, n_steps=10)
    other = pacbayes_flatness(model, loss, data, seed=4, n_steps=10)
    assert first.value == again.value
    assert other.value != first.value
    assert other.level == pytest.approx(first.level, rel=0.3)  # Monte-Carlo noise only


# ----------------------------------------------------------------------------------------------
# scale invariance (Dinh et al. 2017)
# ----------------------------------------------------------------------------------------------
INVARIANT = {
    "adaptive worst l2": lambda m, d: worst_case_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.3, m=48, steps=10).value,
    "adaptive worst linf": lambda m, d: (
        worst_case_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.01, p="inf", m=None, steps=10, restarts=2).value
    ),
    "adaptive avg": lambda m, d: average_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.1, m=48, n_samples=16).value,
    "filter curvature": lambda m, d: filter_curvature(m, nn.CrossEntropyLoss(), d, n_directions=4).value,
    "adaptive trace": lambda m, d: adaptive_trace(m, nn.CrossEntropyLoss(), d, sketch_size=8, rtol=0.5).value,
    "pacbayes mag": lambda m, d: pacbayes_flatness(m, nn.CrossEntropyLoss(), d, eps=0.0, n_steps=10).value,
    "sharpness mag": lambda m, d: sharpness_flatness(m, nn.CrossEntropyLoss(), d, eps=0.0, steps=8, n_steps=10).value,
}


def test_rescaling_keeps_function_and_changes_lambda_max(trained):
    model, (X, y) = trained
    other = rescaled(model)
    assert torch.allclose(other(X), model(X), rtol=1e-12, atol=1e-12)
    top = [float(torch.linalg.eigvalsh(dense_hessian(m, X, y)[0])[-1]) for m in (model, other)]
    assert abs(top[1] - top[0]) > 0.1 * abs(top[0])


@pytest.mark.parametrize("name", list(INVARIANT))
def test_scale_invariant_measures(trained, name):
    model, data = trained
    before, after = (INVARIANT[name](m, data) for m in (model, rescaled(model)))
    assert before > 0 and math.isfinite(before)
    assert after == pytest.approx(before, rel=1e-5)


def test_plain_measures_are_not_scale_invariant(trained):
    model, data = trained
    loss = nn.CrossEntropyLoss()
    values = [
        average_sharpness(m, loss, data, rho=0.05, adaptive=False, m=None, n_samples=16).value
        for m in (model, rescaled(model))
    ]
    assert abs(values[1] - values[0]) > 0.05 * abs(values[0])


def test_adaptive_trace_equals_dense(trained):
    model, (X, y) = trained
    H, w = dense_hessian(model, X, y)
    exact = float((w**2 * torch.diagonal(H)).sum())
    result = adaptive_trace(model, nn.CrossEntropyLoss(), (X, y), sketch_size=w.numel())
    assert result.value == pytest.approx(exact, rel=1e-8)
    estimate = adaptive_trace(model, nn.CrossEntropyLoss(), (X, y), method="hutchinson", max_hvp=256, rtol=0.05)
    assert abs(estimate.value - exact) <= 4 * estimate.std_err


def test_filter_curvature_equals_dense_quadratic_forms(trained):
    model, (X, y) = trained
    H, _ = dense_hessian(model, X, y)
    result = filter_curvature(model, nn.CrossEntropyLoss(), (X, y), n_directions=3, seed=2)
    from landscape.directions import filter_normalized_directions, random_directions

    ml = ModelLoss(model, nn.CrossEntropyLoss(), (X, y))
    V = filter_normalized_directions(ml, 3, seed=2)
    assert result.value == pytest.approx(float(torch.einsum("pk,pq,qk->k", V, H, V).mean()), rel=1e-8)
    biases = ml.unflatten(V.T)["0.bias"]
    assert torch.count_nonzero(biases) == 0
    surface_directions = random_directions(model, 3, seed=2)  # the same directions as surfaces
    torch.testing.assert_close(V, torch.stack([ml.flatten(d) for d in surface_directions], dim=1))
    H_op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))  # operator-first form
    assert filter_curvature(H_op, n_directions=3, seed=2).value == pytest.approx(result.value, rel=1e-12)
    assert adaptive_trace(H_op, sketch_size=8, rtol=0.5).value == pytest.approx(
        adaptive_trace(model, nn.CrossEntropyLoss(), (X, y), sketch_size=8, rtol=0.5).value, rel=1e-12
    )


# ----------------------------------------------------------------------------------------------
# m-sharpness plumbing, logit normalization, options
# ----------------------------------------------------------------------------------------------
def test_m_sharpness_batches_and_weights(trained):
    model, (X, y) = trained
    batches = [(X[:40], y[:40]), (X[40:], y[40:])]  # a list of batches is re-batched into m
    result = average_sharpness(model, nn.CrossEntropyLoss(), batches, m=32, n_examples=80, n_samples=4)
    assert result.n_examples == 80 and len(result.per_batch) == 3
    weights = np.array([32, 32, 16]) / 80
    assert result.value == pytest.approx(float(result.per_batch @ weights))
    whole = average_sharpness(model, nn.CrossEntropyLoss(), batches, m=None, n_examples=None, n_samples=4)
    assert whole.n_examples == 96 and len(whole.per_batch) == 1


def test_logit_normalization_removes_logit_scale(trained):
    model, data = trained
    loss = nn.CrossEntropyLoss()
    scaled = last_layer_scaled(model, 3.0)

    def run(m: nn.Module, normalize: bool) -> float:
        return average_sharpness(m, loss, data, m=None, n_samples=8, logit_normalization=normalize).value

    assert run(scaled, True) == pytest.approx(run(model, True), rel=1e-6)
    assert abs(run(scaled, False) - run(model, False)) > 0.05 * run(model, False)


def test_same_seed_same_value_other_seed_differs(trained):
    model, data = trained
    loss = nn.CrossEntropyLoss()
    values = [average_sharpness(model, loss, data, m=None, n_samples=8, seed=s).value for s in (0, 0, 1)]
    assert values[0] == values[1] != values[2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": -1.0}, "rho"),
        ({"p": 3}, "p:"),
        ({"m": 0}, "m:"),
        ({"n_examples": 1.5}, "n_examples"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_arguments_name_the_field(trained, kwargs, match):
    model, data = trained
    with pytest.raises(ValueError, match=match):
        worst_case_sharpness(model, nn.CrossEntropyLoss(), data, **kwargs)


def test_model_untouched(trained):
    model, data = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    worst_case_sharpness(model, nn.CrossEntropyLoss(), data, m=None, steps=3)
    keskar_sharpness(model, nn.CrossEntropyLoss(), data, max_iter=2)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_dataloader_streaming_equals_one_batch(trained):
    model, (X, y) = trained
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=40, shuffle=False)
    loss = nn.CrossEntropyLoss()
    for fn, kwargs in [(average_sharpness, {"n_samples": 4}), (worst_case_sharpness, {"steps": 4})]:
        streamed = fn(model, loss, loader, m=None, n_examples=None, **kwargs)
        whole = fn(model, loss, (X, y), m=None, n_examples=None, **kwargs)
        assert streamed.value == pytest.approx(whole.value, rel=1e-9)
        assert streamed.n_examples == 96
    assert keskar_sharpness(model, loss, loader).value == pytest.approx(
        keskar_sharpness(model, loss, (X, y)).value, rel=1e-7
    )


def test_jiang_subset_equals_call_on_the_subset(trained):
    model, (X, y) = trained
    loss = nn.CrossEntropyLoss()
    subset = pacbayes_flatness(model, loss, (X, y), n_examples=50, n_steps=8)
    direct = pacbayes_flatness(model, loss, (X[:50], y[:50]), n_steps=8)
    assert subset.n_examples == 50 and subset.level == direct.level
