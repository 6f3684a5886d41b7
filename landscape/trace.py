"""Trace of the Hessian (or of any symmetric operator) by randomized probing.

Hutchinson: ``tr(H) = E[z^T H z]`` for Rademacher probes ``z`` (entries +-1), with per-probe
variance ``2 (||H||_F^2 - sum_i H_ii^2)``; the estimate is the probe mean and its standard
error the sample standard deviation over ``sqrt(m)``.

Hutch++: first a sketch ``Q = orth(H S)`` of ``s`` Rademacher columns ``S`` (``2s`` products),
whose part of the trace, ``tr(Q^T H Q)``, is exact; then Hutchinson on the rest,
``z^T (I - QQ^T) H (I - QQ^T) z``. When ``H`` has a few dominant eigenvalues (as network
Hessians do) the sketch takes them out and the remaining variance is far smaller; with a fixed
budget the error falls about as ``1/m`` rather than ``1/sqrt(m)``. Its standard error is that of
the residual-part Hutchinson samples (the sketch part has no sampling error given ``Q``).

Both stop when ``std_err <= rtol |value|`` (after at least one block of probes) or when the
product budget ``max_hvp`` is spent. Probes go through the operator in blocks (one vmapped HVP
per block for a Hessian) and come from a seeded CPU generator: same seed, same numbers.

References: M. F. Hutchinson (1989), "A stochastic estimator of the trace of the influence
matrix for Laplacian smoothing splines", Commun. Stat. Simul. Comput. 18; R. A. Meyer,
C. Musco, C. Musco and D. P. Woodruff (2021), "Hutch++: Optimal stochastic trace estimation",
SOSA.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ._functional import LossFn, ParamSelector
from ._lanczos import OperatorLike, SymmetricOperator, prepare, random_block
from .hvp import Backend, HessianOperator, as_hessian

TraceMethod = Literal["hutch++", "hutchinson"]
#: The product budget as errors name it: the argument here and in the Hessian-level functions.
_BUDGET = "max_products (max_hvp of hessian_trace and adaptive_trace)"


@dataclass
class TraceResult:
    """A trace estimate.

    Attributes:
        value: the estimate of ``tr(H)`` (sum of eigenvalues; loss units per parameter unit^2).
        std_err: its standard error (0 when the sketch covered the whole space: exact).
        n_hvp: operator products (HVPs) this call made.
        converged: ``std_err <= rtol |value|`` was reached within the budget.
        method: ``"hutch++"`` or ``"hutchinson"``.
        n_probes: Hutchinson probes (for Hutch++: of the residual part).
        sketch_size: Hutch++ sketch columns ``s`` (0 for Hutchinson).
        samples: ``[n_probes]`` float64 per-probe values ``z^T H z`` (residual part for Hutch++).
    """

    value: float
    std_err: float
    n_hvp: int
    converged: bool
    method: str
    n_probes: int
    sketch_size: int
    samples: np.ndarray

    def __repr__(self) -> str:
        return (
            f"TraceResult(value={self.value:.6g}, std_err={self.std_err:.3g}, n_hvp={self.n_hvp}, "
            f"converged={self.converged}, method={self.method!r})"
        )


def _hutch_plus_plus_sketch(op: SymmetricOperator, size: int, generator: torch.Generator) -> tuple[Tensor, float]:
    """Orthonormal ``Q`` [P, s] spanning ``H S`` and the exact ``tr(Q^T H Q)``."""
    if size >= op.dim:
        basis = torch.eye(op.dim, device=op.device, dtype=op.dtype)
    else:
        sketch = op.matmat(random_block(op.dim, size, generator, rademacher=True, like=op))
        basis = torch.linalg.qr(sketch).Q
    return basis, float((basis * op.matmat(basis)).sum())


def estimate_trace(
    operator: OperatorLike,
    *,
    method: TraceMethod = "hutch++",
    rtol: float = 1e-2,
    max_products: int = 1000,
    sketch_size: int | None = None,
    block_size: int | None = None,
    seed: int = 0,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceResult:
    """Trace of any symmetric operator by Hutchinson or Hutch++ (see the module docstring).

    Args:
        operator: a :class:`~landscape.HessianOperator`, a dense ``[P, P]`` tensor/ndarray, a
            scipy ``LinearOperator`` or a callable on ``[P, K]`` blocks (then ``dim``).
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        rtol: target relative standard error ``std_err / |value|``. Default 1e-2.
        max_products: budget of products (sketch included). Default 1000.
        sketch_size: Hutch++ sketch columns ``s`` (costs ``2s`` products). Default
            ``min(P, 32, max_products // 4)``; ``s >= P`` gives the exact trace with ``P`` products.
        block_size: probes per block product. Default: the HessianOperator's ``block_size``,
            else 16.
        seed: seeds every probe.
    """
    op, generator = prepare(operator, seed, dim=dim, dtype=dtype, device=device)
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method: must be 'hutch++' or 'hutchinson' (got {method!r})")
    if not rtol > 0:
        raise ValueError(f"rtol: must be > 0 (got {rtol!r})")
    block = block_size if block_size else getattr(operator, "block_size", 16)
    if block < 2:
        raise ValueError(f"block_size: must be >= 2 so that a standard error exists (got {block})")
    basis, exact_part, sketch = None, 0.0, 0
    if method == "hutch++":
        sketch = min(op.dim, 32, max_products // 4) if sketch_size is None else int(sketch_size)
        if sketch < 1:
            raise ValueError(f"sketch_size: must be >= 1 (got {sketch}); or raise {_BUDGET}")
        basis, exact_part = _hutch_plus_plus_sketch(op, sketch, generator)
        if sketch >= op.dim:
            return TraceResult(exact_part, 0.0, op.n_products, True, method, 0, sketch, np.zeros(0))
    if max_products - op.n_products < 2:
        raise ValueError(f"{_BUDGET}: {max_products} leaves fewer than 2 probes after the sketch; raise it")
    samples: list[float] = []
    value = std_err = math.nan
    converged = False
    while op.n_products + 2 <= max_products:
        count = min(block, max_products - op.n_products)
        probes = random_block(op.dim, count, generator, rademacher=True, like=op)
        if basis is not None:
            probes = probes - basis @ (basis.T @ probes)
        samples.extend((probes * op.matmat(probes)).sum(dim=0).double().cpu().tolist())
        spread = np.asarray(samples)
        value = exact_part + float(spread.mean())
        std_err = float(spread.std(ddof=1) / math.sqrt(len(spread)))
        if std_err <= rtol * abs(value):
            converged = True
            break
    if not converged:
        warnings.warn(
            f"{method}: relative standard error {std_err / abs(value):.2g} > rtol={rtol:g} after "
            f"{op.n_products} products; raise {_BUDGET} or loosen rtol",
            RuntimeWarning,
            stacklevel=2,
        )
    return TraceResult(value, std_err, op.n_products, converged, method, len(samples), sketch, np.asarray(samples))


def hessian_trace(
    model: nn.Module | HessianOperator | None,
    loss_fn: LossFn | None = None,
    data: Any = None,
    method: TraceMethod = "hutch++",
    *,
    rtol: float = 1e-2,
    max_hvp: int = 1000,
    sketch_size: int | None = None,
    block_size: int | None = None,
    seed: int = 0,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    train_mode: bool = False,
    backend: Backend | None = None,
    operator: HessianOperator | None = None,
) -> TraceResult:
    """Trace ``tr(H) = sum_i lambda_i`` of the data-set Hessian of ``model``.

    ``H`` is the Hessian of the sample-weighted mean loss over all batches of ``data`` at the
    current weights, in eval mode unless ``train_mode`` (see :class:`~landscape.HessianOperator`);
    the model is left unchanged.

    Args:
        method: ``"hutch++"`` (default; Meyer et al. 2021) or ``"hutchinson"`` (1989).
        rtol: stop when ``std_err <= rtol |value|``. Default 1e-2.
        max_hvp: HVP budget (sketch included). Default 1000.
        sketch_size: Hutch++ sketch columns (default ``min(P, 32, max_hvp // 4)``).
        block_size: probes per vmapped block (default: the operator's, 16).
        seed: seeds every probe (same seed, same result).
        params, dtype, train_mode, backend: how to build the HessianOperator.
        operator: the older spelling of a prebuilt operator; pass it as ``model`` instead:
            ``hessian_trace(H, rtol=0.05)``.

    Returns:
        :class:`TraceResult` (value, std_err, n_hvp, converged, ...).
    """
    hessian = as_hessian(
        model, loss_fn, data, operator=operator, params=params, dtype=dtype, train_mode=train_mode, backend=backend
    )
    return estimate_trace(
        hessian,
        method=method,
        rtol=rtol,
        max_products=max_hvp,
        sketch_size=sketch_size,
        block_size=block_size,
        seed=seed,
    )
