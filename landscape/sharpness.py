"""Sharpness of a minimum: how much the loss (or accuracy) degrades under bounded perturbations.

All measures perturb the flat parameter vector ``w`` (the variables of a
:class:`~landscape.ModelLoss`, by default every parameter with ``requires_grad``) and never touch
the user's model. Perturbations are written ``delta = c * z`` with a per-coordinate scale ``c``
and a free vector ``z`` in a ball, so "adaptive" (``c = |w|``) and plain (``c = 1``) versions share
one optimizer and one sampler:

* :func:`keskar_sharpness`: Keskar et al. 2017 epsilon-sharpness
  ``100 (max_{|y_i| <= eps(|w_i|+1)} L(w+y) - L(w)) / (1 + L(w))`` (percent).
* :func:`worst_case_sharpness`: ``max_{||delta/c||_p <= rho} L(w+delta) - L(w)``
  (Andriushchenko et al. 2023; adaptive ``c = |w|`` after Kwon et al. 2021), Auto-PGD ascent.
* :func:`average_sharpness`: ``E[L(w+delta)] - L(w)``, ``delta ~ N(0, rho^2 diag(c^2))``.
  Both are m-sharpness (Foret et al. 2021): computed per batch of ``m`` examples and averaged.
* :func:`pacbayes_flatness`: Jiang et al. 2020 ``1/sigma'^2`` from the largest noise level
  that costs 0.1 of training accuracy (Dziugaite & Roy 2017); magnitude-aware by default.
* :func:`sharpness_flatness`: Jiang et al. 2020 ``1/alpha'^2``, the worst-case counterpart.

The adaptive, filter-normalized and magnitude-aware measures are invariant under the
rescalings of Dinh et al. 2017 (a ReLU layer times ``a``, the next times ``1/a``); the raw ones
are not. Losses are in the units of ``loss_fn``; all randomness comes from ``seed`` (CPU
generator, so the same seed gives the same draws on every device).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.optimize
import torch
from torch import Tensor, nn

from ._functional import Batch, LossFn, ModelLoss, ParamSelector, is_classification
from .evaluate import loss_at_parameters

Norm = Literal[2, "inf"]

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
class KeskarResult:
    """Keskar epsilon-sharpness.

    Attributes:
        value: ``100 (max_loss - loss) / (1 + loss)``, percent, >= 0.
        loss: ``L(w)``, data-set loss at the weights.
        max_loss: the largest loss found inside the box.
        eps: box size: ``|y_i| <= eps (|w_i| + 1)``.
        method: ``"lbfgsb"`` or ``"pga"``.
        n_grad: number of data-set loss+gradient evaluations used.
    """

    value: float
    loss: float
    max_loss: float
    eps: float
    method: str
    n_grad: int


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
# shared helpers
# --------------------------------------------------------------------------------------------
def _model_loss(
    model: nn.Module, loss_fn: LossFn, data: Any, params: ParamSelector, dtype: torch.dtype | None,
    model_loss: ModelLoss | None,
) -> ModelLoss:
    if model_loss is not None:
        return model_loss
    return ModelLoss(model, loss_fn, data, params=params, dtype=dtype)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(ml: ModelLoss, gen: torch.Generator, *shape: int) -> Tensor:
    """Standard normal draws from a CPU generator, moved to the model's device (reproducible)."""
    return torch.randn(*shape, generator=gen, dtype=ml.dtype).to(ml.device)


def _rand_box(ml: ModelLoss, gen: torch.Generator, *shape: int) -> Tensor:
    """Uniform draws on ``[-1, 1]`` (CPU generator, moved to the model's device)."""
    return (2 * torch.rand(*shape, generator=gen, dtype=ml.dtype) - 1).to(ml.device)


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be a finite number {bound} (got {value!r})")


def _check_count(name: str, value: int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) and value >= 1):
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name}: must be a positive integer{extra} (got {value!r})")


def _check_norm(p: Any) -> Norm:
    if p in (2, "2"):
        return 2
    if p in ("inf", float("inf"), "linf"):
        return "inf"
    raise ValueError(f"p: must be 2 or 'inf' (got {p!r})")


def _slice_inputs(inputs: Any, sl: slice) -> Any:
    return tuple(t[sl] for t in inputs) if isinstance(inputs, tuple) else inputs[sl]


def _cat_inputs(parts: Sequence[Any]) -> Any:
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(ts) for ts in zip(*parts, strict=True))
    return torch.cat(list(parts))


def _example_groups(ml: ModelLoss, m: int | None, n_examples: int | None) -> list[Iterable[Batch]]:
    """The first ``n_examples`` examples of the data (all if ``None``), as groups that share one
    perturbation: batches of ``m`` examples, or (``m=None``) one group of the original batches."""
    if m is None and n_examples is None:
        return [ml.batches]  # streamed: a DataLoader is not pulled into memory
    batches, count = [], 0
    for inputs, targets in ml.batches:
        if n_examples is not None and count >= n_examples:
            break
        take = len(targets) if n_examples is None else min(len(targets), n_examples - count)
        batches.append((_slice_inputs(inputs, slice(0, take)), targets[:take]))
        count += take
    if m is None:
        return [batches]
    inputs = _cat_inputs([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    return [
        [(_slice_inputs(inputs, slice(i, i + m)), targets[i : i + m])] for i in range(0, count, m)
    ]


def _batches(ml: ModelLoss, group: Iterable[Batch]) -> list[Batch] | None:
    """A group of examples as the evaluator's ``batches`` (``None``: all of ``ml``'s data)."""
    return None if group is ml.batches else list(group)


def _group_size(group: Iterable[Batch]) -> int:
    return sum(len(t) for _, t in group)


def normalize_logits(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` applied to logits divided by their l2 norm per example (Andriushchenko et al.
    2023): removes the trivial sharpness change from scaling the last layer."""

    def normalized(outputs: Tensor, targets: Tensor) -> Tensor:
        norm = outputs.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(outputs.dtype).tiny)
        return loss_fn(outputs / norm, targets)

    return normalized


@torch.no_grad()
def _loss(ml: ModelLoss, loss_fn: LossFn, group: Iterable[Batch], flat: Tensor) -> float:
    """Mean loss of a group of batches at flat parameters ``flat`` (sample-weighted)."""
    p = ml.unflatten(flat)
    total, n = 0.0, 0
    for x, y in group:
        total += len(y) * float(loss_fn(ml.forward(p, x), y))
        n += len(y)
    return total / n


def _loss_and_grad(
    ml: ModelLoss,
    loss_fn: LossFn,
    group: Iterable[Batch],
    to_flat: Callable[[Tensor], Tensor],
    z: Tensor,
) -> tuple[float, Tensor]:
    """Mean loss over ``group`` at ``to_flat(z)`` and its gradient w.r.t. ``z``, batch by batch
    (one graph alive at a time)."""
    value, grad, n = 0.0, torch.zeros_like(z), 0
    for x, y in group:
        leaf = z.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(ml.forward(ml.unflatten(to_flat(leaf)), x), y)
            (g,) = torch.autograd.grad(loss, leaf)
        value += float(loss.detach()) * len(y)
        grad += g * len(y)
        n += len(y)
    return value / n, grad / n


@torch.no_grad()
def _accuracy(ml: ModelLoss, group: Iterable[Batch], flat: Tensor) -> float:
    """Accuracy over the examples of ``group`` at flat parameters ``flat`` (in ``ml.mode()``)."""
    p = ml.unflatten(flat)
    correct, n = 0.0, 0
    for x, y in group:
        correct += float((ml.forward(p, x).argmax(-1) == y).sum())
        n += len(y)
    return correct / n


def _require_classification(ml: ModelLoss, what: str) -> None:
    with torch.no_grad(), ml.mode():
        inputs, targets = next(iter(ml.batches))
        outputs = ml.forward(ml.theta, inputs)
    if not is_classification(outputs, targets):
        raise ValueError(
            f"{what} is defined by a drop in training accuracy: it needs [n, C] class scores and "
            f"integer labels [n] (got outputs {tuple(outputs.shape)}, targets "
            f"{tuple(targets.shape)} {targets.dtype}). Use worst_case_sharpness / "
            "average_sharpness for other losses."
        )


# --------------------------------------------------------------------------------------------
# projected ascent in z-space (Auto-PGD style)
# --------------------------------------------------------------------------------------------
def _project(z: Tensor, rho: float, p: Norm) -> Tensor:
    if p == "inf":
        return z.clamp(-rho, rho)
    norm = float(z.norm())
    return z if norm <= rho else z * (rho / norm)


def _ascent_direction(g: Tensor, p: Norm) -> Tensor:
    if p == "inf":
        return g.sign()
    norm = float(g.norm())
    return g / norm if norm > 0 else g


def _random_start(ml: ModelLoss, gen: torch.Generator, size: int, rho: float, p: Norm) -> Tensor:
    """A random point inside the ball at half its radius (a zero gradient at ``w`` would stall
    an ascent started at ``z = 0``)."""
    if p == "inf":
        return 0.5 * rho * _rand_box(ml, gen, size)
    d = _randn(ml, gen, size)
    return 0.5 * rho * d / d.norm().clamp_min(torch.finfo(d.dtype).tiny)


def _checkpoints(steps: int) -> set[int]:
    """Croce & Hein 2020 checkpoints (as step indices): p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    fractions, prev, cur = [], 0.0, 0.22
    while cur <= 1:
        fractions.append(cur)
        prev, cur = cur, cur + max(cur - prev - 0.03, 0.06)
    return {math.ceil(f * steps) for f in fractions}


def _apgd(
    objective: Callable[[Tensor], tuple[float, Tensor]],
    z0: Tensor,
    *,
    rho: float,
    p: Norm,
    steps: int,
    step_size: float,
    momentum: float,
) -> tuple[float, Tensor]:
    """Maximize ``objective`` over ``||z||_p <= rho`` from ``z0``; return the best point seen.

    Auto-PGD (Croce & Hein 2020): normalized (l2) or sign (linf) gradient steps of size
    ``step_size``, mixed with the previous step (weight ``momentum`` on the new one); at
    checkpoints the step is halved, and the iterate reset to the best point, when fewer than 75%
    of the steps since the last checkpoint increased the objective or when neither the step nor
    the best value changed since then. ``steps + 1`` objective evaluations.
    """
    checkpoints = _checkpoints(steps)
    z = _project(z0, rho, p)
    f, g = objective(z)
    best_f, best_z, best_g = f, z, g
    z_prev, f_prev = z, f
    eta, successes, last_ckpt = step_size, 0, 0
    ckpt_eta, ckpt_best = eta, best_f
    for k in range(1, steps + 1):
        u = _project(z + eta * _ascent_direction(g, p), rho, p)
        if k > 1:
            u = _project(z + momentum * (u - z) + (1 - momentum) * (z - z_prev), rho, p)
        z_next = u
        z_prev, z = z, z_next
        f, g = objective(z)
        successes += f > f_prev
        f_prev = f
        if f > best_f:
            best_f, best_z, best_g = f, z, g
        if k in checkpoints:
            too_few = successes < 0.75 * (k - last_ckpt)
            stalled = ckpt_eta == eta and ckpt_best == best_f
            ckpt_eta, ckpt_best = eta, best_f
            if too_few or stalled:
                eta /= 2
                z, z_prev, g, f_prev = best_z, best_z, best_g, best_f  # no momentum across a reset
            successes, last_ckpt = 0, k
    return best_f, best_z


def _restarted_ascent(
    ml: ModelLoss, objective: Callable[[Tensor], tuple[float, Tensor]], gen: torch.Generator, *,
    rho: float, p: Norm, steps: int, restarts: int, step_size: float, momentum: float,
) -> list[tuple[float, Tensor]]:
    """``restarts`` independent :func:`_apgd` runs from random starts; one ``(value, z)`` each."""
    return [
        _apgd(
            objective, _random_start(ml, gen, ml.num_params, rho, p),
            rho=rho, p=p, steps=steps, step_size=step_size, momentum=momentum,
        )
        for _ in range(restarts)
    ]


# --------------------------------------------------------------------------------------------
# Keskar epsilon-sharpness
# --------------------------------------------------------------------------------------------
def keskar_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    eps: float = 1e-3,
    max_iter: int = 10,
    method: Literal["lbfgsb", "pga"] = "lbfgsb",
    seed: int = 0,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    model_loss: ModelLoss | None = None,
) -> KeskarResult:
    """Keskar et al. 2017 epsilon-sharpness, in percent.

    ``phi = 100 (max_{y in C} L(w + y) - L(w)) / (1 + L(w))`` over the box
    ``C = {|y_i| <= eps (|w_i| + 1)}`` in the full parameter space, ``L`` the data-set loss.
    The maximum is found inexactly, from a seeded random start inside the box (half width):

    * ``method="lbfgsb"`` (default): scipy L-BFGS-B on ``-L`` with the box as bounds,
      ``max_iter`` iterations (default 10), gradients by autograd;
    * ``method="pga"``: sign-gradient projected ascent (Auto-PGD step control), ``max_iter``
      steps from an initial step of the box half-width.

    Args:
        eps: relative box size (Keskar et al. use 1e-3 and 5e-4).
        params, dtype, model_loss: parameter selection and computing dtype as in
            :class:`~landscape.ModelLoss`, or a prebuilt ``model_loss`` (then both are ignored).

    Returns:
        :class:`KeskarResult`; ``value >= 0`` (the start ``y = 0`` counts).
    """
    _check_positive("eps", eps)
    _check_count("max_iter", max_iter)
    if method not in ("lbfgsb", "pga"):
        raise ValueError(f"method: must be 'lbfgsb' or 'pga' (got {method!r})")
    ml = _model_loss(model, loss_fn, data, params, dtype, model_loss)
    theta = ml.theta_flat()
    box = eps * (theta.abs() + 1)
    gen = _generator(seed)
    n_grad = 0

    def objective(z: Tensor) -> tuple[float, Tensor]:
        nonlocal n_grad
        n_grad += 1
        return _loss_and_grad(ml, ml.loss_fn, ml.batches, lambda zz: theta + box * zz, z)

    with ml.mode():
        base = _loss(ml, ml.loss_fn, ml.batches, theta)
        z0 = 0.5 * _rand_box(ml, gen, ml.num_params)
        if method == "pga":
            best, _ = _apgd(
                objective, z0, rho=1.0, p="inf", steps=max_iter, step_size=1.0, momentum=0.75
            )
        else:

            def negated(z_np: np.ndarray) -> tuple[float, np.ndarray]:
                v, g = objective(torch.as_tensor(z_np, dtype=ml.dtype, device=ml.device))
                return -v, -g.to("cpu", torch.float64).numpy()

            res = scipy.optimize.minimize(
                negated, z0.to("cpu", torch.float64).numpy(), jac=True, method="L-BFGS-B",
                bounds=scipy.optimize.Bounds(-1.0, 1.0),
                # the gradient in box units is tiny (~eps): no tolerance stop, only max_iter
                options={"maxiter": max_iter, "gtol": 0.0, "ftol": 0.0},
            )
            best = -float(res.fun)
    max_loss = max(best, base)
    return KeskarResult(
        value=100 * (max_loss - base) / (1 + base), loss=base, max_loss=max_loss, eps=eps,
        method=method, n_grad=n_grad,
    )


# --------------------------------------------------------------------------------------------
# Andriushchenko et al. adaptive sharpness (worst and average case, m-sharpness)
# --------------------------------------------------------------------------------------------
def _sharpness_setup(
    model: nn.Module, loss_fn: LossFn, data: Any, *, rho: float, adaptive: bool, m: int | None,
    n_examples: int | None, logit_normalization: bool, params: ParamSelector,
    dtype: torch.dtype | None, model_loss: ModelLoss | None,
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
    return SharpnessResult(
        value=float(values @ weights), std_err=std_err, per_batch=values, **settings
    )


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
        model, loss_fn, data, rho=rho, adaptive=adaptive, m=m, n_examples=n_examples,
        logit_normalization=logit_normalization, params=params, dtype=dtype, model_loss=model_loss,
    )
    gen = _generator(seed)
    per_batch, n_grad = [], 0
    with ml.mode():
        for group in groups:
            base = _loss(ml, fn, group, theta)

            def objective(z: Tensor, group: Iterable[Batch] = group) -> tuple[float, Tensor]:
                return _loss_and_grad(ml, fn, group, lambda zz: theta + scale * zz, z)

            runs = _restarted_ascent(
                ml, objective, gen, rho=rho, p=p, steps=steps, restarts=restarts,
                step_size=2 * rho if step_size is None else step_size, momentum=momentum,
            )
            per_batch.append(max(max(v for v, _ in runs), base) - base)
            n_grad += restarts * (steps + 1)
    sizes = [_group_size(g) for g in groups]
    std_err = None
    if len(per_batch) > 1:
        std_err = float(np.std(per_batch, ddof=1) / math.sqrt(len(per_batch)))
    return _sharpness_result(
        per_batch, sizes, std_err, kind="worst", rho=rho, p=p, adaptive=adaptive, m=m,
        n_examples=sum(sizes), normalize_logits=logit_normalization, n_grad=n_grad,
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
        model, loss_fn, data, rho=rho, adaptive=adaptive, m=m, n_examples=n_examples,
        logit_normalization=logit_normalization, params=params, dtype=dtype, model_loss=model_loss,
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
        per_batch, sizes, std_err, kind="average", rho=rho, p=2, adaptive=adaptive, m=m,
        n_examples=sum(sizes), normalize_logits=logit_normalization, n_grad=n_samples * len(groups),
    )


# --------------------------------------------------------------------------------------------
# Jiang et al. 2020: PAC-Bayes flatness (sigma') and worst-case sharpness (alpha')
# --------------------------------------------------------------------------------------------
def perturbation_scale(
    theta: Tensor, level: float, *, magnitude_aware: bool, eps: float, box: bool = False
) -> Tensor:
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
    kind: str, model: nn.Module, loss_fn: LossFn, data: Any, *, magnitude_aware: bool, eps: float,
    upper: float, target_drop: float, n_steps: int, n_samples: int, seed: int,
    n_examples: int | None, params: ParamSelector, dtype: torch.dtype | None,
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
            upper=upper, target=target_drop, n_steps=n_steps,
        )
    return FlatnessResult(
        value=1 / level**2 if level > 0 else math.inf, level=level, kind=kind,
        magnitude_aware=magnitude_aware, accuracy=accuracy, bracket=bracket, drops=drops,
        bracketed=bracketed, n_steps=n_steps, n_samples=n_samples, eps=eps,
        target_drop=target_drop, upper=upper, n_examples=_group_size(group),
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
        return float(loss_at_parameters(ml, draws, batches=_batches(ml, group))[1].mean())

    return _flatness(
        "pacbayes", model, loss_fn, data, magnitude_aware=magnitude_aware, eps=eps, upper=upper,
        target_drop=target_drop, n_steps=n_steps, n_samples=n_samples, seed=seed,
        n_examples=n_examples, params=params, dtype=dtype, model_loss=model_loss,
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
        half_width = perturbation_scale(
            theta, alpha, magnitude_aware=magnitude_aware, eps=eps, box=True
        )

        def objective(z: Tensor) -> tuple[float, Tensor]:
            return _loss_and_grad(ml, ml.loss_fn, group, lambda zz: theta + half_width * zz, z)

        runs = _restarted_ascent(
            ml, objective, _generator(seed), rho=1.0, p="inf", steps=steps, restarts=restarts,
            step_size=2.0, momentum=0.75,
        )
        return min(_accuracy(ml, group, theta + half_width * z) for _, z in runs)

    return _flatness(
        "sharpness", model, loss_fn, data, magnitude_aware=magnitude_aware, eps=eps, upper=upper,
        target_drop=target_drop, n_steps=n_steps, n_samples=restarts, seed=seed,
        n_examples=n_examples, params=params, dtype=dtype, model_loss=model_loss,
        accuracy_at_level=accuracy_at,
    )


# moved to landscape.curvature; the old import path keeps working
from .curvature import CurvatureResult, adaptive_trace, filter_curvature  # noqa: E402, F401
