"""The data-set Hessian of a model's loss as a linear operator.

``H = d^2 L / d theta^2`` with ``L(theta) = sum_b n_b L_b(theta) / N`` (sample-weighted mean
over all batches, see :mod:`landscape._functional`). ``H`` is never formed: products ``H v``
are computed batch by batch with automatic differentiation and summed with weights ``n_b/N``.

Two HVP backends:

* ``"double_backward"`` (default): reverse-over-reverse, ``grad(<grad L, v>)``. One graph of
  the gradient is built per batch and then differentiated once per vector; a block of ``K``
  vectors is pushed through that graph in one vmapped backward (``is_grads_batched``) on a
  GPU, one vector at a time on a CPU (faster there, see ``vmap_blocks``). For
  in-memory data whose graphs fit ``graph_memory`` the graphs are built once and kept, so
  every later product costs only the second backward pass (about 1.4x faster per product on
  the benchmark MLP; PyHessian does the same for a single batch).
* ``"forward_over_reverse"``: ``jvp`` of ``torch.func.grad``, vmapped over the vectors.

On CPU double backward was measured faster (``benchmarks/bench_curvature.py`` prints the cost
of each as a multiple of one gradient); both agree to rounding.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import grad as func_grad
from torch.func import jvp, vmap

from ._functional import LossFn, ModelLoss, ParamSelector, model_device

Backend = Literal["double_backward", "forward_over_reverse"]


class CurvatureOperator(ModelLoss):
    """A symmetric ``[P, P]`` curvature matrix of the data-set loss, seen through products.

    The common interface of :class:`HessianOperator` and the Gauss-Newton / Fisher operators
    of :mod:`landscape.ggn`: every curvature function (``hessian_eigenvalues``,
    ``hessian_trace``, ``hessian_spectrum``, ``lanczos``, ``estimate_trace``, ...) accepts any
    of them. A subclass defines ``_block(rows)``, the ``[K, P] -> [K, P]`` product of ``K`` row
    vectors over the whole data set; this class adds block splitting, product counting and
    scipy / dense views. Takes every argument of :class:`~landscape._functional.ModelLoss`
    plus ``block_size`` (the most vectors per block product, default 16) and ``vmap_blocks``
    (push a block through one vmapped product; ``False``: one vector at a time).

    Vectors are flat ``[P]`` tensors (or ``[P, K]`` blocks of ``K`` columns) in the order of
    :attr:`names`, on :attr:`device` in :attr:`dtype`. ``op @ v`` is ``op.matvec(v)`` /
    ``op.matmat(V)``. :attr:`n_hvp` counts single-vector products over the whole data set.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        *,
        params: ParamSelector = None,
        dtype: torch.dtype | None = None,
        train_mode: bool = False,
        check_deterministic: bool = True,
        block_size: int = 16,
        vmap_blocks: bool = True,
    ):
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1 (got {block_size})")
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            dtype=dtype,
            train_mode=train_mode,
            check_deterministic=check_deterministic,
        )
        self.block_size, self.vmap_blocks = block_size, bool(vmap_blocks)
        self.n_hvp = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    # --- products ----------------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a flat ``[P]`` vector."""
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for a ``[P, K]`` block of column vectors."""
        if V.ndim != 2 or V.shape[0] != self.num_params:
            raise ValueError(f"expected a [{self.num_params}, K] block, got shape {tuple(V.shape)}")
        V = V.to(self.device, self.dtype)
        step = self.block_size if self.vmap_blocks else 1
        cols = [self._block(V[:, i : i + step].T) for i in range(0, V.shape[1], step)]
        self.n_hvp += V.shape[1]
        return torch.cat(cols, dim=0).T

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v) if v.ndim == 1 else self.matmat(v)

    def _block(self, rows: Tensor) -> Tensor:
        """``[K, P] -> [K, P]``: the data-set products of K row vectors."""
        raise NotImplementedError

    # --- interop -----------------------------------------------------------------------------
    def to_scipy(self) -> LinearOperator:
        """This operator as a float64 ``scipy.sparse.linalg.LinearOperator`` (numpy in and out)."""

        def mm(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x)
            one = x.ndim == 1
            X = torch.as_tensor(x.reshape(self.num_params, -1), device=self.device).to(self.dtype)
            out = self.matmat(X).to("cpu", torch.float64).numpy()
            return out.reshape(-1) if one else out

        return LinearOperator(self.shape, matvec=mm, matmat=mm, rmatvec=mm, rmatmat=mm, dtype=np.float64)

    def dense(self) -> Tensor:
        """The full ``[P, P]`` matrix, column by column (small models only: P products)."""
        eye = torch.eye(self.num_params, device=self.device, dtype=self.dtype)
        A = self.matmat(eye)
        return (A + A.T) / 2


class HessianOperator(CurvatureOperator):
    """``v -> H v`` for the data-set loss of ``model`` at its current weights.

    Takes every argument of :class:`~landscape._functional.ModelLoss` plus:

    Args:
        backend: ``"double_backward"`` (default) or ``"forward_over_reverse"``.
        block_size: the most vectors pushed through one vmapped product (memory grows
            linearly with it); larger blocks are split. Default 16.
        vmap_blocks: push a block of vectors through one vmapped product (``True``) or one
            vector at a time (``False``). ``None`` (default): vmapped except for double backward
            on a CPU, where one-at-a-time products through the kept graph were 1.6-2.4x faster
            for MLPs of width 128-512 on 4,000 samples (about equal for width 128 on 1,000
            samples, slower only for width 32; see ``benchmarks/bench_curvature.py``).
        cache_graph: keep the per-batch gradient graphs between products (double backward
            only). ``None`` (default): when the data is in memory and the graphs' estimated
            size (saved tensors of the first batch's forward and backward, scaled to all
            batches) is at most ``graph_memory``; ``True`` / ``False`` force it.
        graph_memory: bytes the cached graphs may take (default 1 GiB).

    Vectors are flat ``[P]`` tensors (or ``[P, K]`` blocks of ``K`` columns) in the order of
    :attr:`names`, on :attr:`device` in :attr:`dtype`. ``op @ v`` is ``op.matvec(v)`` /
    ``op.matmat(V)``. :attr:`n_hvp` counts single-vector products over the whole data set.

    Example:
        >>> H = HessianOperator(model, nn.CrossEntropyLoss(), loader, dtype=torch.float64)
        >>> Hv = H @ torch.randn(H.num_params, dtype=torch.float64)
        >>> scipy.sparse.linalg.eigsh(H.to_scipy(), k=1)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        *,
        params: ParamSelector = None,
        dtype: torch.dtype | None = None,
        train_mode: bool = False,
        check_deterministic: bool = True,
        backend: Backend = "double_backward",
        block_size: int = 16,
        vmap_blocks: bool | None = None,
        cache_graph: bool | None = None,
        graph_memory: int = 2**30,
    ):
        if backend not in ("double_backward", "forward_over_reverse"):
            raise ValueError(f"backend: must be 'double_backward' or 'forward_over_reverse' (got {backend!r})")
        if vmap_blocks is None:
            vmap_blocks = backend == "forward_over_reverse" or model_device(model).type != "cpu"
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            dtype=dtype,
            train_mode=train_mode,
            check_deterministic=check_deterministic,
            block_size=block_size,
            vmap_blocks=vmap_blocks,
        )
        self.backend = backend
        self._cache_graph, self._graph_memory = cache_graph, graph_memory
        self._graphs: list[tuple[int, list[Tensor], tuple[Tensor, ...]]] | None = None

    def _block(self, rows: Tensor) -> Tensor:
        """``[K, P] -> [K, P]``: the data-set HVP of K row vectors."""
        if self.backend == "forward_over_reverse":
            vdict = self.unflatten(rows)
            return self.weighted_sum(lambda x, y: self._for_batch(vdict, x, y))
        vs = list(self.unflatten(rows).values())
        graphs = self._cached_graphs()
        if graphs is None:
            return self.weighted_sum(lambda x, y: self._second_backward(*self._graph(x, y), vs, keep=False))
        total = cast(Tensor, sum(n * self._second_backward(leaves, g, vs, keep=True) for n, leaves, g in graphs))
        return total / sum(n for n, _, _ in graphs)

    def _graph(self, inputs: Any, targets: Tensor) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        """Fresh leaves for the variables and the gradient of one batch's loss, with its graph."""
        leaves = [t.detach().requires_grad_(True) for t in self.theta.values()]
        with torch.enable_grad():
            loss = self.batch_loss(dict(zip(self.names, leaves)), inputs, targets)
            return leaves, torch.autograd.grad(loss, leaves, create_graph=True)

    def _second_backward(self, leaves: list[Tensor], g: tuple[Tensor, ...], vs: list[Tensor], keep: bool) -> Tensor:
        """``[K, P]``: the products of one batch's Hessian with K vectors (``vs`` per parameter,
        ``[K, *shape]``) by differentiating its gradient graph; ``keep`` retains the graph."""
        with torch.enable_grad():
            if vs[0].shape[0] == 1:
                hv = torch.autograd.grad(g, leaves, [v[0] for v in vs], retain_graph=keep)
                return self.flatten(hv).unsqueeze(0).detach()
            hv = torch.autograd.grad(g, leaves, vs, retain_graph=keep, is_grads_batched=True)
        return self.flatten(hv).detach()

    def _cached_graphs(self) -> list[tuple[int, list[Tensor], tuple[Tensor, ...]]] | None:
        """The per-batch gradient graphs, built on first use when caching applies (else None).

        The size estimate is the bytes of the tensors the first batch's graph saves for backward,
        scaled by the number of samples; that first graph is kept if caching goes ahead.
        """
        if self._graphs is not None or self._cache_graph is False or not self.batches.in_memory:
            return self._graphs
        saved: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            saved[id(t)] = t.numel() * t.element_size()
            return t

        batches = list(self.batches)
        with self.mode():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                first = self._graph(*batches[0])
            n_first, n_total = len(batches[0][1]), sum(len(y) for _, y in batches)
            if self._cache_graph or sum(saved.values()) * n_total / n_first <= self._graph_memory:
                rest = [(len(y), *self._graph(x, y)) for x, y in batches[1:]]
                self._graphs = [(n_first, *first), *rest]
            else:
                self._cache_graph = False  # estimated once
        return self._graphs

    def _for_batch(self, vs: dict[str, Tensor], inputs: Any, targets: Tensor) -> Tensor:
        def grad_fn(p: dict[str, Tensor]) -> dict[str, Tensor]:
            return func_grad(lambda q: self.batch_loss(q, inputs, targets))(p)

        def one(v: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(grad_fn, (self.theta,), (v,))[1]

        return self.flatten(vmap(one)(vs)).detach()

    # --- gradient ----------------------------------------------------------------------------
    def gradient(self) -> Tensor:
        """Flat ``[P]`` gradient of the data-set loss at the snapshot weights."""
        return self.weighted_sum(lambda x, y: self.flatten(self._graph(x, y)[1]).detach())


def as_hessian(
    model: nn.Module | CurvatureOperator | None,
    loss_fn: LossFn | None = None,
    data: Any = None,
    *,
    operator: CurvatureOperator | None = None,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    train_mode: bool = False,
    backend: Backend | None = None,
) -> CurvatureOperator:
    """The Hessian a curvature function works on: the operator given as first argument or as
    ``operator=``, else a new :class:`HessianOperator` of ``model`` on ``data``.

    A given operator may be any :class:`CurvatureOperator` (a Gauss-Newton or Fisher operator
    of :mod:`landscape.ggn` as well as a Hessian): ``hessian_eigenvalues(GGNOperator(...))``
    gives the eigenvalues of the GGN.

    Every curvature function (``hessian_eigenvalues(H, k=3)``, ``hessian_trace(H)``, ...)
    takes either form; with an operator the construction arguments (``params``, ``dtype``,
    ``train_mode``, ``backend``) must stay at their defaults, since the operator fixed them.
    """
    if isinstance(model, CurvatureOperator):
        if operator is not None and operator is not model:
            raise ValueError("operator: two different operators given (first argument and operator=)")
        if loss_fn is not None or data is not None:
            raise TypeError(
                "with a HessianOperator as first argument pass the other arguments by keyword "
                "(e.g. hessian_eigenvalues(H, k=3)); loss_fn and data are fixed by the operator"
            )
        operator = model
    if operator is not None:
        if not isinstance(operator, CurvatureOperator):
            raise TypeError(
                f"operator: expected a landscape.HessianOperator (or another CurvatureOperator), got {type(operator).__name__}"
            )
        chosen = {"params": params, "dtype": dtype, "train_mode": train_mode or None, "backend": backend}
        clash = [name for name, value in chosen.items() if value is not None]
        if clash:
            raise ValueError(
                f"{', '.join(clash)}: already fixed by the HessianOperator; set them when building it, "
                "or pass model, loss_fn, data to build one here"
            )
        return operator
    if model is None or loss_fn is None or data is None:
        missing = [n for n, v in (("model", model), ("loss_fn", loss_fn), ("data", data)) if v is None]
        raise ValueError(
            f"{', '.join(missing)}: required unless a HessianOperator is given (first argument or operator=)"
        )
    assert not isinstance(model, CurvatureOperator)
    return HessianOperator(
        model,
        loss_fn,
        data,
        params=params,
        dtype=dtype,
        train_mode=train_mode,
        backend=backend or "double_backward",
    )
