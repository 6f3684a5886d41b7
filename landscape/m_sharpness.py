"""Worst-case and average-case (adaptive) m-sharpness, Andriushchenko et al. 2023 (adaptive
``c = |w|`` after Kwon et al. 2021; m-sharpness after Foret et al. 2021: computed per batch of
``m`` examples and averaged).

* :func:`worst_case_sharpness`: ``max_{||delta/c||_p <= rho} L(w+delta) - L(w)``, Auto-PGD ascent.
* :func:`average_sharpness`: ``E[L(w+delta)] - L(w)``, ``delta ~ N(0, rho^2 diag(c^2))``.

Re-exported by :mod:`landscape.sharpness`, which describes the family of measures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._ascent import _restarted_ascent
from ._functional import Batch, LossFn, ModelLoss, ParamSelector
from ._perturbation import (
    Norm,
    _batches,
    _check_count,
    _check_norm,
    _check_positive,
    _example_groups,
    _generator,
    _group_size,
    _loss,
    _loss_and_grad,
    _model_loss,
    _randn,
)
from .evaluate import loss_at_parameters

#: Default radius ``rho`` of :func:`worst_case_sharpness` by ``(adaptive, p)``. Andriushchenko
#: et al. 2023 scan adaptive l2 over {0.25..2} and adaptive linf over {1e-3..8e-3} (ResNet-18,
#: CIFAR-10); the plain radii are absolute and depend on the network's scale: set your own.
WORST_RHO = {(True, 2): 0.5, (True, "inf"): 2e-3, (False, 2): 0.05, (False, "inf"): 1e-3}
#: Default ``rho`` of :func:`average_sharpness` by ``adaptive`` (their avg l2 grid: {0.05..0.4}).
AVERAGE_RHO = {True: 0.1, False: 0.01}


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class SharpnessResult:
    """Worst-case or average-case (adaptive) sharpness.

    Attributes:
        value: mean over batches of the per-batch sharpness (loss units).
        std_err: standard error of ``value``: over Monte-Carlo draws for ``kind="average"``;
            over batches for ``kind="worst"`` with several batches; ``None`` otherwise.
        per_batch: ``[n_batches]`` sharpness of each batch of ``m`` examples.
        kind: ``"worst"`` or ``"average"``.
        rho, p, adaptive, m, n_examples, normalize_logits: the settings used (``n_examples`` is
            the number of examples actually used).
        n_grad: loss+gradient evaluations (worst) or loss evaluations (average), per batch summed.
    """

    value: float
    std_err: float | None
    per_batch: np.ndarray
    kind: str
    rho: float
    p: Norm
    adaptive: bool
    m: int | None
    n_examples: int
    normalize_logits: bool
    n_grad: int


def normalize_logits(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` applied to logits divided by their l2 norm per example (Andriushchenko et al.
    2023): removes the trivial sharpness change from scaling the last layer."""

    def normalized(outputs: Tensor, targets: Tensor) -> Tensor:
        norm = outputs.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(outputs.dtype).tiny)
        return loss_fn(outputs / norm, targets)

    return normalized


# --------------------------------------------------------------------------------------------
# Andriushchenko et al. adaptive sharpness (worst and average case, m-sharpness)
# --------------------------------------------------------------------------------------------
def _sharpness_setup(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    rho: float,
    adaptive: bool,
    m: int | None,
    n_examples: int | None,
    logit_normalization: bool,
    params: ParamSelector,
    dtype: torch.dtype | None,
    model_loss: ModelLoss | None,
) -> tuple[ModelLoss, LossFn, Tensor, Tensor, list[Iterable[Batch]]]:
    _check_positive("rho", rho)
    _check_count("m", m, allow_none=True)
    _check_count("n_examples", n_examples, allow_none=True)
    ml = _model_loss(model, loss_fn, data, params, dtype, model_loss)
    fn = normalize_logits(ml.loss_fn) if logit_normalization else ml.loss_fn
    theta = ml.theta_flat()
    scale = theta.abs() if adaptive else torch.ones_like(theta)
    return ml, fn, theta, scale, _example_groups(ml, m, n_examples)


def _sharpness_result(
    per_batch: list[float], sizes: list[int], std_err: float | None, **settings: Any
) -> SharpnessResult:
    values, weights = np.asarray(per_batch), np.asarray(sizes, dtype=float)
    weights /= weights.sum()
    return SharpnessResult(value=float(values @ weights), std_err=std_err, per_batch=values, **settings)


def worst_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    rho: float | None = None,
    p: Norm = 2,
    adaptive: bool = True,
    m: int | None = 128,
    n_examples: int | None = 1024,
    steps: int = 20,
    restarts: int = 3,
    step_size: float | None = None,
    momentum: float = 0.75,
    logit_normalization: bool = False,
    seed: int = 0,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None,
) -> SharpnessResult:
    """Worst-case (adaptive) m-sharpness ``max_{||delta/c||_p <= rho} L_B(w + delta) - L_B(w)``.

    Andriushchenko et al. 2023: ``c = |w|`` (``adaptive=True``, Kwon et al. 2021) or ``c = 1``;
    ``L_B`` is the mean loss of a batch ``B`` of ``m`` examples, maximized separately per batch
    (m-sharpness, Foret et al. 2021) and averaged over the batches of the first ``n_examples``
    examples (weighted by batch size). The maximum is approximated from below by Auto-PGD
    ascent in ``z = delta / c`` (``steps`` steps, initial step ``2 rho``, momentum 0.75, step
    halved at checkpoints, best point kept), ``restarts`` random starts per batch (default 3).
    The ascent finds a local maximum, so the value is a lower bound of the true worst case: on
    a well-fitted cross-entropy loss the landscape has several local maxima (one per
    low-margin example, roughly) and more restarts raise the value (on a test MLP, 1 restart
    gave 40-70% of the best of 10). Compare models only at equal settings.

    Args:
        rho: radius; default :data:`WORST_RHO` for ``(adaptive, p)``.
        p: 2 or ``"inf"``.
        m: examples per batch; ``None``: the ``n_examples`` examples form one batch.
        n_examples: examples used (the first ones in data order); ``None``: all.
        logit_normalization: divide the logits by their l2 norm per example before the loss.
        params, dtype, model_loss: as in :func:`keskar_sharpness`.

    Returns:
        :class:`SharpnessResult` (loss units); ``std_err`` over batches when there are several.
    """
    p = _check_norm(p)
    rho = WORST_RHO[(bool(adaptive), p)] if rho is None else rho
    _check_count("steps", steps)
    _check_count("restarts", restarts)
    ml, fn, theta, scale, groups = _sharpness_setup(
        model,
        loss_fn,
        data,
        rho=rho,
        adaptive=adaptive,
        m=m,
        n_examples=n_examples,
        logit_normalization=logit_normalization,
        params=params,
        dtype=dtype,
        model_loss=model_loss,
    )
    gen = _generator(seed)
    per_batch, n_grad = [], 0
    with ml.mode():
        for group in groups:
            base = _loss(ml, fn, group, theta)

            def objective(z: Tensor, group: Iterable[Batch] = group) -> tuple[float, Tensor]:
                return _loss_and_grad(ml, fn, group, lambda zz: theta + scale * zz, z)

            runs = _restarted_ascent(
                ml,
                objective,
                gen,
                rho=rho,
                p=p,
                steps=steps,
                restarts=restarts,
                step_size=2 * rho if step_size is None else step_size,
                momentum=momentum,
            )
            per_batch.append(max(max(v for v, _ in runs), base) - base)
            n_grad += restarts * (steps + 1)
    sizes = [_group_size(g) for g in groups]
    std_err = None
    if len(per_batch) > 1:
        std_err = float(np.std(per_batch, ddof=1) / math.sqrt(len(per_batch)))
    return _sharpness_result(
        per_batch,
        sizes,
        std_err,
        kind="worst",
        rho=rho,
        p=p,
        adaptive=adaptive,
        m=m,
        n_examples=sum(sizes),
        normalize_logits=logit_normalization,
        n_grad=n_grad,
    )


def average_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    rho: float | None = None,
    adaptive: bool = True,
    m: int | None = 128,
    n_examples: int | None = 1024,
    n_samples: int = 100,
    logit_normalization: bool = False,
    seed: int = 0,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None,
) -> SharpnessResult:
    """Average-case (adaptive) m-sharpness ``E_delta[L_B(w + delta)] - L_B(w)``.

    ``delta ~ N(0, rho^2 diag(c^2))``, ``c = |w|`` (adaptive) or 1, so ``rho`` is the noise
    standard deviation (relative to ``|w|`` when adaptive). ``n_samples`` draws per batch of
    ``m`` examples; batches and the arguments not listed here as in :func:`worst_case_sharpness`.

    Args:
        rho: noise level; default :data:`AVERAGE_RHO` for ``adaptive``.
        n_samples: Monte-Carlo draws per batch (default 100).

    Returns:
        :class:`SharpnessResult`; ``std_err`` is the Monte-Carlo standard error of ``value``.
    """
    rho = AVERAGE_RHO[bool(adaptive)] if rho is None else rho
    _check_count("n_samples", n_samples)
    ml, fn, theta, scale, groups = _sharpness_setup(
        model,
        loss_fn,
        data,
        rho=rho,
        adaptive=adaptive,
        m=m,
        n_examples=n_examples,
        logit_normalization=logit_normalization,
        params=params,
        dtype=dtype,
        model_loss=model_loss,
    )
    gen = _generator(seed)
    per_batch, variances = [], []
    for group in groups:
        draws = [theta + rho * scale * _randn(ml, gen, ml.num_params) for _ in range(n_samples)]
        losses, _ = loss_at_parameters(ml, torch.stack([theta, *draws]), batches=_batches(ml, group), loss_fn=fn)
        diffs = losses[1:] - losses[0]
        per_batch.append(float(diffs.mean()))
        variances.append(float(diffs.var(ddof=1)) / n_samples if n_samples > 1 else math.nan)
    sizes = [_group_size(g) for g in groups]
    weights = np.asarray(sizes, dtype=float) / sum(sizes)
    std_err = None
    if n_samples > 1:
        std_err = float(math.sqrt(np.sum(weights**2 * np.asarray(variances))))
    return _sharpness_result(
        per_batch,
        sizes,
        std_err,
        kind="average",
        rho=rho,
        p=2,
        adaptive=adaptive,
        m=m,
        n_examples=sum(sizes),
        normalize_logits=logit_normalization,
        n_grad=n_samples * len(groups),
    )
