"""Extreme eigenvalues of the Hessian (or of any symmetric operator), with their residuals.

Default: Lanczos with full reorthogonalization (:func:`lanczos`); the baseline users know,
power iteration as PyHessian runs it, is :func:`power_iteration` (``method="power"``).

Accuracy. An eigenpair ``(lambda, v)``, ``||v|| = 1``, is *converged* when its residual

    ||H v - lambda v|| <= tol * |lambda|      (or <= 100 eps ||H||, the rounding floor)

For a symmetric ``H`` some true eigenvalue lies within that residual of ``lambda`` (so the
relative eigenvalue error is at most ``tol``) and, when the nearest other eigenvalue is ``gap``
away, within ``residual^2 / gap``: with ``tol = 1e-3`` eigenvalues are typically right to
``1e-6`` relative and eigenvectors to ``residual / gap`` in angle. Every result reports the
residuals.

References: C. Lanczos (1950); G. H. Golub and C. F. Van Loan, *Matrix Computations*, 4th ed.,
sections 8.1 (residual bounds) and 10.1; Z. Yao et al. (2020), "PyHessian: Neural networks
through the lens of the Hessian", IEEE BigData (power-iteration baseline).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ._functional import LossFn, ParamSelector
from ._lanczos import Lanczos, OperatorLike, SymmetricOperator, prepare, random_block
from .hvp import Backend, HessianOperator, as_hessian

Which = Literal["largest", "smallest", "both"]
DEFAULT_MAX_STEPS = 300


@dataclass
class EigenResult:
    """Eigenpairs of a symmetric operator.

    Attributes:
        values: ``[n]`` float64 eigenvalues (loss units per parameter unit squared):
            descending for ``which="largest"``, ascending for ``"smallest"``, and for
            ``"both"`` the ``k`` largest then the ``k`` smallest, all descending (``n = 2k``).
        vectors: ``[P, n]`` unit eigenvectors as columns, in the operator's dtype and on its
            device (for a Hessian: flat, in the order of ``HessianOperator.names``).
        residuals: ``[n]`` float64, ``||H v_i - lambda_i v_i||`` (Lanczos: from the recurrence,
            or from fresh products with ``exact_residuals=True``; power: from the last product).
        n_hvp: operator products (HVPs) this call made, residual checks included.
        converged: every pair met the stopping rule (Lanczos: residual <= tol |lambda|;
            power: relative change of the eigenvalue < tol, which does not bound the error).
        method: ``"lanczos"`` or ``"power"``.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    n_hvp: int
    converged: bool
    method: str

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.values.tolist())
        res = ", ".join(f"{r:.1e}" for r in self.residuals.tolist())
        return (
            f"EigenResult(values=[{vals}], residuals=[{res}], n_hvp={self.n_hvp}, "
            f"converged={self.converged}, method={self.method!r})"
        )


def _check(k: int, which: str, tol: float, dim: int) -> int:
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"which: must be 'largest', 'smallest' or 'both' (got {which!r})")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be a positive integer (got {k!r})")
    wanted = 2 * k if which == "both" else k
    if wanted > dim:
        raise ValueError(
            f"k: asks for {wanted} eigenpairs of a {dim}-dimensional operator; use k <= {dim // (2 if which == 'both' else 1)}"
        )
    if not tol > 0:
        raise ValueError(f"tol: must be > 0 (got {tol!r})")
    return wanted


def _start(op: SymmetricOperator, v0: Tensor | None, generator: torch.Generator) -> Tensor:
    if v0 is None:
        return random_block(op.dim, 1, generator, rademacher=False, like=op)
    v0 = v0.detach().reshape(-1, 1)
    if v0.shape[0] != op.dim:
        raise ValueError(f"v0: expected a vector of length {op.dim} (the number of parameters), got {v0.shape[0]}")
    return v0.to(op.device, op.dtype)


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices into ascending ``theta`` in the order :class:`EigenResult` reports them."""
    top, bottom = np.arange(len(theta))[::-1][:k], np.arange(k)
    return {"largest": top, "smallest": bottom, "both": np.concatenate([top, bottom[::-1]])}[which]


def _threshold(values: np.ndarray, tol: float, scale: float, dtype: torch.dtype) -> np.ndarray:
    return np.maximum(tol * np.abs(values), 100 * torch.finfo(dtype).eps * scale)


def _result(
    op: SymmetricOperator,
    values: np.ndarray | list[float],
    vectors: Tensor,
    residuals: np.ndarray | list[float],
    converged: bool,
    method: str,
) -> EigenResult:
    """An :class:`EigenResult`: float64 ``values`` and ``residuals``, ``n_hvp`` from ``op``."""
    return EigenResult(
        values=torch.as_tensor(values, dtype=torch.float64),
        vectors=vectors,
        residuals=torch.as_tensor(residuals, dtype=torch.float64),
        n_hvp=op.n_products,
        converged=converged,
        method=method,
    )


def _finish(
    op: SymmetricOperator,
    values: np.ndarray,
    vectors: Tensor,
    residuals: np.ndarray | None,
    tol: float,
    scale: float,
) -> EigenResult:
    """The Lanczos result; true residuals from one block product ``H Y`` when ``residuals`` is
    None; a warning if a pair misses ``tol``."""
    if residuals is None:
        theta = torch.as_tensor(values, device=op.device, dtype=op.dtype)
        residuals = (op.matmat(vectors) - vectors * theta).norm(dim=0).double().cpu().numpy()
    converged = bool((residuals <= _threshold(values, tol, scale, op.dtype)).all())
    if not converged:
        warnings.warn(
            f"lanczos: not converged to tol={tol:g} within the product budget (residuals "
            f"{residuals.tolist()}); raise max_products (max_hvp of hessian_eigenvalues) or loosen tol",
            RuntimeWarning,
            stacklevel=3,
        )
    return _result(op, values, vectors, residuals, converged, "lanczos")


def lanczos(
    operator: OperatorLike,
    k: int = 1,
    which: Which = "largest",
    tol: float = 1e-3,
    *,
    v0: Tensor | None = None,
    max_products: int | None = None,
    seed: int = 0,
    exact_residuals: bool = False,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    Args:
        operator: a :class:`~landscape.HessianOperator`, a dense symmetric ``[P, P]`` tensor or
            ndarray, a scipy ``LinearOperator``, or a callable on ``[P, K]`` blocks (give ``dim``).
        k: eigenpairs wanted (``2k`` for ``which="both"``). Default 1.
        which: ``"largest"`` (algebraic, default), ``"smallest"`` (most negative first: negative
            curvature near saddles) or ``"both"``.
        tol: relative residual at which a pair is converged: ``||Hv - lambda v|| <= tol |lambda|``
            (see the module docstring for the resulting eigenvalue accuracy). Default 1e-3.
        v0: ``[P]`` start vector, e.g. the previous top eigenvector during training (warm
            start). Default: standard normal from ``seed``.
        max_products: budget of operator products (the basis holds one ``[P]`` vector per
            product). Default ``min(P, 300)``, plus ``n`` with ``exact_residuals``.
        seed: seeds the start vector and restarts (CPU generator: same numbers on any device).
        exact_residuals: recompute the residuals from one extra block product of the ``n``
            eigenvectors. Default ``False``: take them from the recurrence,
            ``||H y - theta y|| = |beta_m s_m|``, which full reorthogonalization keeps equal to
            the true residual up to rounding (``~ eps ||H||``; checked in the tests).
        dim, dtype, device: for operators that do not carry them (see
            :func:`landscape._lanczos.as_operator`).

    The Ritz residuals are read off the tridiagonal after every step (no extra product); the
    iteration stops as soon as all wanted pairs meet ``tol``. If an invariant subspace is found the recurrence restarts with a
    random orthogonal vector, so repeated eigenvalues are found; still, one start vector sees
    a cluster of nearly equal eigenvalues slowly. Returns an :class:`EigenResult`.
    """
    op, generator = prepare(operator, seed, dim=dim, dtype=dtype, device=device)
    wanted = _check(k, which, tol, op.dim)
    check = wanted if exact_residuals else 0
    budget = max_products if max_products is not None else min(op.dim, DEFAULT_MAX_STEPS) + check
    if budget < wanted + check:
        raise ValueError(
            f"max_products (max_hvp of hessian_eigenvalues): a budget of {budget} products cannot give {wanted} eigenpairs; use >= {wanted + check}"
        )
    run = Lanczos(op, _start(op, v0, generator), budget - check, restart_on_breakdown=True, generator=generator)
    at_last_breakdown = None
    for steps in run:
        if steps < wanted:
            continue
        theta, _, estimates = run.ritz()
        idx = _wanted(theta, k, which)
        limit = _threshold(theta[idx], tol, np.abs(theta).max(), op.dtype)
        # A given v0 that spans an invariant subspace (an eigenvector, for a warm start) is
        # taken at its word, like any start vector whose Krylov space has not ended.
        warm_block_ended = v0 is not None and run.just_broke[0] and run.restarts[0] == 1
        if (not run.restarts[0] or warm_block_ended) and (estimates[idx] <= limit).all():
            break
        if run.restarts[0] and run.just_broke[0]:
            # After an invariant subspace the complement may hold more copies of the wanted
            # eigenvalues: stop only once a whole further subspace left them unchanged.
            if at_last_breakdown is not None and (np.abs(theta[idx] - at_last_breakdown) <= limit).all():
                break
            at_last_breakdown = theta[idx]
    theta, s, estimates = run.ritz()
    idx = _wanted(theta, k, which)
    coefficients = torch.as_tensor(s[:, idx].copy(), device=op.device, dtype=op.dtype)
    vectors = run.basis[0].T @ coefficients
    residuals = None if exact_residuals else estimates[idx]
    return _finish(op, theta[idx], vectors, residuals, tol, float(np.abs(theta).max()))


def power_iteration(
    operator: OperatorLike,
    k: int = 1,
    tol: float = 1e-3,
    *,
    max_iter: int = 100,
    v0: Tensor | None = None,
    max_products: int | None = None,
    seed: int = 0,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> EigenResult:
    """Top-``k`` eigenpairs by power iteration with deflation, run the way PyHessian runs it.

    For each pair: ``v <- H v / ||H v||`` with ``v`` kept orthogonal to the pairs already found;
    ``lambda = v^T H v``; stop when ``|lambda - lambda_prev| / (|lambda_prev| + 1e-6) < tol`` or
    after ``max_iter`` products (default 100). This rule can stop early when convergence is
    slow, and power iteration finds the eigenvalue of largest *magnitude*: use :func:`lanczos`
    for accuracy. ``max_products`` caps the total. Residuals come from the last product (free).
    """
    op, generator = prepare(operator, seed, dim=dim, dtype=dtype, device=device)
    _check(k, "largest", tol, op.dim)
    budget = max_products if max_products is not None else k * max_iter
    found = torch.zeros(op.dim, 0, device=op.device, dtype=op.dtype)
    values, residuals, all_met = [], [], True

    def deflate(x: Tensor) -> Tensor:
        return x - found @ (found.T @ x)

    for i in range(k):
        v = _start(op, v0 if i == 0 else None, generator)[:, 0]
        v = deflate(v)
        v = v / v.norm()
        previous, met, value, residual = None, False, float("nan"), float("nan")
        for _ in range(max_iter):
            if op.n_products >= budget:
                break
            hv = deflate(op.matmat(v[:, None])[:, 0])
            value = float(v @ hv)
            residual = float((hv - value * v).norm())
            if previous is not None and abs(value - previous) / (abs(previous) + 1e-6) < tol:
                met = True
                break
            previous = value
            v = hv / hv.norm()
        all_met &= met
        values.append(value)
        residuals.append(residual)
        found = torch.cat([found, v[:, None]], dim=1)
    if not all_met:
        warnings.warn(f"power: stopping rule not met within {max_iter} iterations", RuntimeWarning, stacklevel=2)
    return _result(op, values, found, residuals, all_met, "power")


def hessian_eigenvalues(
    model: nn.Module | HessianOperator | None,
    loss_fn: LossFn | None = None,
    data: Any = None,
    k: int = 1,
    which: Which = "largest",
    tol: float = 1e-3,
    *,
    method: Literal["lanczos", "power"] = "lanczos",
    v0: Tensor | None = None,
    max_hvp: int | None = None,
    seed: int = 0,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    train_mode: bool = False,
    backend: Backend | None = None,
    operator: HessianOperator | None = None,
    exact_residuals: bool = False,
) -> EigenResult:
    """Extreme eigenvalues of the data-set Hessian ``H = d^2 L / d theta^2`` of ``model``.

    ``L`` is the sample-weighted mean of ``loss_fn`` over all batches of ``data`` (see
    :class:`~landscape.HessianOperator`); the model is evaluated at its current weights in eval
    mode (``train_mode=False``) and left unchanged.

    Args:
        model, loss_fn, data: the model, ``loss_fn(outputs, targets)`` returning the batch mean,
            and one ``(inputs, targets)`` batch or an iterable of batches (not shuffling); or a
            prebuilt :class:`~landscape.HessianOperator` ``H`` alone: ``hessian_eigenvalues(H,
            k=3)`` (the other arguments then by keyword).
        k: eigenpairs wanted. Default 1.
        which: ``"largest"`` (descending), ``"smallest"`` (ascending, negative curvature first)
            or ``"both"`` (Lanczos only). Default ``"largest"``.
        tol: Lanczos: relative residual ``||Hv - lambda v|| <= tol |lambda|`` (eigenvalue error
            <= tol relative, typically ~tol^2); power: relative change between iterations.
            Default 1e-3.
        method: ``"lanczos"`` (default, :func:`lanczos`) or ``"power"`` (:func:`power_iteration`,
            100 iterations at most per pair).
        v0: ``[P]`` warm-start vector (e.g. ``previous.vectors[:, 0]``).
        max_hvp: budget of HVPs (default: Lanczos ``min(P, 300)``, power ``100 k``).
        seed: seeds the start vector.
        params, dtype, train_mode, backend: how to build the :class:`~landscape.HessianOperator`
            (parameter subset, computing dtype, BN/dropout mode, HVP backend).
        operator: the older spelling of a prebuilt operator (``hessian_eigenvalues(None, None,
            None, operator=H)``); kept working.
        exact_residuals: Lanczos: recompute residuals with ``n`` extra HVPs (default: from the
            recurrence, equal to rounding).

    Returns:
        :class:`EigenResult` (values, vectors ``[P, n]``, residuals, n_hvp, converged).
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method: must be 'lanczos' or 'power' (got {method!r})")
    if method == "power" and which != "largest":
        raise ValueError(f"which={which!r}: power iteration finds only the largest pairs; use method='lanczos'")
    hessian = as_hessian(
        model, loss_fn, data, operator=operator, params=params, dtype=dtype, train_mode=train_mode, backend=backend
    )
    if method == "power":
        return power_iteration(hessian, k, tol, v0=v0, max_products=max_hvp, seed=seed)
    return lanczos(hessian, k, which, tol, v0=v0, max_products=max_hvp, seed=seed, exact_residuals=exact_residuals)
