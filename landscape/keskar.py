"""Keskar et al. 2017 epsilon-sharpness
``100 (max_{|y_i| <= eps(|w_i|+1)} L(w+y) - L(w)) / (1 + L(w))`` (percent): the largest loss
increase in a box around the weights, relative to the loss.

Re-exported by :mod:`landscape.sharpness`, which describes the family of measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.optimize
import torch
from torch import Tensor, nn

from ._ascent import _apgd
from ._functional import LossFn, ModelLoss, ParamSelector
from ._perturbation import (
    _check_count,
    _check_positive,
    _generator,
    _loss,
    _loss_and_grad,
    _model_loss,
    _rand_box,
)


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
            best, _ = _apgd(objective, z0, rho=1.0, p="inf", steps=max_iter, step_size=1.0, momentum=0.75)
        else:

            def negated(z_np: np.ndarray) -> tuple[float, np.ndarray]:
                v, g = objective(torch.as_tensor(z_np, dtype=ml.dtype, device=ml.device))
                return -v, -g.to("cpu", torch.float64).numpy()

            res = scipy.optimize.minimize(
                negated,
                z0.to("cpu", torch.float64).numpy(),
                jac=True,
                method="L-BFGS-B",
                bounds=scipy.optimize.Bounds(-1.0, 1.0),
                # the gradient in box units is tiny (~eps): no tolerance stop, only max_iter
                options={"maxiter": max_iter, "gtol": 0.0, "ftol": 0.0},
            )
            best = -float(res.fun)
    max_loss = max(best, base)
    return KeskarResult(
        value=100 * (max_loss - base) / (1 + base),
        loss=base,
        max_loss=max_loss,
        eps=eps,
        method=method,
        n_grad=n_grad,
    )
