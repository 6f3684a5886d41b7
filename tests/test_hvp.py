"""HessianOperator: products against dense Hessians, batching, modes, model state, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_unchanged, dense_hessian_of, make_batches, make_classifier, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import landscape
from landscape import HessianOperator, NonDeterministicLossError

pytestmark = pytest.mark.usefixtures("single_thread")


def test_dense_equals_autograd_hessian_on_uneven_batches(classifier_data):
    model, loss_fn, batches, dense = classifier_data
    op = HessianOperator(model, loss_fn, batches)
    assert op.num_params == 139
    torch.testing.assert_close(op.dense(), dense, rtol=1e-10, atol=1e-12)


def test_one_batch_and_split_batches_give_the_same_hvp():
    model, loss_fn = make_classifier("relu"), nn.CrossEntropyLoss()
    batches = make_batches()
    whole = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    v = torch.randn(139, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    split_hv = HessianOperator(model, loss_fn, batches) @ v
    whole_hv = HessianOperator(model, loss_fn, whole) @ v
    assert torch.allclose(split_hv, whole_hv, rtol=1e-6, atol=1e-9)
    # An unweighted mean over batches (a known bug of popular tools) would differ:
    per_batch = torch.stack([HessianOperator(model, loss_fn, b) @ v for b in batches]).mean(0)
    assert not torch.allclose(per_batch, whole_hv, rtol=1e-3)


@pytest.mark.parametrize("vmap_blocks", [True, False, None])
@pytest.mark.parametrize("backend", ["double_backward", "forward_over_reverse"])
def test_block_products_equal_vector_products_for_both_backends(classifier_data, backend, vmap_blocks):
    model, loss_fn, batches, dense = classifier_data
    op = HessianOperator(model, loss_fn, batches, backend=backend, block_size=3, vmap_blocks=vmap_blocks)
    # default: vmapped blocks except double backward on a CPU (one vector at a time is faster)
    assert op.vmap_blocks == (vmap_blocks if vmap_blocks is not None else backend == "forward_over_reverse")
    V = torch.randn(139, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    block = op @ V  # vmapped: blocks of 3, 3, 1
    columns = torch.stack([op @ V[:, i] for i in range(7)], dim=1)
    torch.testing.assert_close(block, columns, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block, dense @ V, rtol=1e-10, atol=1e-12)
    assert op.n_hvp == 14


@pytest.mark.parametrize("cache_graph", [None, True, False])
def test_cached_gradient_graphs_give_the_dense_hessian(classifier_data, cache_graph):
    model, loss_fn, batches, dense = classifier_data
    op = HessianOperator(model, loss_fn, batches, cache_graph=cache_graph)
    V = torch.randn(139, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the second round reuses the kept graphs
        torch.testing.assert_close(op @ V, dense @ V, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op @ V[:, 0], dense @ V[:, 0], rtol=1e-10, atol=1e-12)
    assert (op._graphs is not None) == (cache_graph is not False)  # in-memory data: cached by default


def test_graph_cache_respects_the_memory_budget_and_skips_loaders(classifier_data):
    model, loss_fn, batches, dense = classifier_data
    v = torch.randn(139, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    tight = HessianOperator(model, loss_fn, batches, graph_memory=1)
    torch.testing.assert_close(tight @ v, dense @ v, rtol=1e-10, atol=1e-12)
    assert tight._graphs is None
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    streamed = HessianOperator(model, loss_fn, loader)
    torch.testing.assert_close(streamed @ v, dense @ v, rtol=1e-10, atol=1e-12)
    assert streamed._graphs is None


def test_scipy_linear_operator(classifier_data):
    model, loss_fn, batches, dense = classifier_data
    lin = HessianOperator(model, loss_fn, batches).to_scipy()
    x = np.random.default_rng(0).standard_normal(139)
    np.testing.assert_allclose(lin @ x, dense.numpy() @ x, rtol=1e-10, atol=1e-12)


def test_parameter_subset_is_the_sub_block(classifier_data):
    model, loss_fn, batches, dense = classifier_data
    names = ["2.weight", "4.bias"]
    op = HessianOperator(model, loss_fn, batches, params=names)
    expected = dense_hessian_of(model, loss_fn, batches, names)
    assert op.num_params == 64 + 3
    torch.testing.assert_close(op.dense(), expected, rtol=1e-10, atol=1e-12)
    # the same block, cut out of the full Hessian (parameter order: 0.w 0.b 2.w 2.b 4.w 4.b)
    idx = torch.cat([torch.arange(40, 104), torch.arange(136, 139)])
    torch.testing.assert_close(op.dense(), dense[idx][:, idx], rtol=1e-10, atol=1e-12)
    weights = HessianOperator(model, loss_fn, batches, params=landscape.weights_only)
    assert weights.names == ["0.weight", "2.weight", "4.weight"]


def test_float32_matches_float64():
    model, loss_fn, batches = make_classifier("tanh", dtype=torch.float32), nn.CrossEntropyLoss(), make_batches()
    v = torch.randn(139, generator=torch.Generator().manual_seed(0))
    hv32 = HessianOperator(model, loss_fn, batches) @ v
    hv64 = HessianOperator(model, loss_fn, batches, dtype=torch.float64) @ v.double()
    assert hv32.dtype == torch.float32
    assert torch.allclose(hv32.double(), hv64, rtol=1e-4, atol=1e-5)


def test_model_state_untouched_by_products_and_every_curvature_call():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    loss_fn, batches = nn.CrossEntropyLoss(), make_batches()
    model.train()
    model[0].eval()  # mixed flags must come back exactly
    model[0].bias.requires_grad_(False)
    loss_fn(model(batches[0][0]), batches[0][1]).backward()  # an existing, non-None .grad
    before = snapshot(model)
    assert before["grads"]["0.weight"] is not None and before["grads"]["0.bias"] is None
    op = HessianOperator(model, loss_fn, batches)  # eval mode by default: dropout is off
    assert "0.bias" not in op.names
    op @ torch.ones(op.num_params, dtype=torch.float64)
    op.gradient()
    assert_unchanged(model, before)
    landscape.hessian_eigenvalues(model, loss_fn, batches, k=2)
    landscape.hessian_eigenvalues(model, loss_fn, batches, k=1, which="smallest")
    landscape.hessian_eigenvalues(model, loss_fn, batches, k=1, method="power")
    landscape.hessian_trace(model, loss_fn, batches, rtol=0.5)
    landscape.hessian_trace(model, loss_fn, batches, method="hutchinson", rtol=0.5)
    landscape.hessian_spectrum(model, loss_fn, batches, num_runs=2, num_steps=5)
    assert_unchanged(model, before)


def test_eval_mode_by_default_and_train_mode_on_request():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    loss_fn, batches = nn.CrossEntropyLoss(), make_batches()
    with torch.no_grad():
        model(torch.cat([b[0] for b in batches]) * 3 + 1)  # running statistics != batch statistics
    model.train()
    before = snapshot(model)
    default = HessianOperator(model, loss_fn, batches).dense()
    in_train = HessianOperator(model, loss_fn, batches, train_mode=True).dense()
    assert_unchanged(model, before)  # flags and BN running statistics included
    model.eval()
    torch.testing.assert_close(default, HessianOperator(model, loss_fn, batches).dense(), rtol=0, atol=0)
    assert not torch.allclose(default, in_train, rtol=1e-3)


def test_dropout_in_train_mode_raises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    before = snapshot(model)
    with pytest.raises(NonDeterministicLossError, match="train_mode=False"):
        HessianOperator(model, nn.CrossEntropyLoss(), make_batches(), train_mode=True)
    with pytest.raises(NonDeterministicLossError):
        landscape.hessian_eigenvalues(model, nn.CrossEntropyLoss(), make_batches(), train_mode=True)
    assert_unchanged(model, before)


def test_shuffling_loader_raises_and_sequential_loader_matches_list():
    model, loss_fn = make_classifier("tanh"), nn.CrossEntropyLoss()
    batches = make_batches()
    dataset = TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    with pytest.raises(NonDeterministicLossError, match="shuffle=False"):
        HessianOperator(model, loss_fn, DataLoader(dataset, batch_size=10, shuffle=True))
    with pytest.raises(ValueError, match="drop_last"):
        HessianOperator(model, loss_fn, DataLoader(dataset, batch_size=10, drop_last=True))
    v = torch.randn(139, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    from_loader = HessianOperator(model, loss_fn, DataLoader(dataset, batch_size=10)) @ v
    torch.testing.assert_close(from_loader, HessianOperator(model, loss_fn, batches) @ v, rtol=1e-10, atol=1e-12)


def test_bad_arguments_name_the_field():
    model, loss_fn, batches = make_classifier(), nn.CrossEntropyLoss(), make_batches()
    with pytest.raises(ValueError, match="backend"):
        HessianOperator(model, loss_fn, batches, backend="magic")
    with pytest.raises(KeyError, match="params"):
        HessianOperator(model, loss_fn, batches, params=["nope"])
    with pytest.raises(ValueError, match=r"\[139, K\]"):
        HessianOperator(model, loss_fn, batches).matmat(torch.ones(5, 2, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_products_run_on_the_model_device(classifier_data):
    model, loss_fn, batches, dense = classifier_data
    op = HessianOperator(model.cuda(), loss_fn, batches)  # CPU batches are moved to the device
    v = torch.randn(139, dtype=torch.float64)
    hv = op @ v
    assert hv.device.type == "cuda"
    torch.testing.assert_close(hv.cpu(), dense @ v, rtol=1e-8, atol=1e-10)
    top = landscape.hessian_eigenvalues(None, None, None, k=2, tol=1e-8, operator=op)
    torch.testing.assert_close(top.values, torch.linalg.eigvalsh(dense).flip(0)[:2], rtol=1e-6, atol=0)
    model.cpu()
