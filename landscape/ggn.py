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

A product ``A v`` is ``J^T (M (J v))`` batch by batch: ``J v`` by forward mode (``torch.func.jvp``),
``M`` the output-space matrix (``H_i`` by a reverse-over-reverse product of the loss in the
outputs; ``r_i r_i^T`` for the empirical Fisher, ``r_i = d l_i / d f_i``), ``J^T u`` by one
``vjp``; a block of vectors goes through one ``vmap``. ``loss_fn(outputs, targets)`` must be the
batch mean of per-sample losses (every ``torch.nn`` loss with its default reduction), so that
``n * d loss_fn / d f_i`` is the per-sample output gradient. Operators are
:class:`~landscape.hvp.CurvatureOperator` s: pass them to ``hessian_eigenvalues``,
``hessian_trace``, ``hessian_spectrum``, ``lanczos``, ``estimate_trace`` or ``.to_scipy()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad as func_grad
from torch.func import jvp, vjp, vmap

from ._functional import LossFn, ParamSelector
from .eigen import EigenResult, lanczos
from .hvp import CurvatureOperator


class _OutputCurvatureOperator(CurvatureOperator):
    """``v -> (1/N) sum_i J_i^T M_i J_i v`` for an output-space matrix ``M_i`` (subclasses)."""

    def _output_product(self, outputs: Tensor, targets: Tensor) -> Any:
        """A function ``[n, ...] -> [n, ...]``: ``M`` of one batch (weighted as the batch mean)."""
        raise NotImplementedError

    def _block(self, rows: Tensor) -> Tensor:
        vdict = self.unflatten(rows)
        return self.weighted_sum(lambda x, y: self._for_batch(vdict, x, y))

    def _for_batch(self, vs: dict[str, Tensor], inputs: Any, targets: Tensor) -> Tensor:
        def f(p: dict[str, Tensor]) -> Tensor:
            return self.forward(p, inputs)

        with torch.enable_grad():
            outputs, pullback = vjp(f, self.theta)
            outputs = outputs.detach()
            product = self._output_product(outputs, targets)

            def one(v: dict[str, Tensor]) -> dict[str, Tensor]:
                jv = jvp(f, (self.theta,), (v,))[1]
                return pullback(product(jv))[0]

            return self.flatten(vmap(one)(vs)).detach()


class GGNOperator(_OutputCurvatureOperator):
    """``v -> G v``, ``G = (1/N) sum_i J_i^T (d^2 l_i / d f_i^2) J_i`` the generalized Gauss-Newton
    matrix of the data-set loss (see the module docstring); positive semi-definite for a loss
    convex in the outputs (cross-entropy, squared error). For cross-entropy on logits it is also
    the true Fisher information.

    Takes the arguments of :class:`~landscape.HessianOperator` except ``backend``,
    ``vmap_blocks`` (always vmapped) and the graph cache: ``params``, ``dtype``, ``train_mode``,
    ``check_deterministic``, ``block_size`` (default 16). Units: loss per parameter unit squared,
    like the Hessian.
    """

    def _output_product(self, outputs: Tensor, targets: Tensor) -> Any:
        _, hessian_vector = vjp(func_grad(lambda o: self.loss_fn(o, targets)), outputs)
        return lambda u: hessian_vector(u)[0]  # the output Hessian is symmetric


class EmpiricalFisherOperator(_OutputCurvatureOperator):
    """``v -> F v``, ``F = (1/N) sum_i g_i g_i^T``, ``g_i`` the gradient of sample ``i``'s loss at
    its data label (the empirical Fisher; see the module docstring). Positive semi-definite, rank
    at most ``N``. Arguments as :class:`GGNOperator`. Units: loss squared per parameter unit
    squared.
    """

    def _output_product(self, outputs: Tensor, targets: Tensor) -> Any:
        n = outputs.shape[0]
        # per-sample output gradients r_i = d l_i / d f_i (the batch loss is their mean)
        r = n * func_grad(lambda o: self.loss_fn(o, targets))(outputs)
        dims = tuple(range(1, r.ndim))

        def product(u: Tensor) -> Tensor:
            coefficients = (r * u).sum(dim=dims, keepdim=True)
            return r * coefficients / n  # batch mean of r_i r_i^T u_i

        return product


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
