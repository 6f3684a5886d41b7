"""Lanczos tridiagonalization with full reorthogonalization, on any symmetric operator.

Shared core of :mod:`landscape.eigen` (extreme eigenpairs) and :mod:`landscape.spectrum`
(stochastic Lanczos quadrature); :func:`prepare` also sets up :mod:`landscape.trace`. ``R``
independent recurrences run in lockstep so that their ``R`` operator products go through one
block product (one vmapped HVP for a Hessian).

After ``m`` steps from a unit start vector ``q_0`` the recurrence has built an orthonormal
basis ``Q_m = [q_0 .. q_{m-1}]`` of the Krylov space ``span{q_0, A q_0, ..., A^{m-1} q_0}`` and
the symmetric tridiagonal ``T_m = Q_m^T A Q_m`` (diagonal ``alpha``, off-diagonal ``beta``) with

    A Q_m = Q_m T_m + beta_{m-1} q_m e_m^T.

So a Ritz pair ``(theta, y = Q_m s)`` of ``T_m s = theta s`` has residual
``||A y - theta y|| = |beta_{m-1}| |s_{m-1}|``: convergence is read off ``T_m`` without any
extra product. Every new vector is orthogonalized against the whole basis twice (classical
Gram-Schmidt, "twice is enough"), which keeps that identity true to rounding.

Reference: C. Lanczos (1950), J. Res. Nat. Bur. Standards 45; G. H. Golub and C. F. Van Loan,
*Matrix Computations*, 4th ed., section 10.1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from .hvp import CurvatureOperator, HessianOperator

OperatorLike = HessianOperator | CurvatureOperator | Tensor | np.ndarray | LinearOperator | Callable[[Tensor], Tensor]


@dataclass
class SymmetricOperator:
    """A symmetric ``[P, P]`` operator seen through block products, counting them.

    Attributes:
        matmat_fn: ``[P, K] -> [P, K]`` on :attr:`device` in :attr:`dtype`.
        dim: P.
        n_products: single-vector products done so far (``K`` per block of ``K``).
    """

    matmat_fn: Callable[[Tensor], Tensor]
    dim: int
    dtype: torch.dtype
    device: torch.device
    n_products: int = 0

    def matmat(self, block: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``[P, K]``."""
        out = self.matmat_fn(block.to(self.device, self.dtype))
        self.n_products += block.shape[1]
        return out.to(self.device, self.dtype)


def as_operator(
    operator: OperatorLike,
    *,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SymmetricOperator:
    """Wrap a :class:`~landscape.HessianOperator`, a dense symmetric matrix (tensor or numpy),
    a scipy ``LinearOperator`` or a callable on ``[P, K]`` blocks (then ``dim`` is required).

    ``dtype``/``device`` default to the operator's own (float64 on CPU for numpy, scipy and
    callables).
    """
    if isinstance(operator, SymmetricOperator):
        return operator
    if isinstance(operator, CurvatureOperator):
        return SymmetricOperator(operator.matmat, operator.num_params, operator.dtype, operator.device)
    if isinstance(operator, np.ndarray):
        operator = torch.from_numpy(operator)
    if isinstance(operator, Tensor):
        if operator.ndim != 2 or operator.shape[0] != operator.shape[1]:
            raise ValueError(f"operator: a dense matrix must be square [P, P], got {tuple(operator.shape)}")
        dtype = dtype or (operator.dtype if operator.is_floating_point() else torch.float64)
        matrix = operator.to(device or operator.device, dtype)
        return SymmetricOperator(lambda v: matrix @ v, matrix.shape[0], dtype, matrix.device)
    if isinstance(operator, LinearOperator):
        if operator.shape[0] != operator.shape[1]:
            raise ValueError(f"operator: must be square, got shape {operator.shape}")
        dtype = dtype or torch.float64
        scipy_op = operator

        def scipy_matmat(v: Tensor) -> Tensor:
            out = np.asarray(scipy_op.matmat(v.detach().cpu().double().numpy()))
            return torch.from_numpy(out).reshape(v.shape)

        return SymmetricOperator(scipy_matmat, operator.shape[0], dtype, torch.device(device or "cpu"))
    if callable(operator):
        if dim is None:
            raise ValueError("dim: a callable operator needs dim=P, the length of the vectors it acts on")
        return SymmetricOperator(operator, int(dim), dtype or torch.float64, torch.device(device or "cpu"))
    raise TypeError(
        "operator: expected a HessianOperator, a square tensor/ndarray, a scipy LinearOperator or a "
        f"callable on [P, K] blocks, got {type(operator).__name__}"
    )


def prepare(
    operator: OperatorLike,
    seed: int,
    *,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[SymmetricOperator, torch.Generator]:
    """The operator (see :func:`as_operator`) with its product count at 0, and the generator
    seeded by ``seed`` for every random vector of one call.

    The generator is a CPU one, so that a seed gives the same numbers on every device.
    """
    op = as_operator(operator, dim=dim, dtype=dtype, device=device)
    op.n_products = 0
    return op, torch.Generator().manual_seed(seed)


def random_block(
    dim: int, count: int, generator: torch.Generator, *, rademacher: bool, like: SymmetricOperator
) -> Tensor:
    """``[dim, count]`` random columns (Rademacher +-1 or standard normal), drawn on the CPU
    from ``generator`` so a seed gives the same numbers on every device."""
    if rademacher:
        block = torch.randint(0, 2, (dim, count), generator=generator, dtype=torch.float64) * 2 - 1
    else:
        block = torch.randn(dim, count, generator=generator, dtype=torch.float64)
    return block.to(like.device, like.dtype)


def ritz(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the symmetric tridiagonal with diagonal ``alpha`` [m] and
    off-diagonal ``beta[:m-1]``: Ritz values (ascending) and vectors ``[m, m]`` (columns)."""
    m = len(alpha)
    return eigh_tridiagonal(np.asarray(alpha, dtype=np.float64), np.asarray(beta[: m - 1], dtype=np.float64))


class Lanczos:
    """``R`` Lanczos recurrences in lockstep, one step per iteration (``for m in run: ...``).

    Args:
        operator: the symmetric operator (see :func:`as_operator`).
        start: ``[P, R]`` start vectors (any norm; normalized here).
        max_steps: the most steps per recurrence (at most P).
        restart_on_breakdown: when a recurrence finds an invariant subspace (``beta ~ 0``),
            continue with a random vector orthogonal to its basis (``beta = 0`` is recorded, so
            ``T`` is block diagonal and Ritz values stay exact); otherwise stop that recurrence.
            Restarting is what lets one recurrence find repeated eigenvalues.
        generator: random numbers for restarts.

    Iterating yields the number of steps done so far; stop whenever you like. Recurrence ``r``
    has done ``lengths[r]`` steps: ``alpha[r, :lengths[r]]``, ``beta[r, :lengths[r]]``
    (``beta[r, j]`` couples ``q_j`` and ``q_{j+1}``; the last one is the residual norm) and
    basis rows ``basis[r, :lengths[r]]`` (``[P]`` each). ``just_broke[r]``: the last step ended
    an invariant subspace; ``restarts[r]``: how many times that happened and a recurrence went on.
    """

    def __init__(
        self,
        operator: SymmetricOperator,
        start: Tensor,
        max_steps: int,
        *,
        restart_on_breakdown: bool = False,
        generator: torch.Generator | None = None,
    ):
        self.op = operator
        dim, runs = start.shape
        if dim != operator.dim:
            raise ValueError(f"v0: expected length {operator.dim}, got {dim}")
        self.max_steps = min(int(max_steps), dim)
        self.restart = restart_on_breakdown
        self.generator = generator or torch.Generator().manual_seed(0)
        self.alpha = np.zeros((runs, self.max_steps))
        self.beta = np.zeros((runs, self.max_steps))
        self.lengths = np.zeros(runs, dtype=int)
        self.active = np.ones(runs, dtype=bool)
        self.restarts = np.zeros(runs, dtype=int)
        self.just_broke = np.zeros(runs, dtype=bool)
        start = start.to(operator.device, operator.dtype).T
        norms = start.norm(dim=1, keepdim=True)
        if not bool((norms > 0).all()):
            raise ValueError("v0: the start vector is zero")
        self._next = start / norms
        self._basis = torch.zeros(runs, min(self.max_steps, 32), dim, device=operator.device, dtype=operator.dtype)
        self._eps = torch.finfo(operator.dtype).eps

    @property
    def basis(self) -> Tensor:
        """``[R, steps, P]`` orthonormal rows (zero rows after a recurrence stopped)."""
        return self._basis[:, : int(self.lengths.max())]

    def __iter__(self) -> Iterator[int]:
        for j in range(self.max_steps):
            if not self.active.any():
                return
            self._step(j)
            yield j + 1

    def _step(self, j: int) -> None:
        if j == self._basis.shape[1]:  # grow the basis storage geometrically
            grown = torch.zeros_like(self._basis[:, :1]).expand(-1, j, -1).clone()
            self._basis = torch.cat([self._basis, grown], dim=1)
        q = self._next
        self._basis[:, j] = q
        if self.active.all():
            w = self.op.matmat(q.T).T
        else:
            act = torch.as_tensor(self.active, device=self.op.device)
            w = torch.zeros_like(q)
            w[act] = self.op.matmat(q[act].T).T
        a = (q * w).sum(dim=1)
        basis = self._basis[:, : j + 1]
        for _ in range(2):  # w -= Q (Q^T w), per run, as batched matrix-vector products
            w = w - torch.bmm(torch.bmm(basis, w.unsqueeze(2)).transpose(1, 2), basis).squeeze(1)
        b = w.norm(dim=1)
        a_np, b_np = a.double().cpu().numpy(), b.double().cpu().numpy()
        self.alpha[self.active, j] = a_np[self.active]
        self.beta[self.active, j] = b_np[self.active]
        self.lengths[self.active] += 1
        scale = max(np.abs(self.alpha[:, : j + 1]).max(), self.beta[:, : j + 1].max())
        broke = self.active & (b_np <= 100 * self._eps * scale)
        self.just_broke = broke
        self._next = w / torch.where(b > 0, b, torch.ones_like(b))[:, None]
        for r in np.flatnonzero(broke):
            self.beta[r, j] = 0.0
            if self.restart and j + 1 < self.max_steps:
                self._next[r] = self._fresh_direction(self._basis[r, : j + 1])
                self.restarts[r] += 1
            else:
                self.active[r] = False
                self._next[r] = 0.0

    def _fresh_direction(self, basis: Tensor) -> Tensor:
        v = random_block(self.op.dim, 1, self.generator, rademacher=False, like=self.op)[:, 0]
        for _ in range(2):
            v = v - basis.T @ (basis @ v)
        return v / v.norm()

    def ritz(self, run: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), vectors ``[m, m]`` in the Krylov basis, and the residual
        norms ``||A y_i - theta_i y_i||`` read off the tridiagonal, for recurrence ``run``."""
        m = int(self.lengths[run])
        theta, s = ritz(self.alpha[run, :m], self.beta[run, :m])
        return theta, s, np.abs(self.beta[run, m - 1] * s[m - 1, :])
