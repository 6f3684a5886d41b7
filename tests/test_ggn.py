"""GGN and empirical Fisher operators against dense ground truth: the closed form of softmax
regression, ``J^T H_out J`` built with ``torch.func.jacrev``, per-sample gradients; PSD; the
curvature functions (Lanczos, Hutch++, SLQ, scipy) accept them; the model is left unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from conftest import assert_unchanged, dense_hessian_of, make_batches, make_classifier, snapshot
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

import landscape
from landscape.ggn import EmpiricalFisherOperator, GGNOperator, ggn_eigenvalues


def _flat_params(model):
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    return names, params


def dense_ggn(model, loss_fn, batches):
    """``(1/N) sum_i J_i^T H_i J_i`` over all samples: ``J_i`` by jacrev, ``H_i`` the Hessian of
    sample ``i``'s loss in its outputs (loss_fn on a batch of one)."""
    names, params = _flat_params(model)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def f(flat, xi):
        parts = dict(zip(names, torch.split(flat, [params[n].numel() for n in names])))
        parts = {n: p.reshape(params[n].shape) for n, p in parts.items()}
        return functional_call(model, parts, (xi.unsqueeze(0),))[0]

    flat = torch.cat([params[n].reshape(-1) for n in names])
    total = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    for xi, yi in zip(x, y):
        J = jacrev(f)(flat, xi)  # [C, P]
        out = f(flat, xi)
        H_out = hessian(lambda o, yi=yi: loss_fn(o.unsqueeze(0), yi.unsqueeze(0)))(out)  # [C, C]
        total += J.T @ H_out @ J
    return total / len(y)


def dense_empirical_fisher(model, loss_fn, batches):
    names, params = _flat_params(model)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def sample_loss(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    G = torch.cat([g[n].reshape(len(y), -1) for n in names], dim=1)  # [N, P]
    return G.T @ G / len(y)


def test_ggn_of_softmax_regression_is_its_hessian_in_closed_form():
    torch.manual_seed(0)
    d, C = 3, 4
    model = nn.Linear(d, C, bias=False).double()
    batches = make_batches(sizes=(9, 5), dtype=torch.float64)
    batches = [(x[:, :d], y % C) for x, y in batches]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    p = torch.softmax(model(x), dim=1).detach()
    # H = (1/N) sum_n (diag p_n - p_n p_n^T) kron x_n x_n^T, weight flattened row-major [c, j]
    closed = sum(torch.kron(torch.diag(pn) - torch.outer(pn, pn), torch.outer(xn, xn)) for pn, xn in zip(p, x)) / len(y)
    G = GGNOperator(model, nn.CrossEntropyLoss(), batches).dense()
    H = landscape.HessianOperator(model, nn.CrossEntropyLoss(), batches).dense()
    assert closed.abs().max() > 1e-2  # not trivially zero
    torch.testing.assert_close(G, closed, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(H, closed, rtol=1e-10, atol=1e-13)


def test_ggn_matches_dense_jacobian_product_on_an_mlp_and_is_psd_unlike_the_hessian(single_thread):
    model = make_classifier("tanh", width=5)
    batches = make_batches()  # uneven batches 10, 7, 6: the mean must weight them by size
    loss_fn = nn.CrossEntropyLoss()
    before = snapshot(model)
    G = GGNOperator(model, loss_fn, batches).dense()
    assert_unchanged(model, before)
    truth = dense_ggn(model, loss_fn, batches)
    torch.testing.assert_close(G, truth, rtol=1e-9, atol=1e-12)
    batched = GGNOperator(model, loss_fn, batches, vmap_blocks=True, block_size=7).dense()  # the GPU path
    torch.testing.assert_close(batched, truth, rtol=1e-9, atol=1e-12)
    eig = torch.linalg.eigvalsh(G)
    assert eig.min() >= -1e-12 * eig.max()
    H = dense_hessian_of(model, loss_fn, batches)
    assert (H - G).abs().max() > 1e-3 * G.abs().max()  # the MLP's Hessian has a second-order term


def test_empirical_fisher_matches_per_sample_gradients(single_thread):
    model = make_classifier("relu", width=5)
    batches = make_batches()
    loss_fn = nn.CrossEntropyLoss()
    F = EmpiricalFisherOperator(model, loss_fn, batches).dense()
    truth = dense_empirical_fisher(model, loss_fn, batches)
    torch.testing.assert_close(F, truth, rtol=1e-9, atol=1e-12)
    batched = EmpiricalFisherOperator(model, loss_fn, batches, vmap_blocks=True).dense()
    torch.testing.assert_close(batched, truth, rtol=1e-9, atol=1e-12)
    assert torch.linalg.matrix_rank(F) <= sum(len(y) for _, y in batches)


def test_ggn_for_mse_is_two_over_nc_jtj():
    """Mean-reduced MSE over ``[N, C]`` outputs: ``H_out = 2/(N C) I``, so ``G = 2/(N C) J^T J``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(11, 2, dtype=torch.float64)
    t = torch.randn(11, 2, dtype=torch.float64)
    names, params = _flat_params(model)
    flat = torch.cat([params[n].reshape(-1) for n in names])

    def f(v):
        parts = {
            n: p.reshape(params[n].shape) for n, p in zip(names, torch.split(v, [params[n].numel() for n in names]))
        }
        return functional_call(model, parts, (x,)).reshape(-1)

    J = jacrev(f)(flat)
    G = GGNOperator(model, nn.MSELoss(), [(x[:6], t[:6]), (x[6:], t[6:])]).dense()
    torch.testing.assert_close(G, 2 / J.shape[0] * J.T @ J, rtol=1e-10, atol=1e-13)


def test_curvature_functions_accept_the_ggn(single_thread):
    model = make_classifier("tanh", width=5)
    batches = make_batches()
    G_op = GGNOperator(model, nn.CrossEntropyLoss(), batches)
    truth = torch.linalg.eigvalsh(dense_ggn(model, nn.CrossEntropyLoss(), batches))
    top = landscape.hessian_eigenvalues(G_op, k=2, tol=1e-8)
    np.testing.assert_allclose(top.values.numpy(), truth.flip(0)[:2].numpy(), rtol=1e-6)
    res = ggn_eigenvalues(model, nn.CrossEntropyLoss(), batches, tol=1e-8)
    np.testing.assert_allclose(float(res.values[0]), float(truth[-1]), rtol=1e-6)
    trace = landscape.hessian_trace(G_op, sketch_size=G_op.num_params + 2)
    np.testing.assert_allclose(trace.value, float(truth.sum()), rtol=1e-8)
    spectrum = landscape.hessian_spectrum(G_op, num_runs=2, num_steps=30)
    assert spectrum.ritz_values.min() >= -1e-8 * float(truth.max())
    eigsh = scipy.sparse.linalg.eigsh(G_op.to_scipy(), k=1, which="LA")[0]
    np.testing.assert_allclose(eigsh[0], float(truth[-1]), rtol=1e-6)


def test_ggn_top_eig_metric_is_the_lanczos_value():
    model = make_classifier("tanh", width=5)
    batches = make_batches()
    out = landscape.measure(
        model, nn.CrossEntropyLoss(), batches, ["ggn_top_eig"], options={"ggn_top_eig": {"tol": 1e-8}}
    )
    truth = torch.linalg.eigvalsh(dense_ggn(model, nn.CrossEntropyLoss(), batches))[-1]
    assert out["ggn_top_eig"] == pytest.approx(float(truth), rel=1e-6)


def test_empirical_fisher_and_ggn_with_one_output_per_sample():
    """Outputs ``[n]`` (binary logits): no output dimension to sum over."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0)).double()
    x = torch.randn(9, 3, dtype=torch.float64)
    t = (torch.rand(9) > 0.5).double()
    loss_fn = nn.BCEWithLogitsLoss()
    batches = [(x[:5], t[:5]), (x[5:], t[5:])]
    rows = []
    for xi, ti in zip(x, t):
        model.zero_grad(set_to_none=True)
        loss_fn(model(xi.unsqueeze(0)), ti.unsqueeze(0)).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    g = torch.stack(rows)
    F = EmpiricalFisherOperator(model, loss_fn, batches).dense()
    torch.testing.assert_close(F, g.T @ g / len(t), rtol=1e-9, atol=1e-12)
    # GGN of the logistic loss: (1/N) sum_i p_i (1 - p_i) j_i j_i^T, j_i the logit's gradient
    rows = []
    for xi in x:
        model.zero_grad(set_to_none=True)
        model(xi.unsqueeze(0)).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    j = torch.stack(rows)
    p = torch.sigmoid(model(x)).detach()
    G = GGNOperator(model, loss_fn, batches).dense()
    torch.testing.assert_close(G, (j * (p * (1 - p))[:, None]).T @ j / len(t), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["ggn_trace", "fisher_trace"])
def test_ggn_and_fisher_trace_metrics_match_the_dense_traces(name, single_thread):
    """Exact with a full sketch (``sketch_size >= P``); within the stated error with a small one."""
    model = make_classifier("tanh", width=5)
    batches = make_batches()
    loss_fn = nn.CrossEntropyLoss()
    dense = (dense_ggn if name == "ggn_trace" else dense_empirical_fisher)(model, loss_fn, batches)
    truth = float(torch.trace(dense))
    P = dense.shape[0]
    before = snapshot(model)
    exact = landscape.measure(model, loss_fn, batches, [name], options={name: {"sketch_size": P, "max_hvp": 3 * P}})
    assert exact[name] == pytest.approx(truth, rel=1e-8) and exact[f"{name}_seconds"] > 0
    fn = landscape.ggn_trace if name == "ggn_trace" else landscape.fisher_trace
    rough = fn(model, loss_fn, batches, sketch_size=4, max_hvp=40, method="hutchinson", seed=3)
    assert abs(rough.value - truth) <= 5 * rough.std_err
    assert_unchanged(model, before)
