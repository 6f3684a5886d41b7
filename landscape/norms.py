"""Norm-based baselines for generalization measures: parameter count, weight norms, distance
from initialization (Jiang et al. 2020 compare flatness measures against these).

A *layer* is a parameter with two or more dimensions (a linear weight ``[out, in]`` or a
convolution filter bank ``[out, in, *kernel]``); biases and normalization scales are not layers.
The spectral norm of a convolution is that of its weight reshaped to ``[out, in * prod(kernel)]``
(cheap and standard in norm-based bounds; it is not the operator norm of the convolution on
images, which also depends on the input size and stride). Norms are computed in float64 on the
weights' device and never modify the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._functional import ParamSelector, _select


@dataclass
class NormResult:
    """Weight norms of a model.

    Attributes:
        param_count: number of scalar parameters selected (all layers and the rest).
        n_layers: number of layers (parameters with ``ndim >= 2``).
        frobenius_sum / frobenius_prod: ``sum_l ||W_l||_F`` / ``prod_l ||W_l||_F``.
        spectral_sum / spectral_prod: ``sum_l ||W_l||_2`` / ``prod_l ||W_l||_2`` (largest
            singular value of the ``[out, -1]`` reshape).
        log_frobenius_prod / log_spectral_prod: ``sum_l log ||W_l||`` (the log of the products,
            finite where the product would overflow; Jiang et al. use the log of the product of
            *squared* norms, twice these).
        frobenius_sq_sum: ``sum_l ||W_l||_F^2``, Jiang et al. 2020 eq. (42) "param_norm".
        fro_over_spec: ``sum_l ||W_l||_F^2 / ||W_l||_2^2``, eq. (33) (a sum of stable ranks).
        frobenius / spectral: per-layer norms ``{name: float}``.

    Jiang et al.'s log products of *squared* norms, eqs. (32) and (37), are
    ``2 * log_spectral_prod`` and ``2 * log_frobenius_prod``.
    """

    param_count: int
    n_layers: int
    frobenius_sum: float
    frobenius_prod: float
    spectral_sum: float
    spectral_prod: float
    log_frobenius_prod: float
    log_spectral_prod: float
    frobenius_sq_sum: float
    fro_over_spec: float
    frobenius: dict[str, float]
    spectral: dict[str, float]


def _selected(model: nn.Module, params: ParamSelector) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    return {n: named[n].detach() for n in _select(model, params)}


def param_count(model: nn.Module, *, params: ParamSelector = None) -> int:
    """Number of scalar parameters (default: all with ``requires_grad``)."""
    return sum(t.numel() for t in _selected(model, params).values())


def _log_prod(values: list[float]) -> float:
    return sum(math.log(v) if v > 0 else -math.inf for v in values)


def weight_norms(model: nn.Module, *, params: ParamSelector = None) -> NormResult:
    """Frobenius and spectral norms of every layer, their sums, products and log-products.

    Args:
        params: which parameters count (default: all with ``requires_grad``); layers are the
            selected ones with ``ndim >= 2``.

    Raises:
        ValueError: if the selection holds no layer.
    """
    selected = _selected(model, params)
    layers = {n: t.to(torch.float64).reshape(t.shape[0], -1) for n, t in selected.items() if t.ndim >= 2}
    if not layers:
        raise ValueError(
            "params: the selected parameters contain no layer (tensor with >= 2 dimensions); "
            f"got {[f'{n} {tuple(t.shape)}' for n, t in selected.items()]}"
        )
    frobenius = {n: float(torch.linalg.matrix_norm(w, ord="fro")) for n, w in layers.items()}
    spectral = {n: float(torch.linalg.matrix_norm(w, ord=2)) for n, w in layers.items()}
    log_fro, log_spec = _log_prod(list(frobenius.values())), _log_prod(list(spectral.values()))
    return NormResult(
        param_count=sum(t.numel() for t in selected.values()),
        n_layers=len(layers),
        frobenius_sum=sum(frobenius.values()),
        frobenius_prod=math.exp(log_fro) if log_fro < 709 else math.inf,
        spectral_sum=sum(spectral.values()),
        spectral_prod=math.exp(log_spec) if log_spec < 709 else math.inf,
        log_frobenius_prod=log_fro,
        log_spectral_prod=log_spec,
        frobenius_sq_sum=sum(v**2 for v in frobenius.values()),
        fro_over_spec=sum(frobenius[n] ** 2 / spectral[n] ** 2 for n in layers),
        frobenius=frobenius,
        spectral=spectral,
    )


def distance_from_init(
    model: nn.Module, init_state: Mapping[str, Tensor] | None, *, params: ParamSelector = None
) -> float:
    """``||w - w0||_2`` over the selected parameters (default: all with ``requires_grad``).

    Args:
        init_state: the initial weights, e.g. ``copy.deepcopy(model.state_dict())`` taken
            before training; it must hold every selected parameter under the same name.
    """
    total = torch.zeros((), dtype=torch.float64)
    for _, diff in _differences(model, init_state, params):
        total = total + diff.pow(2).sum().cpu()
    return float(total.sqrt())


def _differences(
    model: nn.Module, init_state: Mapping[str, Tensor] | None, params: ParamSelector
) -> list[tuple[str, Tensor]]:
    """``[(name, w - w0)]`` in float64 for the selected parameters, with the checks of
    :func:`distance_from_init`."""
    if init_state is None:
        raise ValueError(
            "init_state: distance from initialization needs the initial weights; pass "
            "init_state=<state_dict saved before training> (e.g. copy.deepcopy(model.state_dict()))"
        )
    selected = _selected(model, params)
    missing = [n for n in selected if n not in init_state]
    if missing:
        raise KeyError(
            f"init_state: has no entry for parameters {missing}; pass the model's full "
            "state_dict saved at initialization"
        )
    out = []
    for name, w in selected.items():
        w0 = init_state[name]
        if tuple(w0.shape) != tuple(w.shape):
            raise ValueError(f"init_state: {name!r} has shape {tuple(w0.shape)} but the parameter has {tuple(w.shape)}")
        out.append((name, w.to(torch.float64) - w0.detach().to(w.device, torch.float64)))
    return out


@dataclass
class InitDistances:
    """Layer-wise distances from initialization (Jiang et al. 2020), over the layers
    (selected parameters with ``ndim >= 2``, reshaped to ``[out, -1]``).

    Attributes:
        frobenius_sq_sum: ``sum_l ||W_l - W0_l||_F^2``, eq. (40) (squared weight units).
        spectral_sq_sum: ``sum_l ||W_l - W0_l||_2^2``, eq. (41) (squared weight units).
    """

    frobenius_sq_sum: float
    spectral_sq_sum: float


def init_distances(
    model: nn.Module, init_state: Mapping[str, Tensor] | None, *, params: ParamSelector = None
) -> InitDistances:
    """Frobenius and spectral distances of every layer from its initial value, squared and summed
    (Jiang et al. 2020 eqs. 40, 41; biases and normalization scales are not layers). ``init_state``
    as in :func:`distance_from_init`."""
    layers = [(n, d.reshape(d.shape[0], -1)) for n, d in _differences(model, init_state, params) if d.ndim >= 2]
    if not layers:
        raise ValueError("params: the selected parameters contain no layer (tensor with >= 2 dimensions)")
    return InitDistances(
        frobenius_sq_sum=sum(float(torch.linalg.matrix_norm(d, ord="fro")) ** 2 for _, d in layers),
        spectral_sq_sum=sum(float(torch.linalg.matrix_norm(d, ord=2)) ** 2 for _, d in layers),
    )
