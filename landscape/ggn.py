"""Gauss-Newton and Fisher curvature of the data-set loss, as linear operators.

Write the network's outputs on a sample as ``f_i(theta)`` (``[C]`` for ``C`` classes), its Jacobian
``J_i = d f_i / d theta`` (``[C, P]``) and the loss of a batch as a function of its outputs. Two
positive semi-definite approximations of the Hessian, both with the data weighting of
:class:`~landscape.HessianOperator` (sample-weighted mean over all batches, eval mode by default,
the model never modified):

* :class:`GGNOperator`, the generalized Gauss-Newton matrix (Schraudolph 2002; Martens 2020,
  "New insights and perspectives on the natural gradient method", JMLR 21, section 8)
  ``G = (1/N) sum_i J_i^T H_i J_i``, ``H_i = d^2 l_i / d f_i^2`` the Hessian of the per-sample
  loss in the outputs. It is the Hessian less the term ``sum_c (d l / d f_c) d^2 f_c / d theta^2``,
  so it equals the Hessian for a network linear in its parameters (softmax regression). For
  cross-entropy on logits ``H_i = diag(p_i) - p_i p_i^T``, and ``G`` equals the true Fisher
  information ``E_{y ~ p(.|x)}[g g^T]`` of the model's predictive distribution (Martens 2020,
  section 9.2): the true Fisher of a softmax classifier is this operator.
* :class:`EmpiricalFisherOperator`, ``F = (1/N) sum_i g_i g_i^T`` with ``g_i = d l_i / d theta``
  the per-sample gradient at the *data* labels (Kunstner et al. 2019 on how it differs from the
  Fisher). ``theta^T F theta`` is the empirical Fisher-Rao norm
  (:func:`landscape.generalization.fisher_rao_norm`).

A product ``A v`` is ``J^T (M (J v))`` batch by batch: ``J v`` and ``J^T u`` by reverse mode
(:class:`Linearization`), ``M`` the output-space matrix (``H_i`` by a reverse-over-reverse
product of the loss in the outputs; ``r_i r_i^T`` for the empirical Fisher, ``r_i = d l_i /
d f_i``); a block of vectors goes through one batched backward on a GPU, one vector at a time
on a CPU (as for the Hessian). ``loss_fn(outputs, targets)`` must be the
batch mean of per-sample losses (every ``torch.nn`` loss with its default reduction), so that
``n * d loss_fn / d f_i`` is the per-sample output gradient. Operators are
:class:`~landscape.hvp.CurvatureOperator` s: pass them to ``hessian_eigenvalues``,
``hessian_trace``, ``hessian_spectrum``, ``lanczos``, ``estimate_trace`` or ``.to_scipy()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._functional import LossFn, ParamSelector, model_device
from .eigen import EigenResult, lanczos
from .hvp import CurvatureOperator
from .trace import TraceMethod, TraceResult, estimate_trace


def _batched_grad(outputs: Tensor, inputs: list[Tensor], cotangents: Tensor) -> list[Tensor]:
    """``[K, *input.shape]`` for each input: the vector-Jacobian products of ``outputs`` with the
    ``K`` cotangents ``[K, *outputs.shape]`` (graphs kept). One vector at a time for ``K = 1``,
    else one batched backward (``is_grads_batched``)."""
    grads: Sequence[Tensor | None]
    if cotangents.shape[0] == 1:
        grads = torch.autograd.grad(outputs, inputs, cotangents[0], retain_graph=True, allow_unused=True)
        grads = [g.unsqueeze(0) if g is not None else None for g in grads]
    else:
        grads = torch.autograd.grad(
            outputs, inputs, cotangents, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    lead = cotangents.shape[0]
    return [
        torch.zeros(lead, *t.shape, dtype=t.dtype, device=t.device) if g is None else g for g, t in zip(grads, inputs)
    ]


class Linearization:
    """The network's outputs on one batch and products with their Jacobian ``J`` at the
    snapshot weights of a :class:`~landscape.ModelLoss`, by reverse mode only.

    ``J^T u`` is one backward pass; ``J v`` is the gradient in ``u`` of ``<J^T u, v>`` (linear in
    ``u``, so taken at ``u = 0``): a second backward through the graph of the first. Forward mode
    (``torch.func.jvp``) gives the same numbers, but the ``torch.func`` transforms import seconds
    of machinery on first use in a process, paid again by every fresh sweep worker.

    Attributes:
        outputs: ``[n, ...]`` detached outputs of the batch.
    """

    def __init__(self, ml: Any, inputs: Any):
        self.leaves = [t.detach().requires_grad_(True) for t in ml.theta.values()]
        with torch.enable_grad():
            out = ml.forward(dict(zip(ml.names, self.leaves)), inputs)
            self._out = out
            self._u = torch.zeros_like(out, requires_grad=True)
            self._jtu = torch.autograd.grad(out, self.leaves, self._u, create_graph=True)
        self.outputs = out.detach()

    def push(self, vs: list[Tensor]) -> Tensor:
        """``J v`` for ``K`` vectors given per parameter (``[K, *shape]``): ``[K, n, ...]``."""
        with torch.enable_grad():
            if vs[0].shape[0] == 1:
                (jv,) = torch.autograd.grad(self._jtu, self._u, [v[0] for v in vs], retain_graph=True)
                return jv.unsqueeze(0)
            (jv,) = torch.autograd.grad(self._jtu, self._u, vs, retain_graph=True, is_grads_batched=True)
            return jv

    def pull(self, u: Tensor) -> list[Tensor]:
        """``J^T u`` for ``K`` output cotangents ``[K, n, ...]``: per parameter ``[K, *shape]``."""
        with torch.enable_grad():
            return _batched_grad(self._out, self.leaves, u)


class _OutputCurvatureOperator(CurvatureOperator):
    """``v -> (1/N) sum_i J_i^T M_i J_i v`` for an output-space matrix ``M_i`` (subclasses)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, *, vmap_blocks: bool | None = None, **kwargs: Any):
        if vmap_blocks is None:
            vmap_blocks = model_device(model).type != "cpu"
        super().__init__(model, loss_fn, data, vmap_blocks=vmap_blocks, **kwargs)

    def _output_product(self, outputs: Tensor, targets: Tensor) -> Callable[[Tensor], Tensor]:
        """A function ``[K, n, ...] -> [K, n, ...]``: ``M`` of one batch (as the batch mean)."""
        raise NotImplementedError

    def _block(self, rows: Tensor) -> Tensor:
        vs = list(self.unflatten(rows).values())
        return self.weighted_sum(lambda x, y: self._for_batch(vs, x, y))

    def _for_batch(self, vs: list[Tensor], inputs: Any, targets: Tensor) -> Tensor:
        lin = Linearization(self, inputs)
        product = self._output_product(lin.outputs, targets)
        return self.flatten([g.detach() for g in lin.pull(product(lin.push(vs)))])


class GGNOperator(_OutputCurvatureOperator):
    """``v -> G v``, ``G = (1/N) sum_i J_i^T (d^2 l_i / d f_i^2) J_i`` the generalized Gauss-Newton
    matrix of the data-set loss (see the module docstring); positive semi-definite for a loss
    convex in the outputs (cross-entropy, squared error). For cross-entropy on logits it is also
    the true Fisher information.

    Takes the arguments of :class:`~landscape.HessianOperator` except ``backend`` and the graph
    cache: ``params``, ``dtype``, ``train_mode``, ``check_deterministic``, ``block_size`` (default
    16), ``vmap_blocks`` (default: batched backward on a GPU, one vector at a time on a
    CPU). Units: loss per parameter unit squared, like the Hessian.
    """

    def _output_product(self, outputs: Tensor, targets: Tensor) -> Callable[[Tensor], Tensor]:
        out = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.loss_fn(out, targets), out, create_graph=True)
        if not g.requires_grad:  # a loss linear in the outputs: zero output Hessian
            return torch.zeros_like

        def product(u: Tensor) -> Tensor:
            with torch.enable_grad():
                return _batched_grad(g, [out], u)[0]  # the output Hessian is symmetric

        return product


class EmpiricalFisherOperator(_OutputCurvatureOperator):
    """``v -> F v``, ``F = (1/N) sum_i g_i g_i^T``, ``g_i`` the gradient of sample ``i``'s loss at
    its data label (the empirical Fisher; see the module docstring). Positive semi-definite, rank
    at most ``N``. Arguments as :class:`GGNOperator`. Units: loss squared per parameter unit
    squared.
    """

    def _output_product(self, outputs: Tensor, targets: Tensor) -> Callable[[Tensor], Tensor]:
        n = outputs.shape[0]
        r = output_gradients(self.loss_fn, outputs, targets)
        dims = tuple(range(2, r.ndim + 1))

        def product(u: Tensor) -> Tensor:  # u: [K, n, ...]
            coefficients = (r * u).sum(dim=dims, keepdim=True) if dims else r * u  # [n] outputs: no sum
            return r * coefficients / n  # batch mean of r_i r_i^T u_i

        return product


def output_gradients(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """``[n, ...]``: per-sample output gradients ``r_i = d l_i / d f_i`` of a batch, from the
    gradient of the batch-mean loss times ``n``."""
    out = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss_fn(out, targets), out)
    return outputs.shape[0] * g


def ggn_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    k: int = 1,
    tol: float = 1e-3,
    max_hvp: int | None = None,
    seed: int = 0,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    train_mode: bool = False,
) -> EigenResult:
    """The ``k`` largest eigenvalues of the data-set GGN (:class:`GGNOperator`) by Lanczos
    (:func:`landscape.lanczos`; ``tol``, ``max_hvp`` and ``seed`` as in
    :func:`landscape.hessian_eigenvalues`). For cross-entropy this is the top of the true Fisher
    spectrum. Returns an :class:`~landscape.EigenResult` (values descending, loss per parameter
    unit squared, with residuals)."""
    G = GGNOperator(model, loss_fn, data, params=params, dtype=dtype, train_mode=train_mode)
    return lanczos(G, k, "largest", tol, max_products=max_hvp, seed=seed)


def _operator_trace(
    operator: CurvatureOperator, method: TraceMethod, rtol: float, max_hvp: int, sketch_size: int | None, seed: int
) -> TraceResult:
    return estimate_trace(operator, method=method, rtol=rtol, max_products=max_hvp, sketch_size=sketch_size, seed=seed)


def ggn_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    method: TraceMethod = "hutch++",
    rtol: float = 1e-2,
    max_hvp: int = 1000,
    sketch_size: int | None = None,
    seed: int = 0,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    train_mode: bool = False,
) -> TraceResult:
    """``tr(G)`` of the data-set GGN (:class:`GGNOperator`) by Hutch++ or Hutchinson (arguments as
    :func:`landscape.hessian_trace`: stop at ``std_err <= rtol |value|`` or ``max_hvp`` products,
    default 1e-2 and 1000; ``sketch_size >= P`` is exact). For cross-entropy, the trace of the true
    Fisher. Returns a :class:`~landscape.TraceResult` (value +- std_err, loss per parameter unit
    squared)."""
    G = GGNOperator(model, loss_fn, data, params=params, dtype=dtype, train_mode=train_mode)
    return _operator_trace(G, method, rtol, max_hvp, sketch_size, seed)


def fisher_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    method: TraceMethod = "hutch++",
    rtol: float = 1e-2,
    max_hvp: int = 1000,
    sketch_size: int | None = None,
    seed: int = 0,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    train_mode: bool = False,
) -> TraceResult:
    """``tr(F) = (1/N) sum_i ||g_i||^2`` of the empirical Fisher (:class:`EmpiricalFisherOperator`,
    ``g_i`` the per-sample loss gradients at the data labels), estimated as :func:`ggn_trace`
    (same arguments and defaults). Returns a :class:`~landscape.TraceResult` (value +- std_err,
    loss squared per parameter unit squared)."""
    F = EmpiricalFisherOperator(model, loss_fn, data, params=params, dtype=dtype, train_mode=train_mode)
    return _operator_trace(F, method, rtol, max_hvp, sketch_size, seed)
