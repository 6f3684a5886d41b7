"""Jiang et al. 2020 flatness: the largest noise level that costs ``target_drop`` (0.1) of
training accuracy, found by bisection; magnitude-aware by default.

* :func:`pacbayes_flatness`: ``1/sigma'^2``, Gaussian noise (Dziugaite & Roy 2017).
* :func:`sharpness_flatness`: ``1/alpha'^2``, the worst-case counterpart (a box).

Re-exported by :mod:`landscape.sharpness`, which describes the family of measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._ascent import _restarted_ascent
from ._functional import Batch, LossFn, ModelLoss, ParamSelector
from ._perturbation import (
    _accuracy,
    _batches,
    _check_count,
    _check_positive,
    _example_groups,
    _generator,
    _group_size,
    _loss_and_grad,
    _model_loss,
    _randn,
    _require_classification,
)
from .evaluate import loss_at_parameters


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class FlatnessResult:
    """Jiang et al. noise level at which training accuracy drops by ``target_drop``.

    Attributes:
        value: ``1 / level**2`` (larger = sharper); ``inf`` if ``level == 0``.
        level: sigma' (std of the Gaussian noise, relative to ``|w|`` when magnitude-aware) or
            alpha' (half-width of the box), interpolated between the final bracket ends.
        kind: ``"pacbayes"`` (average case) or ``"sharpness"`` (worst case).
        magnitude_aware: noise scale ``level |w_i| + eps`` (std ``sqrt(level^2 w_i^2 + eps^2)``
            for the Gaussian) instead of ``level``.
        accuracy: training accuracy at ``w``.
        bracket: ``(lo, hi)`` after the bisection; ``drops``: accuracy drops at ``lo`` and ``hi``.
        bracketed: ``False`` when even the largest level tried did not drop the accuracy by
            ``target_drop``; ``level`` is then that largest level (a lower bound).
        n_steps, n_samples, eps, target_drop, upper: the settings used (``n_samples`` is the
            number of restarts for ``kind="sharpness"``).
        n_examples: training examples used (the first ones of ``data``).
    """

    value: float
    level: float
    kind: str
    magnitude_aware: bool
    accuracy: float
    bracket: tuple[float, float]
    drops: tuple[float, float]
    bracketed: bool
    n_steps: int
    n_samples: int
    eps: float
    target_drop: float
    upper: float
    n_examples: int


# --------------------------------------------------------------------------------------------
# Jiang et al. 2020: PAC-Bayes flatness (sigma') and worst-case sharpness (alpha')
# --------------------------------------------------------------------------------------------
def perturbation_scale(theta: Tensor, level: float, *, magnitude_aware: bool, eps: float, box: bool = False) -> Tensor:
    """Per-coordinate noise scale of Jiang et al. 2020 at noise level ``level``.

    Gaussian (``box=False``): the standard deviation, ``sqrt(level^2 w_i^2 + eps^2)``
    (magnitude-aware) or ``level`` (plain), so ``level`` is sigma and the variance is
    ``sigma^2``. Box (``box=True``): the half-width, ``level |w_i| + eps`` or ``level``.
    """
    if not magnitude_aware:
        return torch.full_like(theta, level)
    if box:
        return level * theta.abs() + eps
    return torch.sqrt(level**2 * theta**2 + eps**2)


def _bisect(
    drop_at: Callable[[float], float], *, upper: float, target: float, n_steps: int
) -> tuple[float, tuple[float, float], tuple[float, float], bool]:
    """Largest level with ``drop_at(level) <= target`` by fixed-depth bisection on ``[0, upper]``
    (``upper`` doubled up to 8 times until the drop exceeds ``target``), then linear
    interpolation between the bracket ends. Returns ``(level, bracket, drops, bracketed)``."""
    lo, hi = 0.0, float(upper)
    d_lo, d_hi = drop_at(lo), drop_at(hi)
    if d_lo > target:
        return 0.0, (lo, lo), (d_lo, d_lo), True
    doublings = 0
    while d_hi <= target and doublings < 8:
        lo, d_lo = hi, d_hi
        hi *= 2
        d_hi = drop_at(hi)
        doublings += 1
    if d_hi <= target:
        return hi, (hi, hi), (d_hi, d_hi), False
    for _ in range(n_steps):
        mid = (lo + hi) / 2
        d_mid = drop_at(mid)
        if d_mid <= target:
            lo, d_lo = mid, d_mid
        else:
            hi, d_hi = mid, d_mid
    level = lo + (target - d_lo) / (d_hi - d_lo) * (hi - lo)
    return level, (lo, hi), (d_lo, d_hi), True


def _flatness(
    kind: str,
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    magnitude_aware: bool,
    eps: float,
    upper: float,
    target_drop: float,
    n_steps: int,
    n_samples: int,
    seed: int,
    n_examples: int | None,
    params: ParamSelector,
    dtype: torch.dtype | None,
    model_loss: ModelLoss | None,
    accuracy_at_level: Callable[[ModelLoss, Iterable[Batch], Tensor, float], float],
) -> FlatnessResult:
    _check_positive("eps", eps, allow_zero=True)
    _check_positive("upper", upper)
    _check_positive("target_drop", target_drop)
    _check_count("n_steps", n_steps)
    _check_count("n_samples", n_samples)
    _check_count("n_examples", n_examples, allow_none=True)
    ml = _model_loss(model, loss_fn, data, params, dtype, model_loss)
    _require_classification(ml, f"{kind}_flatness")
    theta = ml.theta_flat()
    (group,) = _example_groups(ml, None, n_examples)
    with ml.mode():
        accuracy = _accuracy(ml, group, theta)
        level, bracket, drops, bracketed = _bisect(
            lambda level: accuracy - accuracy_at_level(ml, group, theta, level),
            upper=upper,
            target=target_drop,
            n_steps=n_steps,
        )
    return FlatnessResult(
        value=1 / level**2 if level > 0 else math.inf,
        level=level,
        kind=kind,
        magnitude_aware=magnitude_aware,
        accuracy=accuracy,
        bracket=bracket,
        drops=drops,
        bracketed=bracketed,
        n_steps=n_steps,
        n_samples=n_samples,
        eps=eps,
        target_drop=target_drop,
        upper=upper,
        n_examples=_group_size(group),
    )


def pacbayes_flatness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    magnitude_aware: bool = True,
    eps: float = 1e-3,
    upper: float = 2.0,
    target_drop: float = 0.1,
    n_steps: int = 15,
    n_samples: int = 10,
    n_examples: int | None = None,
    seed: int = 0,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None,
) -> FlatnessResult:
    """Jiang et al. 2020 PAC-Bayes flatness ``1/sigma'^2`` (magnitude-aware by default).

    ``sigma'`` is the largest sigma with ``E_u[acc(w + u)] >= acc(w) - target_drop`` on the
    training data (all of ``data``, or its first ``n_examples`` examples: a subset makes big data
    sets affordable), ``u_i ~ N(0, sigma^2 w_i^2 + eps^2)`` (magnitude-aware) or
    ``N(0, sigma^2)`` (plain): sigma is a standard deviation (the public implementation of Jiang
    et al. uses sigma^2 as the std). The expectation is a mean over ``n_samples`` draws; the same
    standard-normal draws (from ``seed``) are reused at every sigma, so the accuracy curve is
    smooth in sigma and the result reproducible. Bisection on ``[0, upper]`` with exactly
    ``n_steps`` halvings (``upper`` is doubled first if it does not drop the accuracy enough; the
    plain sigma is absolute, so for nets with large weights a larger ``upper`` saves doublings),
    then linear interpolation between the final bracket ends: no early exit, no quantized ties.

    Scale invariance (Dinh et al. 2017) of the magnitude-aware version is exact for ``eps=0``;
    ``eps > 0`` adds absolute noise of std ``eps`` that a rescaling changes in relative terms.

    Returns:
        :class:`FlatnessResult` (``level`` = sigma'; ``value`` = 1/sigma'^2, larger = sharper).
    """

    def accuracy_at(ml: ModelLoss, group: Iterable[Batch], theta: Tensor, sigma: float) -> float:
        gen = _generator(seed)
        std = perturbation_scale(theta, sigma, magnitude_aware=magnitude_aware, eps=eps)
        draws = torch.stack([theta + std * _randn(ml, gen, ml.num_params) for _ in range(n_samples)])
        accuracy = loss_at_parameters(ml, draws, batches=_batches(ml, group))[1]
        assert accuracy is not None
        return float(accuracy.mean())

    return _flatness(
        "pacbayes",
        model,
        loss_fn,
        data,
        magnitude_aware=magnitude_aware,
        eps=eps,
        upper=upper,
        target_drop=target_drop,
        n_steps=n_steps,
        n_samples=n_samples,
        seed=seed,
        n_examples=n_examples,
        params=params,
        dtype=dtype,
        model_loss=model_loss,
        accuracy_at_level=accuracy_at,
    )


def sharpness_flatness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    magnitude_aware: bool = True,
    eps: float = 1e-3,
    upper: float = 2.0,
    target_drop: float = 0.1,
    n_steps: int = 15,
    steps: int = 20,
    restarts: int = 3,
    n_examples: int | None = None,
    seed: int = 0,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None,
) -> FlatnessResult:
    """Jiang et al. 2020 worst-case (magnitude-aware) sharpness ``1/alpha'^2``.

    ``alpha'`` is the largest alpha such that the loss-maximizing perturbation ``u`` in the box
    ``|u_i| <= alpha |w_i| + eps`` (magnitude-aware)
    or ``|u_i| <= alpha`` (plain) costs at most ``target_drop`` training accuracy. ``u`` is found
    by gradient ASCENT on the training loss (the public baseline descends, which is wrong):
    sign-gradient Auto-PGD, ``steps`` steps, ``restarts`` random starts (the same starts, from
    ``seed``, at every alpha); the accuracy drop is the largest over the restarts' end points.
    Bisection as in :func:`pacbayes_flatness`. Cost: about ``(n_steps + 2) * restarts *
    (steps + 1)`` loss+gradient passes over the data, so on large data sets pass ``n_examples``.

    Returns:
        :class:`FlatnessResult` (``level`` = alpha'; ``value`` = 1/alpha'^2, larger = sharper).
    """
    _check_count("steps", steps)
    _check_count("restarts", restarts)

    def accuracy_at(ml: ModelLoss, group: Iterable[Batch], theta: Tensor, alpha: float) -> float:
        half_width = perturbation_scale(theta, alpha, magnitude_aware=magnitude_aware, eps=eps, box=True)

        def objective(z: Tensor) -> tuple[float, Tensor]:
            return _loss_and_grad(ml, ml.loss_fn, group, lambda zz: theta + half_width * zz, z)

        runs = _restarted_ascent(
            ml,
            objective,
            _generator(seed),
            rho=1.0,
            p="inf",
            steps=steps,
            restarts=restarts,
            step_size=2.0,
            momentum=0.75,
        )
        return min(_accuracy(ml, group, theta + half_width * z) for _, z in runs)

    return _flatness(
        "sharpness",
        model,
        loss_fn,
        data,
        magnitude_aware=magnitude_aware,
        eps=eps,
        upper=upper,
        target_drop=target_drop,
        n_steps=n_steps,
        n_samples=restarts,
        seed=seed,
        n_examples=n_examples,
        params=params,
        dtype=dtype,
        model_loss=model_loss,
        accuracy_at_level=accuracy_at,
    )
