"""Spectral density (SLQ): normalization, mean, quadrature against exact values, known spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_batches, make_classifier
from torch import nn

from landscape import HessianOperator, SpectrumResult, hessian_spectrum, spectral_density
from landscape._lanczos import as_operator, random_block

pytestmark = pytest.mark.usefixtures("single_thread")


def integral(result: SpectrumResult, f=lambda t: 1.0) -> float:
    return float(np.trapezoid(f(result.grid) * result.density, result.grid))


def test_tiny_mlp_density_integrates_to_one_and_its_mean_is_the_trace(classifier_data):
    model, loss_fn, batches, dense = classifier_data
    p = dense.shape[0]
    result = hessian_spectrum(model, loss_fn, batches, num_runs=6, num_steps=40, seed=3)
    assert result.n_hvp == 6 * 40 and result.ritz_values.shape == result.weights.shape == (6, 40)
    assert integral(result) == pytest.approx(1.0, abs=1e-6)
    mean = integral(result, lambda t: t)
    assert mean == pytest.approx(result.trace_estimate / p, rel=1e-6, abs=1e-9)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, rtol=1e-12)
    # The quadrature is exact for the moments <= 2m-1 of each start vector: check z^T H^j z / P
    # with the very probes the runs used (same seed, same generator order).
    probes = random_block(p, 6, torch.Generator().manual_seed(3), rademacher=True, like=as_operator(dense))
    for power in (1, 2, 3):
        exact = float(torch.einsum("pr,pr->r", probes, torch.linalg.matrix_power(dense, power) @ probes).mean()) / p
        quadrature = float(np.nansum(result.weights * result.ritz_values**power, axis=1).mean())
        assert quadrature == pytest.approx(exact, rel=1e-8)
    # a statistical check against the exact trace: within 3 standard errors of the runs
    per_run = p * np.nansum(result.weights * result.ritz_values, axis=1)
    assert abs(result.trace_estimate - float(torch.trace(dense))) <= 3 * per_run.std(ddof=1) / np.sqrt(6)
    # the extreme Ritz values converge to the extreme eigenvalues
    exact_eigs = torch.linalg.eigvalsh(dense)
    assert np.nanmax(result.ritz_values) == pytest.approx(float(exact_eigs[-1]), rel=1e-6)
    assert np.nanmin(result.ritz_values) == pytest.approx(float(exact_eigs[0]), rel=1e-6)


def test_linear_regression_density_mean_is_trace_over_p_within_two_percent():
    # near-orthogonal features: a Hessian 2/N X^T X close to diagonal, so 10 probes suffice
    g = torch.Generator().manual_seed(0)
    n, d = 4000, 30
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    batches = [(x[i : i + 1500], y[i : i + 1500]) for i in range(0, n, 1500)]  # 1500, 1500, 1000
    result = hessian_spectrum(nn.Linear(d, 1, bias=False).double(), nn.MSELoss(), batches)
    assert result.weights.shape == (10, 30)  # steps capped at P = 30
    exact = 2 / n * x.T @ x
    assert integral(result) == pytest.approx(1.0, abs=1e-6)
    assert integral(result, lambda t: t) == pytest.approx(float(torch.trace(exact)) / d, rel=0.02)


def test_known_clustered_spectrum_is_recovered():
    sizes, centers = (100, 200, 100), (-1.0, 2.0, 5.0)
    g = torch.Generator().manual_seed(0)
    eigenvalues = torch.cat(
        [c + 0.01 * torch.randn(s, generator=g, dtype=torch.float64) for s, c in zip(sizes, centers)]
    )
    q, _ = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))
    a = q @ torch.diag(eigenvalues) @ q.T
    result = spectral_density(a, num_runs=10, num_steps=60)
    assert integral(result) == pytest.approx(1.0, abs=1e-6)
    for size, center in zip(sizes, centers):
        near = np.abs(result.grid - center) < 0.5
        mass = float(np.trapezoid(result.density[near], result.grid[near]))
        assert mass == pytest.approx(size / 400, abs=0.05)
    assert np.nanmin(result.ritz_values) == pytest.approx(float(eigenvalues.min()), abs=1e-8)
    assert np.nanmax(result.ritz_values) == pytest.approx(float(eigenvalues.max()), abs=1e-8)
    # default broadening: 1% of the Ritz range; grid covers it plus 5 sigma each side
    span = np.nanmax(result.ritz_values) - np.nanmin(result.ritz_values)
    assert result.sigma == pytest.approx(0.01 * span)
    assert result.grid[0] == pytest.approx(np.nanmin(result.ritz_values) - 5 * result.sigma)
    assert result.density[0] < 1e-4 * result.density.max()


def test_small_operator_and_early_breakdown_are_padded():
    # 3 distinct eigenvalues: every run finds an invariant subspace after 3 steps
    a = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 7.0], dtype=torch.float64))
    result = spectral_density(a, num_runs=4, num_steps=90)
    assert result.weights.shape == (4, 6) and result.n_hvp == 4 * 3
    assert np.isnan(result.ritz_values[:, 3:]).all() and (result.weights[:, 3:] == 0).all()
    np.testing.assert_allclose(result.ritz_values[:, :3], np.tile([1.0, 2.0, 7.0], (4, 1)), atol=1e-12)
    assert integral(result) == pytest.approx(1.0, abs=1e-6)


def test_operator_reuse_parallel_runs_and_float32(classifier_data):
    model, loss_fn, batches, _ = classifier_data
    op = HessianOperator(model, loss_fn, batches)
    shared = hessian_spectrum(op, num_runs=4, num_steps=12)
    chunked = hessian_spectrum(model, loss_fn, batches, num_runs=4, num_steps=12, parallel_runs=3)
    np.testing.assert_allclose(shared.ritz_values, chunked.ritz_values, rtol=1e-9)
    np.testing.assert_allclose(shared.density, chunked.density, rtol=1e-9, atol=1e-12)
    model32 = make_classifier("tanh", dtype=torch.float32)
    r32 = hessian_spectrum(model32, loss_fn, make_batches(), num_runs=4, num_steps=12)
    assert r32.trace_estimate == pytest.approx(shared.trace_estimate, rel=1e-3)
    with pytest.raises(ValueError, match="num_runs"):
        spectral_density(op, num_runs=0)
    with pytest.raises(ValueError, match="sigma"):
        spectral_density(op, sigma=-1.0)
