"""Spectral density of the Hessian (or of any symmetric operator) by stochastic Lanczos quadrature.

The spectral density of a symmetric ``[P, P]`` matrix ``H`` with eigenvalues ``lambda_i`` is
``phi(t) = (1/P) sum_i delta(t - lambda_i)``, broadened here by a Gaussian of width ``sigma``:
``phi_sigma(t) = (1/P) sum_i N(t; lambda_i, sigma^2)``. For a unit vector ``v = z / sqrt(P)``
with Rademacher ``z``, ``E[v^T f(H) v] = (1/P) tr f(H) = int f(t) phi(t) dt``, and ``m`` Lanczos
steps from ``v`` give the Gauss quadrature of that integral: nodes ``theta_j`` (eigenvalues of
the tridiagonal ``T_m``, from the symmetric ``eigh``) and weights ``tau_j = s_{0j}^2`` (squared
first components of its eigenvectors; they sum to 1). Averaging over runs (independent ``v``):

    phi_sigma(t) ~ (1/runs) sum_r sum_j tau_rj N(t; theta_rj, sigma^2).

The density integrates to 1 and its mean ``sum tau theta`` averaged over runs is exactly the
Hutchinson estimate of ``tr(H) / P`` (the result's ``trace_estimate / P``). All runs go in
lockstep through block products (one vmapped HVP per step for a Hessian).

References: L. Lin, Y. Saad and C. Yang (2016), "Approximating spectral densities of large
matrices", SIAM Review 58; B. Ghorbani, S. Krishnan and Y. Xiao (2019), "An investigation into
neural net optimization via Hessian eigenvalue density", ICML; G. H. Golub and G. Meurant,
*Matrices, Moments and Quadrature with Applications* (2010).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ._functional import LossFn, ParamSelector
from ._lanczos import Lanczos, OperatorLike, prepare, random_block, ritz
from .hvp import Backend, HessianOperator, as_hessian

DEFAULT_RELATIVE_SIGMA = 0.01
MAX_BASIS_NUMBERS = 2**28  # default cap on the Lanczos bases held at once (1 GiB in float32)
GRID_MARGIN_SIGMAS = 5.0


@dataclass
class SpectrumResult:
    """A broadened spectral density from stochastic Lanczos quadrature.

    Attributes:
        grid: ``[G]`` eigenvalue axis (same units as the eigenvalues), from the smallest Ritz
            value minus 5 sigma to the largest plus 5 sigma.
        density: ``[G]`` the broadened density on ``grid`` (per eigenvalue unit; integrates to 1).
        ritz_values: ``[runs, m]`` quadrature nodes per run, ascending (NaN-padded where a run
            ended early on an invariant subspace).
        weights: ``[runs, m]`` quadrature weights per run (each row sums to 1; 0-padded).
        trace_estimate: ``P * mean_r sum_j weights_rj ritz_values_rj`` (Hutchinson estimate of
            ``tr(H)`` from the runs' start vectors).
        n_hvp: operator products (HVPs) this call made.
        sigma: the Gaussian broadening width used (eigenvalue units).
        num_params: P.
    """

    grid: np.ndarray
    density: np.ndarray
    ritz_values: np.ndarray
    weights: np.ndarray
    trace_estimate: float
    n_hvp: int
    sigma: float
    num_params: int

    def __repr__(self) -> str:
        return (
            f"SpectrumResult(range=[{np.nanmin(self.ritz_values):.4g}, {np.nanmax(self.ritz_values):.4g}], "
            f"runs={self.weights.shape[0]}, steps={self.weights.shape[1]}, sigma={self.sigma:.3g}, "
            f"trace_estimate={self.trace_estimate:.6g}, n_hvp={self.n_hvp})"
        )


def broadened_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """``(1/runs) sum_rj weights_rj N(grid; nodes_rj, sigma^2)``; NaN nodes (padding) ignored."""
    used = ~np.isnan(nodes)
    centers, masses = nodes[used], weights[used] / nodes.shape[0]
    z = (grid[:, None] - centers[None, :]) / sigma
    return (np.exp(-0.5 * z**2) @ masses) / (sigma * np.sqrt(2 * np.pi))


def spectral_density(
    operator: OperatorLike,
    *,
    num_runs: int = 10,
    num_steps: int = 90,
    sigma: float | None = None,
    relative_sigma: float = DEFAULT_RELATIVE_SIGMA,
    grid_size: int = 1000,
    parallel_runs: int | None = None,
    seed: int = 0,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SpectrumResult:
    """Spectral density of any symmetric operator by stochastic Lanczos quadrature.

    Args:
        operator: a :class:`~landscape.HessianOperator`, a dense ``[P, P]`` tensor/ndarray, a
            scipy ``LinearOperator`` or a callable on ``[P, K]`` blocks (then ``dim``).
        num_runs: independent Rademacher start vectors. Default 10.
        num_steps: Lanczos steps per run (capped at P). Default 90. Cost: ``num_runs *
            num_steps`` products.
        sigma: Gaussian broadening width in eigenvalue units. Default ``relative_sigma`` times
            the range of the Ritz values (largest minus smallest).
        relative_sigma: see ``sigma``. Default 0.01.
        grid_size: points of :attr:`SpectrumResult.grid`. Default 1000.
        parallel_runs: runs pushed through one block product; memory is ``parallel_runs *
            num_steps * P`` numbers. Default: all runs, or as many as keep that under 2^28
            numbers (1 GiB in float32). The result does not depend on it.
        seed: seeds the start vectors.
    """
    op, generator = prepare(operator, seed, dim=dim, dtype=dtype, device=device)
    for name, value in (("num_runs", num_runs), ("num_steps", num_steps), ("grid_size", grid_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer (got {value!r})")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma: must be > 0 (got {sigma!r})")
    if not relative_sigma > 0:
        raise ValueError(f"relative_sigma: must be > 0 (got {relative_sigma!r})")
    steps = min(num_steps, op.dim)
    chunk = parallel_runs or max(1, min(num_runs, MAX_BASIS_NUMBERS // (steps * op.dim)))
    nodes = np.full((num_runs, steps), np.nan)
    weights = np.zeros((num_runs, steps))
    starts = random_block(op.dim, num_runs, generator, rademacher=True, like=op)  # same for any chunking
    for first in range(0, num_runs, chunk):
        count = min(chunk, num_runs - first)
        run = Lanczos(op, starts[:, first : first + count], steps)
        for _ in run:
            pass
        for r in range(count):
            length = int(run.lengths[r])
            theta, vectors = ritz(run.alpha[r, :length], run.beta[r, :length])
            nodes[first + r, :length] = theta
            weights[first + r, :length] = vectors[0] ** 2
    low, high = float(np.nanmin(nodes)), float(np.nanmax(nodes))
    if sigma is None:
        span = high - low if high > low else max(abs(high), 1.0)
        sigma = relative_sigma * span
    margin = GRID_MARGIN_SIGMAS * sigma
    grid = np.linspace(low - margin, high + margin, grid_size)
    trace = op.dim * float(np.nansum(nodes * weights, axis=1).mean())
    return SpectrumResult(
        grid=grid,
        density=broadened_density(nodes, weights, grid, sigma),
        ritz_values=nodes,
        weights=weights,
        trace_estimate=trace,
        n_hvp=op.n_products,
        sigma=float(sigma),
        num_params=op.dim,
    )


def hessian_spectrum(
    model: nn.Module | HessianOperator | None,
    loss_fn: LossFn | None = None,
    data: Any = None,
    *,
    num_runs: int = 10,
    num_steps: int = 90,
    sigma: float | None = None,
    relative_sigma: float = DEFAULT_RELATIVE_SIGMA,
    grid_size: int = 1000,
    parallel_runs: int | None = None,
    seed: int = 0,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    train_mode: bool = False,
    backend: Backend | None = None,
    operator: HessianOperator | None = None,
) -> SpectrumResult:
    """Eigenvalue density of the data-set Hessian of ``model`` by stochastic Lanczos quadrature.

    ``H`` is the Hessian of the sample-weighted mean loss over all batches of ``data`` at the
    current weights, in eval mode unless ``train_mode``; the model is left unchanged. Defaults:
    10 runs x 90 Lanczos steps (900 HVPs; fewer when P < 90), Gaussian broadening of 1% of the
    spectrum's range, 1000 grid points. See :func:`spectral_density` for every argument;
    ``params, dtype, train_mode, backend`` build the HessianOperator, or pass a prebuilt one as
    first argument: ``hessian_spectrum(H, num_runs=5)`` (``operator=H`` also works).

    Returns:
        :class:`SpectrumResult` (grid, density, ritz_values, weights, trace_estimate, n_hvp).
    """
    hessian = as_hessian(
        model, loss_fn, data, operator=operator, params=params, dtype=dtype, train_mode=train_mode, backend=backend
    )
    return spectral_density(
        hessian,
        num_runs=num_runs,
        num_steps=num_steps,
        sigma=sigma,
        relative_sigma=relative_sigma,
        grid_size=grid_size,
        parallel_runs=parallel_runs,
        seed=seed,
    )
