"""Scale-invariant curvature scalars of the data-set Hessian, from Hessian-vector products.

* :func:`filter_curvature`: mean of ``d^T H d`` over filter-normalized Gaussian directions ``d``
  (the curvature at 0 of a filter-normalized 1-D loss curve).
* :func:`adaptive_trace`: ``tr(D H D)`` with ``D = diag(|w|)``, the Hessian trace in log-scale
  coordinates of the weights.

Both are invariant under the rescalings of Dinh et al. 2017 (a ReLU layer times ``a``, the next
times ``1/a``). Like every curvature function they take a :class:`~landscape.HessianOperator`
as first argument (``filter_curvature(H)``) or ``(model, loss_fn, data)`` to build one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ._functional import LossFn, ParamSelector
from .directions import filter_normalized_directions
from .hvp import CurvatureOperator, HessianOperator, as_hessian
from .trace import TraceResult, estimate_trace


@dataclass
class CurvatureResult:
    """A scale-invariant curvature scalar estimated from random vectors.

    Attributes:
        value: the estimate (loss units; ``d`` and ``D`` carry the parameters' units).
        std_err: standard error over the random vectors (``None`` for an exact value).
        n_vectors: number of random vectors (Hessian-vector products).
        samples: ``[n_vectors]`` individual quadratic forms.
    """

    value: float
    std_err: float | None
    n_vectors: int
    samples: np.ndarray = field(repr=False)


def quadratic_forms(H: CurvatureOperator, V: Tensor) -> CurvatureResult:
    """``v_j^T H v_j`` for the columns of ``V`` ``[P, n]`` (one block product), their mean and
    standard error."""
    samples = (V * (H @ V)).sum(0).to("cpu", torch.float64).numpy()
    n = len(samples)
    std_err = float(samples.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return CurvatureResult(value=float(samples.mean()), std_err=std_err, n_vectors=n, samples=samples)


def filter_curvature(
    model: nn.Module | HessianOperator | None,
    loss_fn: LossFn | None = None,
    data: Any = None,
    *,
    n_directions: int = 10,
    seed: int = 0,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    operator: HessianOperator | None = None,
) -> CurvatureResult:
    """Mean directional curvature ``d^T H d`` over ``n_directions`` (default 10) filter-normalized
    Gaussian directions (:func:`landscape.directions.filter_normalized_directions`, the
    directions of the seeded surfaces): the curvature of a 1-D filter-normalized loss curve at
    0, invariant to layer rescalings. One block of Hessian-vector products.

    Args:
        model: the model (with ``loss_fn``, ``data``; ``params``/``dtype`` build the operator),
            or a prebuilt :class:`~landscape.HessianOperator` (``operator=`` also works).
    """
    if isinstance(n_directions, bool) or not (isinstance(n_directions, int) and n_directions >= 1):
        raise ValueError(f"n_directions: must be a positive integer (got {n_directions!r})")
    H = as_hessian(model, loss_fn, data, operator=operator, params=params, dtype=dtype)
    return quadratic_forms(H, filter_normalized_directions(H, n_directions, seed=seed))


def adaptive_trace(
    model: nn.Module | HessianOperator | None,
    loss_fn: LossFn | None = None,
    data: Any = None,
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    rtol: float = 1e-2,
    max_hvp: int = 1000,
    sketch_size: int | None = None,
    seed: int = 0,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    operator: HessianOperator | None = None,
) -> TraceResult:
    """Adaptive trace ``tr(D H D) = sum_i w_i^2 H_ii``, ``D = diag(|w|)``: the Hessian trace in
    log-scale coordinates of the weights, invariant to layer rescalings (Dinh et al. 2017).

    Estimated by :func:`landscape.trace.estimate_trace` (Hutch++ by default, stop at relative
    standard error ``rtol`` or ``max_hvp`` Hessian-vector products) on ``v -> D H D v``;
    arguments as in :func:`landscape.hessian_trace`. ``sketch_size >= P`` gives the exact value.

    Returns:
        :class:`landscape.TraceResult` (``value``, ``std_err``, ``n_hvp``, ...).
    """
    H = as_hessian(model, loss_fn, data, operator=operator, params=params, dtype=dtype)
    scale = H.theta_flat().abs().unsqueeze(1)
    return estimate_trace(
        lambda V: scale * (H @ (scale * V)),
        dim=H.num_params,
        dtype=H.dtype,
        device=H.device,
        method=method,
        rtol=rtol,
        max_products=max_hvp,
        sketch_size=sketch_size,
        block_size=max(2, H.block_size),
        seed=seed,
    )
