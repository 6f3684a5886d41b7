"""Norm baselines against hand computations with torch.linalg."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from landscape.norms import distance_from_init, param_count, weight_norms


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    )


def test_param_count_counts_every_trainable_scalar():
    model = conv_net()
    assert param_count(model) == sum(p.numel() for p in model.parameters())
    model[6].weight.requires_grad_(False)
    assert param_count(model) == sum(p.numel() for p in model.parameters()) - 15


def test_norms_match_torch_linalg():
    model = conv_net()
    layers = {"0.weight": model[0].weight, "4.weight": model[4].weight, "6.weight": model[6].weight}
    fro = {n: float(torch.linalg.norm(w.detach().double())) for n, w in layers.items()}
    # conv filters as the [out, in * kh * kw] matrix
    spec = {n: float(torch.linalg.svdvals(w.detach().double().reshape(w.shape[0], -1))[0]) for n, w in layers.items()}
    result = weight_norms(model)
    assert result.n_layers == 3
    assert result.frobenius == pytest.approx(fro, rel=1e-12)
    assert result.spectral == pytest.approx(spec, rel=1e-10)
    assert result.frobenius_sum == pytest.approx(sum(fro.values()), rel=1e-12)
    assert result.frobenius_prod == pytest.approx(math.prod(fro.values()), rel=1e-12)
    assert result.spectral_sum == pytest.approx(sum(spec.values()), rel=1e-10)
    assert result.spectral_prod == pytest.approx(math.prod(spec.values()), rel=1e-10)
    assert result.log_spectral_prod == pytest.approx(math.log(math.prod(spec.values())), rel=1e-10)
    assert result.param_count == param_count(model)


def test_spectral_norm_of_known_matrix():
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))
    result = weight_norms(model)
    assert result.spectral_sum == pytest.approx(4.0)
    assert result.frobenius_sum == pytest.approx(5.0)


def test_log_product_survives_overflow():
    model = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(300)])
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(20 * torch.eye(4))
    result = weight_norms(model)
    assert result.spectral_prod == math.inf
    assert result.log_spectral_prod == pytest.approx(300 * math.log(20))


def test_distance_from_init_is_direct_l2():
    model = conv_net()
    init = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    direct = math.sqrt(
        sum(float((p.detach().double() - init[n].double()).pow(2).sum()) for n, p in model.named_parameters())
    )
    assert distance_from_init(model, init) == pytest.approx(direct, rel=1e-12)
    assert distance_from_init(model, model.state_dict()) == 0.0


def test_norm_errors_name_the_fix():
    model = conv_net()
    with pytest.raises(ValueError, match="init_state"):
        distance_from_init(model, None)
    partial = {k: v for k, v in model.state_dict().items() if k != "6.bias"}
    with pytest.raises(KeyError, match="6.bias"):
        distance_from_init(model, partial)
    wrong = dict(model.state_dict())
    wrong["6.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        distance_from_init(model, wrong)
    with pytest.raises(ValueError, match="no layer"):
        weight_norms(model, params=lambda name, p: p.ndim == 1)
