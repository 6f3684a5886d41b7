"""Eigenvalues: Lanczos and power iteration against closed forms and dense eigvalsh."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import dense_hessian_of, make_batches, make_classifier
from torch import nn

import landscape
from landscape import EigenResult, HessianOperator, hessian_eigenvalues, lanczos, power_iteration

pytestmark = pytest.mark.usefixtures("single_thread")


def rotated(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q`` (float64)."""
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q @ torch.diag(eigenvalues.double()) @ q.T


def test_linear_regression_mse_is_two_over_n_xtx():
    g = torch.Generator().manual_seed(0)
    n, d = 60, 12
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, d, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    batches = [(x[:25], y[:25]), (x[25:50], y[25:50]), (x[50:], y[50:])]
    exact = torch.linalg.eigvalsh(2 / n * x.T @ x)  # ascending
    top = hessian_eigenvalues(model, nn.MSELoss(), batches, k=5, tol=1e-10)
    bottom = hessian_eigenvalues(model, nn.MSELoss(), batches, k=2, which="smallest", tol=1e-10)
    torch.testing.assert_close(top.values, exact.flip(0)[:5], rtol=1e-6, atol=0)
    torch.testing.assert_close(bottom.values, exact[:2], rtol=1e-6, atol=0)
    assert top.converged and bottom.converged
    assert bool((top.values[:-1] >= top.values[1:]).all())  # descending
    assert bool((bottom.values[:-1] <= bottom.values[1:]).all())  # ascending


def test_softmax_regression_matches_the_closed_form_hessian():
    g = torch.Generator().manual_seed(1)
    n, d, c = 40, 5, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=g)
    model = nn.Linear(d, c, bias=False).double()
    p = torch.softmax(x @ model.weight.detach().T, dim=1)
    # weight is [C, D] flattened row-major: index c * D + d, hence kron(class block, input block)
    closed = sum(torch.kron(torch.diag(p[i]) - torch.outer(p[i], p[i]), torch.outer(x[i], x[i])) for i in range(n)) / n
    op = HessianOperator(model, nn.CrossEntropyLoss(), (x, labels))
    torch.testing.assert_close(op.dense(), closed, rtol=1e-10, atol=1e-12)
    top = hessian_eigenvalues(op, k=3, tol=1e-10)
    torch.testing.assert_close(top.values, torch.linalg.eigvalsh(closed).flip(0)[:3], rtol=1e-6, atol=0)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_tiny_mlp_top3_and_bottom2_match_dense_eigvalsh(activation):
    model, loss_fn, batches = make_classifier(activation, seed=2), nn.CrossEntropyLoss(), make_batches()
    exact = torch.linalg.eigvalsh(dense_hessian_of(model, loss_fn, batches))
    op = HessianOperator(model, loss_fn, batches)
    top = hessian_eigenvalues(op, k=3, tol=1e-8)
    bottom = hessian_eigenvalues(op, k=2, which="smallest", tol=1e-8)
    torch.testing.assert_close(top.values, exact.flip(0)[:3], rtol=1e-4, atol=0)
    torch.testing.assert_close(bottom.values, exact[:2], rtol=1e-4, atol=0)
    assert exact[0] < 0, "the test is meant to see negative curvature"
    both = hessian_eigenvalues(op, k=2, which="both", tol=1e-8)
    torch.testing.assert_close(both.values, torch.cat([exact.flip(0)[:2], exact[:2].flip(0)]), rtol=1e-4, atol=0)


def test_residuals_are_true_residuals_and_meet_tol(classifier_data):
    _, _, _, dense = classifier_data
    result = lanczos(dense, k=3, tol=1e-3)
    assert isinstance(result, EigenResult) and result.converged and result.method == "lanczos"
    v = result.vectors
    torch.testing.assert_close(v.T @ v, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)
    recomputed = (dense @ v - v * result.values).norm(dim=0)
    # residuals from the recurrence equal the true ones up to rounding (~eps ||H||)
    torch.testing.assert_close(result.residuals, recomputed, rtol=1e-6, atol=1e-12)
    exact = lanczos(dense, k=3, tol=1e-3, exact_residuals=True)
    assert exact.n_hvp == result.n_hvp + 3
    torch.testing.assert_close(exact.residuals, recomputed, rtol=1e-12, atol=1e-15)
    assert bool((result.residuals <= 1e-3 * result.values.abs()).all())
    # the documented bound: some eigenvalue within the residual
    eigenvalues = torch.linalg.eigvalsh(dense)
    for value, residual in zip(result.values, result.residuals):
        assert (eigenvalues - value).abs().min() <= residual


def test_known_spectrum_with_repeated_and_clustered_eigenvalues():
    f64 = {"dtype": torch.float64}
    eigenvalues = torch.cat(
        [torch.full((3,), 7.0, **f64), torch.tensor([5.0, 4.99], **f64), torch.linspace(-2, 1, 195, **f64)]
    )
    a = rotated(eigenvalues)
    top = lanczos(a, k=5, tol=1e-10)
    torch.testing.assert_close(top.values, torch.tensor([7.0, 7, 7, 5, 4.99], dtype=torch.float64), rtol=1e-8, atol=0)
    smallest = lanczos(a, k=1, which="smallest", tol=1e-10, max_products=400)
    assert abs(float(smallest.values[0]) + 2) < 1e-8
    # diagonal with exact multiplicities (invariant subspaces: the recurrence must restart)
    diag = torch.diag(torch.tensor([1.0] * 5 + [0.0] * 5, dtype=torch.float64))
    torch.testing.assert_close(
        lanczos(diag, k=6, tol=1e-10).values, torch.tensor([1.0] * 5 + [0.0], dtype=torch.float64)
    )


def test_generic_lanczos_accepts_callables_numpy_and_scipy():
    a = rotated(torch.linspace(1, 10, 50, dtype=torch.float64), seed=3)
    expected = torch.tensor([10.0, 10 - 9 / 49], dtype=torch.float64)
    from_callable = lanczos(lambda block: a @ block, k=2, tol=1e-10, dim=50)
    from_numpy = lanczos(a.numpy(), k=2, tol=1e-10)
    from scipy.sparse.linalg import aslinearoperator

    from_scipy = lanczos(aslinearoperator(a.numpy()), k=2, tol=1e-10)
    for r in (from_callable, from_numpy, from_scipy):
        torch.testing.assert_close(r.values, expected, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="dim"):
        lanczos(lambda block: a @ block, k=1)


def test_power_iteration_baseline_and_its_stopping_rule():
    a = rotated(torch.cat([torch.tensor([10.0, 6.0]), torch.rand(98, generator=torch.Generator().manual_seed(0))]))
    result = power_iteration(a, k=2, tol=1e-6)
    assert result.method == "power" and result.converged
    torch.testing.assert_close(result.values, torch.tensor([10.0, 6.0], dtype=torch.float64), rtol=1e-5, atol=0)
    # slow convergence (ratio 0.99): the relative-change rule stops early, far from lambda_max
    f64 = {"dtype": torch.float64}
    slow = rotated(torch.cat([torch.tensor([1.0, 0.99], **f64), torch.linspace(0, 0.98, 98, **f64)]), seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        early = power_iteration(slow, k=1, tol=1e-3)
    accurate = lanczos(slow, k=1, tol=1e-3)
    assert early.n_hvp <= 100 and early.converged  # the rule says "converged" ...
    assert early.residuals[0] > accurate.residuals[0]
    assert abs(float(accurate.values[0]) - 1.0) <= 1e-3 * float(accurate.values[0])  # the guarantee
    assert abs(float(early.values[0]) - 1.0) > 10 * abs(float(accurate.values[0]) - 1.0)  # ... yet it is off
    with pytest.raises(ValueError, match="method='lanczos'"):
        hessian_eigenvalues(
            None,
            None,
            None,
            which="smallest",
            method="power",
            operator=HessianOperator(make_classifier(), nn.CrossEntropyLoss(), make_batches()),
        )


def test_warm_start_converges_in_few_products(classifier_data):
    model, loss_fn, batches, dense = classifier_data
    op = HessianOperator(model, loss_fn, batches)
    cold = hessian_eigenvalues(op, tol=1e-6)
    warm = hessian_eigenvalues(op, tol=1e-6, v0=cold.vectors[:, 0])
    assert warm.n_hvp <= 3 < cold.n_hvp
    torch.testing.assert_close(warm.values, cold.values, rtol=1e-9, atol=0)
    # float32: the warm vector is an eigenvector to rounding, so its Krylov space ends at once
    model32 = make_classifier("tanh", dtype=torch.float32)
    op32 = HessianOperator(model32, loss_fn, batches)
    cold32 = hessian_eigenvalues(op32)
    warm32 = hessian_eigenvalues(op32, v0=cold32.vectors[:, 0])
    assert warm32.n_hvp <= 2 and warm32.converged
    assert float(warm32.values[0]) == pytest.approx(float(cold32.values[0]), rel=1e-4)


def test_float32_and_parameter_subset():
    model32 = make_classifier("tanh", seed=3, dtype=torch.float32)
    loss_fn, batches = nn.CrossEntropyLoss(), make_batches()
    exact = torch.linalg.eigvalsh(dense_hessian_of(model32, loss_fn, batches)).flip(0)
    r32 = hessian_eigenvalues(model32, loss_fn, batches, k=2, tol=1e-3)
    assert r32.vectors.dtype == torch.float32
    torch.testing.assert_close(r32.values, exact[:2], rtol=1e-3, atol=0)
    names = ["0.weight", "4.weight"]
    sub = torch.linalg.eigvalsh(dense_hessian_of(model32, loss_fn, batches, names))
    r = hessian_eigenvalues(model32, loss_fn, batches, k=2, which="both", tol=1e-8, params=names, dtype=torch.float64)
    assert r.vectors.shape == (32 + 24, 4)
    torch.testing.assert_close(r.values, torch.cat([sub.flip(0)[:2], sub[:2].flip(0)]), rtol=1e-6, atol=0)


def test_seeded_reproducible_and_budget(classifier_data):
    _, _, _, dense = classifier_data
    a, b = lanczos(dense, k=2, seed=5), lanczos(dense, k=2, seed=5)
    assert torch.equal(a.values, b.values) and a.n_hvp == b.n_hvp
    with pytest.warns(RuntimeWarning, match="max_products"):
        capped = lanczos(dense, k=1, which="smallest", tol=1e-12, max_products=6)
    assert capped.n_hvp == 6 and not capped.converged


@pytest.mark.parametrize(
    "field, options",
    [
        ("which", {"which": "middle"}),
        ("k:", {"k": 0}),
        ("v0", {"v0": torch.ones(3)}),
        ("max_products", {"k": 3, "max_products": 2}),
    ],
)
def test_bad_lanczos_arguments_name_the_field(classifier_data, field, options):
    with pytest.raises(ValueError, match=field):
        lanczos(classifier_data[3], **options)


def test_bad_arguments_name_the_field(classifier_data):
    model, loss_fn, batches, _ = classifier_data
    with pytest.raises(ValueError, match="method"):
        hessian_eigenvalues(model, loss_fn, batches, method="arnoldi")
    op = HessianOperator(model, loss_fn, batches)
    with pytest.raises(ValueError, match="dtype: already fixed by the HessianOperator"):
        hessian_eigenvalues(None, None, None, operator=op, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype: already fixed by the HessianOperator"):
        hessian_eigenvalues(op, dtype=torch.float32)
    with pytest.raises(TypeError, match="by keyword"):
        hessian_eigenvalues(op, 3)  # k must be a keyword: the second place is loss_fn
    with pytest.raises(ValueError, match="model, loss_fn, data: required"):
        hessian_eigenvalues(None, None, None)
    assert landscape.lanczos is lanczos
