"""Margin-, norm- and PAC-Bayes-based generalization measures as Jiang et al. 2020 ("Fantastic
generalization measures and where to find them", ICLR) define them, numbered by their equations,
and as the code of Dziugaite et al. 2020 ("In search of robust measures of generalization",
NeurIPS; robust-generalization-measures ``measures.py``) computes them.

* Output margin ``gamma``: per sample, the correct class's logit minus the largest other logit;
  ``gamma`` is the ``k``-th smallest of the ``m`` margins, ``k = max(1, m // 10)`` (the 10th
  percentile, ``kthvalue(m // 10)`` in the reference code), taken in absolute value. Logit units.
* :func:`inverse_margin` ``1 / gamma^2`` (eq. 22); :func:`margin_normalized` ``log prod ||W||_2^2
  - 2 log gamma`` (31) and the Frobenius version (36).
* :func:`path_norm` (44): every parameter squared, the network applied to one all-ones input of
  the data's shape, outputs summed; :func:`path_norm_over_margin` (43) ``= path_norm / gamma^2``.
* :func:`pacbayes_bounds` (48, 49, 56, 57): derived from the sigma of
  :func:`landscape.pacbayes_flatness` (one search gives all bounds of a noise kind).
* :func:`fisher_rao_norm`: the empirical Fisher-Rao norm (Liang et al. 2019).
* :func:`steps_to_loss`: the optimization-based measure "steps to reach cross-entropy 0.1",
  from a training history.

Differences from the reference code, by design: the values are *not* "adjusted for dataset
size" (the reference reports ``sqrt(v / m)``, or ``0.5 (v - log m)`` for log measures: monotone,
so rank correlations on one data set are unchanged); batch norm is folded into the preceding
layer (:func:`fold_batch_norm`) for the path norm and the layer norms (:func:`layer_norms`,
:func:`layer_distances`) but not for the PAC-Bayes bounds and their sigma search, which use the
unfolded parameters; spectral norms are exact (SVD of the ``[out, -1]`` reshape).
Everything is evaluated in eval mode on a snapshot of the weights; the model is never modified.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._functional import (
    LossFn,
    ModelLoss,
    ParamSelector,
    _is_single_batch,
    is_classification,
    training_mode,
)
from .flatness import FlatnessResult
from .ggn import Linearization, output_gradients
from .norms import InitDistances, NormResult, _differences, _selected, init_distances, weight_norms


def _model_loss(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    params: ParamSelector,
    dtype: torch.dtype | None,
    model_loss: ModelLoss | None,
) -> ModelLoss:
    return model_loss if model_loss is not None else ModelLoss(model, loss_fn, data, params=params, dtype=dtype)


# --------------------------------------------------------------------------------------------
# output margin
# --------------------------------------------------------------------------------------------
@dataclass
class MarginResult:
    """The output margin of a classifier on the measured samples.

    Attributes:
        value: ``gamma = abs(k-th smallest margin)``, logit units.
        margins: ``[m]`` float64 per-sample margins, correct logit minus the largest other logit
            (negative for a misclassified sample), in data order.
        k: the rank used, ``max(1, m // 10)``.
    """

    value: float
    margins: np.ndarray
    k: int


@torch.no_grad()
def output_margin(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None,
) -> MarginResult:
    """The 10th-percentile output margin ``gamma`` over all samples of ``data`` (see the module
    docstring; Jiang et al. 2020 sec. C.1, the reference code's ``kthvalue(m // 10)``).

    Raises:
        ValueError: outputs are not ``[n, C]`` class scores with integer labels, or ``C < 2``.
    """
    ml = _model_loss(model, loss_fn, data, params, dtype, model_loss)
    parts = []
    with ml.mode():
        for inputs, targets in ml.batches:
            logits = ml.forward(ml.theta, inputs)
            if not is_classification(logits, targets) or logits.shape[1] < 2:
                raise ValueError(
                    "the output margin needs [n, C] class scores (C >= 2) and integer labels [n]; "
                    f"got outputs {tuple(logits.shape)}, targets {tuple(targets.shape)} {targets.dtype}"
                )
            logits = logits.to(torch.float64)
            rows = torch.arange(len(targets), device=logits.device)
            correct = logits[rows, targets]
            others = logits.index_put(
                (rows, targets), torch.tensor(-math.inf, dtype=logits.dtype, device=logits.device)
            )
            parts.append((correct - others.max(dim=1).values).cpu())
    margins = torch.cat(parts)
    k = max(1, len(margins) // 10)
    gamma = float(torch.kthvalue(margins, k).values.abs())
    return MarginResult(value=gamma, margins=margins.numpy(), k=k)


def inverse_margin(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None,
) -> float:
    """``1 / gamma^2`` (Jiang et al. 2020 eq. 22), ``gamma`` from :func:`output_margin`; units
    1/logit^2; ``inf`` for a zero margin."""
    gamma = output_margin(model, loss_fn, data, params=params, dtype=dtype, model_loss=model_loss).value
    return 1 / gamma**2 if gamma > 0 else math.inf


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


def margin_normalized(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    norm: str = "spectral",
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None,
) -> float:
    """``sum_l log ||W_l||^2 - 2 log gamma``: the log of the product of squared layer norms over
    the squared margin. ``norm="spectral"``: Jiang et al. 2020 eq. (31) (a spectrally-normalized
    margin bound, Bartlett et al. 2017); ``"frobenius"``: eq. (36) (Neyshabur et al. 2015).
    Layers as in :func:`landscape.weight_norms` (parameters with >= 2 dimensions, biases
    excluded), batch norm folded (:func:`layer_norms`); ``gamma`` from :func:`output_margin`. Dimensionless (a log)."""
    field = {"spectral": "log_spectral_prod", "frobenius": "log_frobenius_prod"}.get(norm)
    if field is None:
        raise ValueError(f"norm: must be 'spectral' or 'frobenius' (got {norm!r})")
    ml = _model_loss(model, loss_fn, data, params, dtype, model_loss)
    log_prod = 2 * getattr(layer_norms(ml.model, params=ml.names), field)
    return log_prod - 2 * _log(output_margin(ml.model, ml.loss_fn, data, model_loss=ml).value)


# --------------------------------------------------------------------------------------------
# path norm
# --------------------------------------------------------------------------------------------
def _first_inputs(data: Any) -> Any:
    batch = data if _is_single_batch(data) else next(iter(data))
    return batch[0]


_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def fold_batch_norm(model: nn.Module, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` with every batch norm folded into the layer before it (the reference
    code of Dziugaite et al. 2020 does this before computing any measure); the model is not
    changed.

    A batch norm in eval mode is the affine map ``z -> s (z - mu) + beta``, ``s = gamma /
    sqrt(var + eps)`` from its running statistics, so after a linear or convolution layer
    ``z = W x + b`` it folds into ``W' = s W`` (per output channel), ``b' = s (b - mu) + beta`` (a
    bias is added where the layer has none) and the batch norm becomes ``nn.Identity``. The copy
    computes the same function as ``model`` in eval mode. Only a batch norm that directly follows
    a ``Linear`` / ``Conv1d`` / ``Conv2d`` / ``Conv3d`` inside an ``nn.Sequential`` is folded: there
    the order of the modules is the order of the forward pass (elsewhere it is not known).

    Args:
        dtype: the copy's dtype (default: the model's).

    Raises:
        ValueError: a normalization layer that cannot be folded (after another kind of module, not
            in a Sequential, without running statistics, or with another number of channels).
    """
    folded = copy.deepcopy(model)
    if dtype is not None:
        folded = folded.to(dtype)
    for parent in list(folded.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for before, name in itertools.pairwise(names):
            norm, layer = parent._modules[name], parent._modules[before]
            if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or not isinstance(layer, _FOLDABLE):
                continue
            channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            if norm.running_mean is None or norm.running_var is None or norm.num_features != channels:
                continue  # refused below
            scale = torch.rsqrt(norm.running_var + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
            layer.weight.mul_(scale.reshape(-1, *[1] * (layer.weight.ndim - 1)))
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(shift))
            layer.bias.copy_(scale * layer.bias + shift)
            parent._modules[name] = nn.Identity()
    left = sorted({type(m).__name__ for m in folded.modules() if isinstance(m, nn.modules.batchnorm._NormBase)})
    if left:
        raise ValueError(
            f"the model has normalization layers {left} that cannot be folded into a preceding "
            "layer: only a batch norm with running statistics directly after a Linear or Conv layer "
            "inside an nn.Sequential is folded"
        )
    return folded


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _on_folded(folded: nn.Module, params: ParamSelector) -> ParamSelector:
    """A selection of ``params`` by name restricted to the names the folded copy still has."""
    if params is None or callable(params):
        return params
    names = dict(folded.named_parameters())
    return [n for n in params if n in names]


def layer_norms(model: nn.Module, *, params: ParamSelector = None) -> NormResult:
    """:func:`landscape.weight_norms` of the model with batch norm folded into the preceding
    layers (:func:`fold_batch_norm`; the model itself when it has no batch norm), as the reference
    code computes its norm measures (Jiang et al. 2020 eqs. 31-37, 42)."""
    if not _has_batch_norm(model):
        return weight_norms(model, params=params)
    folded = fold_batch_norm(model)
    return weight_norms(folded, params=_on_folded(folded, params))


def layer_distances(
    model: nn.Module, init_state: Mapping[str, Tensor] | None, *, params: ParamSelector = None
) -> InitDistances:
    """:func:`landscape.init_distances` (eqs. 40, 41) between the model and its initial state,
    both with batch norm folded (:func:`fold_batch_norm`; the initial model is ``model``'s
    architecture loaded with ``init_state``, which must then hold the batch norms' running
    statistics too, as a full ``state_dict`` does)."""
    if init_state is None or not _has_batch_norm(model):
        return init_distances(model, init_state, params=params)
    start = copy.deepcopy(model)
    try:
        start.load_state_dict(init_state)
    except (RuntimeError, KeyError) as error:
        raise ValueError(
            "init_state: folding batch norm into the initial weights needs the full initial "
            f"state_dict (running statistics included): {error}"
        ) from error
    folded = fold_batch_norm(model)
    return init_distances(folded, fold_batch_norm(start).state_dict(), params=_on_folded(folded, params))


@torch.no_grad()
def path_norm(model: nn.Module, data: Any, *, dtype: torch.dtype | None = None) -> float:
    """Path norm (Jiang et al. 2020 eq. 44; Neyshabur et al. 2015): batch norm folded into the
    preceding layers (:func:`fold_batch_norm`), every parameter then squared (biases included),
    the network applied in eval mode to one all-ones input of the shape of one sample of
    ``data``, its outputs summed. For a ReLU network this is the sum over all input-output paths
    of the product of the squared weights on the path (bias paths included). Computed in
    ``dtype`` (default float64); squared weight units.

    Raises:
        ValueError: a normalization layer that :func:`fold_batch_norm` cannot fold.
    """
    dtype = dtype or torch.float64
    folded = fold_batch_norm(model, dtype=dtype)
    inputs = _first_inputs(data)
    device = next(iter(folded.parameters())).device
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    ones = tuple(
        torch.ones((1, *t.shape[1:]), dtype=dtype if t.is_floating_point() else t.dtype, device=device) for t in args
    )
    state = {n: p.detach() ** 2 for n, p in folded.named_parameters()}
    with training_mode(folded, False):
        out = functional_call(folded, state, ones, strict=False)
    return float(out.sum())


def path_norm_over_margin(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None,
) -> float:
    """``path_norm / gamma^2`` (Jiang et al. 2020 eq. 43); :func:`path_norm` of all parameters,
    ``gamma`` from :func:`output_margin` on ``data``."""
    ml = _model_loss(model, loss_fn, data, params, dtype, model_loss)
    gamma = output_margin(ml.model, ml.loss_fn, data, model_loss=ml).value
    value = path_norm(ml.model, next(iter(ml.batches)))
    return value / gamma**2 if gamma > 0 else math.inf


# --------------------------------------------------------------------------------------------
# PAC-Bayes bounds
# --------------------------------------------------------------------------------------------
@dataclass
class PacBayesBounds:
    """Jiang et al. 2020 PAC-Bayes bounds from one noise level (dimensionless).

    Attributes:
        init: ``None`` without ``init_state``; else ``||w - w0||^2 / (4 sigma^2) + log(m / sigma) + 10`` (eq. 48) or, magnitude-aware,
            ``1/4 sum_i log((eps^2 + (sigma'^2 + 1) ||w - w0||^2 / omega) / (eps^2 + sigma'^2
            (w_i - w0_i)^2)) + log(m / sigma') + 10`` (eq. 56).
        orig: the same with ``||w||`` in the first term (eq. 49; eq. 57, whose denominator is
            still ``(w_i - w0_i)^2``, as in the reference code, so the magnitude-aware ``orig``
            is ``None`` without ``init_state`` too).
        sigma: sigma (plain) or sigma' (magnitude-aware) of the flatness search.
        m: number of samples of the search; omega: number of weights summed over.
        magnitude_aware, eps: the noise kind.
    """

    init: float | None
    orig: float | None
    sigma: float
    m: int
    omega: int
    magnitude_aware: bool
    eps: float


class _BoundSettings(TypedDict):
    sigma: float
    m: int
    omega: int
    magnitude_aware: bool
    eps: float


def _weights(model: nn.Module, params: ParamSelector) -> dict[str, Tensor]:
    return {n: t.to(torch.float64) for n, t in _selected(model, params).items() if t.ndim >= 2}


def pacbayes_bounds(
    flatness: FlatnessResult,
    model: nn.Module,
    init_state: Mapping[str, Tensor] | None,
    *,
    params: ParamSelector = None,
) -> PacBayesBounds:
    """The PAC-Bayes bounds of Jiang et al. 2020 (eqs. 48, 49 from a plain, 56, 57 from a
    magnitude-aware :func:`landscape.pacbayes_flatness` result), as the reference code computes
    them: ``w`` are the weights (selected parameters with >= 2 dimensions; biases and
    normalization scales excluded) flattened to one vector, ``w0`` their values in
    ``init_state``, ``m = flatness.n_examples``, ``omega`` the number of weights, ``eps =
    flatness.eps``. A zero sigma gives ``inf``. Without ``init_state`` (``None``) the bounds
    that need ``w0`` are ``None``. ``params`` should be the selection the flatness
    search perturbed (default: all parameters with ``requires_grad``).
    """
    weights = _weights(model, params)
    if not weights:
        raise ValueError("params: the selected parameters contain no weight (tensor with >= 2 dimensions)")
    w = torch.cat([t.reshape(-1).cpu() for t in weights.values()])
    dw = None
    if init_state is not None:
        diffs = dict(_differences(model, init_state, list(weights)))
        dw = torch.cat([diffs[n].reshape(-1).cpu() for n in weights])
    sigma, m, omega, eps = flatness.level, flatness.n_examples, w.numel(), flatness.eps
    settings: _BoundSettings = {
        "sigma": sigma,
        "m": m,
        "omega": omega,
        "magnitude_aware": flatness.magnitude_aware,
        "eps": eps,
    }
    if sigma <= 0:
        return PacBayesBounds(
            init=None if dw is None else math.inf,
            orig=None if dw is None and flatness.magnitude_aware else math.inf,
            **settings,
        )
    tail = math.log(m / sigma) + 10
    if not flatness.magnitude_aware:

        def bound(reference: Tensor | None) -> float | None:
            return None if reference is None else float(reference.square().sum()) / (4 * sigma**2) + tail

        return PacBayesBounds(init=bound(dw), orig=bound(w), **settings)
    if dw is None:
        return PacBayesBounds(init=None, orig=None, **settings)
    denominator = eps**2 + sigma**2 * dw.square()

    def mag_bound(reference: Tensor) -> float:
        numerator = eps**2 + (sigma**2 + 1) * float(reference.square().sum()) / omega
        return 0.25 * float(torch.log(numerator / denominator).sum()) + tail

    return PacBayesBounds(init=mag_bound(dw), orig=mag_bound(w), **settings)


# --------------------------------------------------------------------------------------------
# Fisher-Rao norm
# --------------------------------------------------------------------------------------------
def fisher_rao_norm(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None,
) -> float:
    """Empirical Fisher-Rao norm (squared) ``(1/m) sum_i <w, grad_w l_i(w)>^2`` over the samples of
    ``data`` at their data labels, ``w`` the selected parameters (default: all with
    ``requires_grad``). Equals ``w^T F w`` with ``F`` the empirical Fisher
    (:class:`landscape.ggn.EmpiricalFisherOperator`). Liang, Poggio, Rakhlin & Stokes 2019,
    "Fisher-Rao metric, geometry, and complexity of neural networks" (AISTATS), def. of
    ``||theta||_fr^2 = <theta, I(theta) theta>`` with the empirical Fisher. Jiang et al. 2020
    also list a Fisher-Rao measure; its normalization was not checked against the paper.
    For a bias-free ReLU network of ``L + 1`` layers (positively homogeneous of degree ``L + 1``)
    ``<w, grad_w l_i> = (L + 1) <d l_i / d f, f(x_i)>``, Liang et al.'s identity; with biases the
    value is still defined but that identity no longer holds. Loss units squared.

    ``<w, grad_w l_i>`` is the directional derivative of sample ``i``'s loss along ``w``: the
    Jacobian-vector product ``J w`` of the outputs (:class:`landscape.ggn.Linearization`), dotted with
    the per-sample output gradient; two reverse passes per batch; ``loss_fn`` must be a batch mean of per-sample losses.
    """
    ml = _model_loss(model, loss_fn, data, params, dtype, model_loss)

    def per_batch(inputs: Any, targets: Tensor) -> Tensor:
        lin = Linearization(ml, inputs)
        directional = lin.push([t.unsqueeze(0) for t in ml.theta.values()])[0]  # J w
        r = output_gradients(ml.loss_fn, lin.outputs, targets)
        n = r.shape[0]
        return (r * directional).reshape(n, -1).sum(1).square().mean().detach()

    return float(ml.weighted_sum(per_batch))


# --------------------------------------------------------------------------------------------
# optimization-based: steps to reach a loss
# --------------------------------------------------------------------------------------------
def steps_to_loss(history: Iterable[Mapping[str, Any]], target: float = 0.1, *, key: str = "train_loss") -> float:
    """Jiang et al. 2020's optimization-based measure: the number of optimizer steps from the
    initialization until the training cross-entropy first reaches ``target`` (default 0.1).

    ``history``: training records in step order, each with ``"step"`` (optimizer steps done) and
    ``key`` (the full-training-set loss at that step), e.g. the ``kind="epoch"`` records of a
    ``sweeps`` trial; records without ``key`` are skipped. Returns the ``step`` of the first record
    with ``loss <= target``, so the resolution is the evaluation interval (an epoch): a value is
    an upper bound, at most one interval above the true first step. ``inf`` when no record
    reached ``target`` (training stopped earlier or never got there).
    """
    if not (isinstance(target, (int, float)) and math.isfinite(target)):
        raise ValueError(f"target: must be a finite number (got {target!r})")
    last = -math.inf
    for record in history:
        if key not in record or record[key] is None:
            continue
        step = record["step"]
        if step < last:
            raise ValueError(f"history: records must be in step order (step {step} after {last})")
        last = step
        if float(record[key]) <= target:
            return float(step)
    return math.inf
