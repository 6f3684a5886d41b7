"""landscape.surface against ground truth: quadratics, direct evaluation of points, dense Hessians,
scale invariance, crafted barriers."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import assert_unchanged, rescaled, snapshot
from torch import nn
from torch.func import hessian

from landscape import ModelLoss, interpolate, surface_1d, surface_2d
from landscape.evaluate import (
    MIN_MICRO_BATCH,
    WORKING_SET,
    _cpu_plan,
    _fast_cross_entropy,
    _pieces,
    bytes_per_point,
    choose_chunk_size,
)
from landscape.surface import quadratic_fit, ray_crossing


class Quadratic(nn.Module):
    """``L(w) = 1/2 vec(w)^T A vec(w)``, ignoring its input; ``loss_fn`` passes it through."""

    def __init__(self, A: torch.Tensor, shape: tuple[int, int]):
        super().__init__()
        self.register_buffer("A", A)
        self.w = nn.Parameter(torch.zeros(shape, dtype=A.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w.reshape(-1)
        return 0.5 * w @ self.A @ w


def passthrough(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return out


def quadratic_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    A = M @ M.T + torch.diag(torch.linspace(-1, 2, 6, dtype=torch.float64))
    model = Quadratic(A, (2, 3))
    data = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    return model, A, data


def classifier(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    )
    # non-trivial batch-norm statistics, so that eval vs train mode matters
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(64, 5)
    y = torch.randint(0, 3, (64,))
    return model, (x, y)


def direct_eval(model: nn.Module, data, directions, coords) -> tuple[float, float]:
    """Loss/accuracy of a deep copy whose weights are moved to ``theta + sum c_k d_k``."""
    clone = copy.deepcopy(model).eval()
    with torch.no_grad():
        for n, p in clone.named_parameters():
            for c, d in zip(coords, directions):
                p.add_(c * d[n])
        out = clone(data[0])
    return float(nn.functional.cross_entropy(out, data[1])), float((out.argmax(1) == data[1]).float().mean())


def test_1d_curve_on_a_quadratic_is_half_t2_dAd():
    model, A, data = quadratic_problem()
    s = surface_1d(model, passthrough, data, steps=21, span=2.0, normalization="none")
    d = s.direction["w"].reshape(-1)
    dAd = float(d @ A @ d)
    np.testing.assert_allclose(s.loss, 0.5 * s.alphas**2 * dAd, rtol=1e-12, atol=1e-12)
    assert s.accuracy is None and s.center_loss == 0.0
    assert s.curvature() == pytest.approx(dAd, rel=1e-9)
    # flatness radius: 1/2 dAd r^2 = delta, up to the linear interpolation between grid points
    assert dAd > 0
    r = math.sqrt(2 * 0.1 / dAd)
    assert s.flatness_radius(0.1) == pytest.approx(r, abs=0.5 * (s.alphas[1] - s.alphas[0]))


def test_2d_surface_on_a_quadratic_and_its_fitted_hessian():
    model, A, data = quadratic_problem(1)
    s = surface_2d(model, passthrough, data, steps=(9, 7), span=(1.0, 0.5), normalization="none")
    D = torch.stack([d["w"].reshape(-1) for d in s.directions])
    G = (D @ A @ D.T).numpy()
    a, b = np.meshgrid(s.alphas, s.betas, indexing="ij")
    expected = 0.5 * (G[0, 0] * a**2 + 2 * G[0, 1] * a * b + G[1, 1] * b**2)
    assert s.loss.shape == (9, 7)
    np.testing.assert_allclose(s.loss, expected, rtol=1e-12, atol=1e-12)
    fit = s.curvature(window=1.0)
    np.testing.assert_allclose(fit.hessian, G, rtol=1e-9)
    np.testing.assert_allclose(fit.eigenvalues, np.linalg.eigvalsh(G), rtol=1e-9)


def test_curvature_of_a_network_matches_the_dense_hessian():
    """Along a unit direction, the fitted curvature of a small window is d^T H d."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    loss_fn = nn.CrossEntropyLoss()
    ml = ModelLoss(model, loss_fn, (x, y))
    H = hessian(lambda v: ml.batch_loss(ml.unflatten(v), x, y))(ml.theta_flat())
    u = torch.randn(ml.num_params, dtype=torch.float64)
    u /= u.norm()
    s = surface_1d(model, loss_fn, (x, y), steps=21, span=1e-2, direction=u)
    assert s.curvature(window=1e-2) == pytest.approx(float(u @ H @ u), rel=1e-4)


def test_center_and_random_points_match_direct_evaluation():
    model, data = classifier()
    model.train()  # the surface must use eval mode anyway
    s = surface_2d(model, nn.CrossEntropyLoss(), data, steps=7, seed=3)
    ref_loss, ref_acc = direct_eval(model, data, s.directions, (0.0, 0.0))
    assert s.center_loss == pytest.approx(ref_loss, rel=1e-6)
    assert s.center_accuracy == pytest.approx(ref_acc)
    assert s.loss[3, 3] == pytest.approx(ref_loss, rel=1e-5)
    rng = np.random.default_rng(0)
    for i, j in rng.integers(0, 7, size=(5, 2)):
        loss, acc = direct_eval(model, data, s.directions, (s.alphas[i], s.betas[j]))
        assert s.loss[i, j] == pytest.approx(loss, rel=1e-5)
        assert s.accuracy[i, j] == pytest.approx(acc)
    # biases and batch-norm parameters are not moved by default
    assert torch.count_nonzero(s.directions[0]["0.bias"]) == 0
    s1 = surface_1d(model, nn.CrossEntropyLoss(), data, steps=5, seed=3)
    loss, _ = direct_eval(model, data, s1.directions, (s1.alphas[4],))
    assert s1.loss[4] == pytest.approx(loss, rel=1e-5)
    # same seed: the 1D direction is the 2D surface's first direction
    assert all(torch.equal(s1.direction[n], s.directions[0][n]) for n in s1.direction)


def test_chunking_and_batches_do_not_change_values():
    model, (x, y) = classifier(1)
    loss_fn = nn.CrossEntropyLoss()
    ref = surface_2d(model, loss_fn, (x, y), steps=5, chunk_size=1)
    for kwargs in (
        {"chunk_size": 4},
        {"memory_budget": 1},
        {},
        {"micro_batch": 10},
        {"chunk_size": 3, "micro_batch": 7},
    ):
        s = surface_2d(model, loss_fn, (x, y), steps=5, **kwargs)
        np.testing.assert_allclose(s.loss, ref.loss, rtol=1e-5)
    # the chunk size follows the memory budget: the bytes one point needs, measured on a batch
    ml = ModelLoss(model, loss_fn, (x, y))
    per_point = bytes_per_point(ml)
    assert per_point > 4 * (ml.num_params + 64 * 8)  # at least the parameters and one activation
    assert choose_chunk_size(ml, 100, memory_budget=10 * per_point) == 10
    assert choose_chunk_size(ml, 5, memory_budget=10 * per_point) == 5
    # the CPU plan: one point per pass, pieces of at most WORKING_SET bytes, >= MIN_MICRO_BATCH
    assert _cpu_plan(100.0, 4000) == (1, None)  # small activations: no cutting
    assert _cpu_plan(WORKING_SET / 1024, 4000) == (1, 1024)
    assert _cpu_plan(WORKING_SET / 10, 4000) == (1, MIN_MICRO_BATCH)
    # pieces: the fewest of at most the given size, balanced (no small remainder)
    assert [len(t) for _, t in _pieces(x, y, 10)] == [10] + [9] * 6  # 64 samples in 7 pieces
    samples = torch.arange(4000)
    assert [len(t) for _, t in _pieces(samples[:, None], samples, 1960)] == [1334, 1333, 1333]
    assert [len(t) for _, t in _pieces(samples[:, None], samples, 4000)] == [4000]
    # a partial last batch is weighted by its size
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=24)
    s = surface_2d(model, loss_fn, loader, steps=5)
    np.testing.assert_allclose(s.loss, ref.loss, rtol=1e-5)
    np.testing.assert_allclose(s.accuracy, ref.accuracy, rtol=1e-6)


def scaled_mlp(scale: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))
    return rescaled(model, scale)


def test_filter_normalized_surfaces_are_scale_invariant():
    torch.manual_seed(0)
    data = (torch.randn(80, 6), torch.randint(0, 4, (80,)))
    loss_fn = nn.CrossEntropyLoss()
    base, scaled = scaled_mlp(1.0), scaled_mlp(4.0)
    with torch.no_grad():
        torch.testing.assert_close(base(data[0]), scaled(data[0]), rtol=1e-5, atol=1e-6)
    for fn, steps in ((surface_1d, 9), (surface_2d, 7)):
        s0 = fn(base, loss_fn, data, steps=steps, seed=2)
        s4 = fn(scaled, loss_fn, data, steps=steps, seed=2)
        np.testing.assert_allclose(s4.loss, s0.loss, rtol=1e-5)
        # without normalization the surface does see the rescaling
        n0 = fn(base, loss_fn, data, steps=steps, seed=2, normalization="none")
        n4 = fn(scaled, loss_fn, data, steps=steps, seed=2, normalization="none")
        assert np.abs(n4.loss - n0.loss).max() > 1e-3
    assert s4.curvature(0.5).eigenvalues == pytest.approx(s0.curvature(0.5).eigenvalues, rel=1e-4)


def test_interpolate_barrier_on_a_double_well():
    class DoubleWell(nn.Module):
        def __init__(self, w: float):
            super().__init__()
            self.w = nn.Parameter(torch.full((1, 1), w, dtype=torch.float64))

        def forward(self, x):
            return (self.w.sum() ** 2 - 1) ** 2 + 0.25 * (self.w.sum() + 1)

    data = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    a, b = DoubleWell(-1.0), DoubleWell(1.0)
    it = interpolate(a, b, passthrough, data, steps=41)
    t = it.alphas
    w = -1 + 2 * t
    np.testing.assert_allclose(it.loss, (w**2 - 1) ** 2 + 0.25 * (w + 1), rtol=1e-12, atol=1e-12)
    assert (it.loss_a, it.loss_b) == (0.0, 0.5)
    # by hand: on the grid t = k/20 the largest value on [0, 1] is at t = 0.55 (w = 0.1):
    # (0.01 - 1)^2 + 0.25 * 1.1 = 1.2551; the mean of the ends is 0.25.
    assert it.barrier == pytest.approx(1.2551 - 0.25, abs=1e-12)
    # height above the chord 0.5 t: at t = 0.5 it is 1 + 0.25 - 0.25 = 1.0
    assert it.barrier_linear == pytest.approx(1.0, abs=1e-12)
    assert it.accuracy is None


def test_interpolation_between_classifiers_hits_both_ends():
    model_a, data = classifier(2)
    model_b, _ = classifier(3)
    it = interpolate(model_a, model_b.state_dict(), nn.CrossEntropyLoss(), data, steps=9, span=(0.0, 1.0))
    # model_b's batch-norm statistics are not interpolated: compare with model_a's buffers
    hybrid = copy.deepcopy(model_a)
    hybrid.load_state_dict({**model_b.state_dict(), **{k: v for k, v in model_a.named_buffers()}})
    end_loss, end_acc = direct_eval(hybrid, data, [], ())
    start_loss, _ = direct_eval(model_a, data, [], ())
    assert it.loss[0] == pytest.approx(start_loss, rel=1e-5) and it.loss_a == pytest.approx(start_loss, rel=1e-6)
    assert it.loss[-1] == pytest.approx(end_loss, rel=1e-5) and it.loss_b == pytest.approx(end_loss, rel=1e-6)
    assert it.accuracy_b == pytest.approx(end_acc)
    assert it.barrier >= 0


def test_model_is_unchanged_by_every_call():
    model, data = classifier(4)
    other, _ = classifier(5)
    model.train()
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)
    model[4].bias.requires_grad_(False)
    before = snapshot(model)
    loss_fn = nn.CrossEntropyLoss()
    surface_1d(model, loss_fn, data, steps=3)
    surface_2d(model, loss_fn, data, steps=3)
    interpolate(model, other, loss_fn, data, steps=3)
    assert_unchanged(model, before)


def test_flatness_radius_and_fit_helpers():
    assert ray_crossing(np.array([1.0, 2.0]), np.array([0.05, 0.25]), 0.0, 0.15) == pytest.approx(1.5)
    assert ray_crossing(np.array([1.0, 2.0]), np.array([0.05, 0.08]), 0.0, 0.15) == math.inf
    model, A, data = quadratic_problem()
    small = surface_2d(model, passthrough, data, steps=5, span=1e-3, normalization="none")
    assert small.flatness_radius(1.0) == math.inf
    with pytest.raises(ValueError, match="window"):
        quadratic_fit(np.array([[0.0], [1.0]]), np.array([0.0, 1.0]), window=0.5)
    with pytest.raises(ValueError, match="odd"):
        surface_2d(model, passthrough, data, steps=4, normalization="none").flatness_radius()


def test_bad_arguments_name_the_field():
    model, data = classifier()
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="steps"):
        surface_1d(model, loss_fn, data, steps=1)
    with pytest.raises(ValueError, match="span"):
        surface_1d(model, loss_fn, data, span=-1.0)
    with pytest.raises(ValueError, match="normalization"):
        surface_2d(model, loss_fn, data, steps=3, normalization="filterwise")
    with pytest.raises(ValueError, match="directions"):
        surface_2d(model, loss_fn, data, steps=3, directions=[torch.zeros(3)])
    with pytest.raises(KeyError, match="directions"):
        surface_1d(model, loss_fn, data, steps=3, direction={"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="span"):
        interpolate(model, model, loss_fn, data, span=(1.0, 0.0))
    with pytest.raises(ValueError, match="micro_batch"):
        surface_1d(model, loss_fn, data, steps=3, micro_batch=0)


def test_surface_measures_in_the_registry():
    import landscape

    torch.manual_seed(0)
    data = (torch.randn(80, 6), torch.randint(0, 4, (80,)))
    loss_fn = nn.CrossEntropyLoss()
    base_model = scaled_mlp(1.0)
    opt = torch.optim.Adam(base_model.parameters(), lr=0.02)
    for _ in range(150):  # near a minimum, so that the loss rises in every direction
        opt.zero_grad()
        loss_fn(base_model(data[0]), data[1]).backward()
        opt.step()
    base_model.zero_grad(set_to_none=True)
    names = ["surface_1d_curvature", "surface_2d_curvature", "flatness_radius"]
    options = {"flatness_radius": {"delta": 0.05}}
    base = landscape.measure(base_model, loss_fn, data, metrics=names, options=options)
    scaled = landscape.measure(rescaled(base_model, 4.0), loss_fn, data, metrics=names, options=options)
    for name in names:
        assert scaled[name] == pytest.approx(base[name], rel=1e-4), name  # filter normalization
    # the 1D curvature is the mean of the 1D surfaces along the seeded directions 0 and 1
    s0 = surface_1d(base_model, loss_fn, data, steps=21, span=0.4, seed=0)
    d1 = surface_2d(base_model, loss_fn, data, steps=3, seed=0).directions[1]
    s1 = surface_1d(base_model, loss_fn, data, steps=21, span=0.4, direction=d1)
    assert base["surface_1d_curvature"] == pytest.approx((s0.curvature() + s1.curvature()) / 2, rel=1e-6)
    assert 0 < base["flatness_radius"] < math.inf
    assert landscape.METRICS["flatness_radius"].larger_is == "flatter"


def test_fast_cross_entropy_equals_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 10, generator=g, dtype=torch.float64) * 30  # far from uniform
    labels = torch.randint(0, 10, (300,), generator=g)
    for loss_fn in (nn.CrossEntropyLoss(), nn.functional.cross_entropy):
        fast = _fast_cross_entropy(loss_fn)
        assert fast is not loss_fn
        assert float(fast(logits, labels)) == pytest.approx(float(loss_fn(logits, labels)), rel=1e-12)
        # labels equal to ignore_index and probability targets are left to torch
        ignored = labels.clone()
        ignored[:7] = -100
        assert float(fast(logits, ignored)) == pytest.approx(float(loss_fn(logits, ignored)), rel=1e-12)
        probs = torch.softmax(torch.randn(300, 10, generator=g, dtype=torch.float64), -1)
        assert float(fast(logits, probs)) == pytest.approx(float(loss_fn(logits, probs)), rel=1e-12)
    # any non-default option keeps the given loss
    for loss_fn in (
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=torch.ones(10)),
        nn.CrossEntropyLoss(reduction="sum"),
        nn.MSELoss(),
    ):
        assert _fast_cross_entropy(loss_fn) is loss_fn
