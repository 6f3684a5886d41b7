"""Projected ascent in ``z``-space (Auto-PGD, Croce & Hein 2020): maximize an objective over the
ball ``||z||_p <= rho`` (``p`` = 2 or ``"inf"``) from random starts. The worst-case measures use
it: Keskar's ``method="pga"``, worst-case m-sharpness and the Jiang et al. alpha' search.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._functional import ModelLoss
from ._perturbation import Norm, _rand_box, _randn


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
    ml: ModelLoss,
    objective: Callable[[Tensor], tuple[float, Tensor]],
    gen: torch.Generator,
    *,
    rho: float,
    p: Norm,
    steps: int,
    restarts: int,
    step_size: float,
    momentum: float,
) -> list[tuple[float, Tensor]]:
    """``restarts`` independent :func:`_apgd` runs from random starts; one ``(value, z)`` each."""
    return [
        _apgd(
            objective,
            _random_start(ml, gen, ml.num_params, rho, p),
            rho=rho,
            p=p,
            steps=steps,
            step_size=step_size,
            momentum=momentum,
        )
        for _ in range(restarts)
    ]
