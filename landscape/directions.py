"""Directions in parameter space along which loss surfaces are drawn.

A *direction* is a dict ``{parameter name: tensor}`` with the shapes of the parameters it moves
(the same layout :meth:`landscape.ModelLoss.flatten` turns into a flat ``[P]`` vector). Three
kinds:

* :func:`random_directions`: Gaussian directions, normalized per filter (Li et al. 2018), per
  layer, or not at all. Each parameter's draw is seeded from ``(name, shape, seed, index)``
  with a stable hash, so two models of the same architecture in a sweep get the *same* raw
  directions and their surfaces are comparable.
* :func:`direction_to`: the straight line from one model to another, ``theta_b - theta_a``.
* :func:`pca_directions`: the top principal components of a training trajectory around its
  final weights, with explained variance ratios and the projected path.

Filter normalization (Li et al. 2018, eq. 1): for every parameter with two or more dimensions
and every index ``i`` along its first dimension (an output filter of a convolution, an output
neuron of a linear layer),

    d[i] <- d[i] / ||d[i]|| * ||w[i]||          (Frobenius norms of the slices)

so a step ``alpha`` moves every filter by ``alpha`` times its own norm, and the surface is
invariant to rescaling a ReLU layer and its successor. ``"layer"`` does the same with whole
tensors; ``"none"`` keeps the raw Gaussian. Parameters with at most one dimension (biases,
normalization scales) get a zero direction by default (``one_d="zero"``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from ._functional import ModelLoss, ParamSelector, _select, model_dtype

Direction = dict[str, Tensor]
Normalization = Literal["filter", "layer", "none"]
OneDMode = Literal["zero", "keep", "filter"]
ModelOrState = nn.Module | Mapping[str, Tensor]

NORMALIZATIONS = ("filter", "layer", "none")
ONE_D_MODES = ("zero", "keep", "filter")
_EPS = 1e-12


def stable_seed(name: str, shape: Sequence[int], seed: int, index: int = 0) -> int:
    """64-bit seed from ``sha256(f"{name}|{tuple(shape)}|{seed}|{index}")``.

    Unlike Python's ``hash`` it is the same in every process, so every worker of a sweep draws
    the same direction for a parameter of the same name and shape.
    """
    key = f"{name}|{tuple(int(s) for s in shape)}|{int(seed)}|{int(index)}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def gaussian_like(name: str, shape: Sequence[int], seed: int, index: int = 0) -> Tensor:
    """Standard normal draw of ``shape`` (float32, CPU) seeded by :func:`stable_seed`.

    Drawn on the CPU in float32 whatever the model's device and dtype, so the raw direction of a
    parameter does not depend on where or in which precision the model lives.
    """
    gen = torch.Generator().manual_seed(stable_seed(name, shape, seed, index))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def _check_choice(argument: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{argument}: must be one of {list(allowed)} (got {value!r})")


def _rescale(d: Tensor, w: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``d`` with its norm over ``dims`` set to the norm of ``w`` over the same ``dims``."""
    dn = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
    wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
    return d * (wn / dn.clamp_min(_EPS))


def normalize_direction(
    direction: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    normalization: Normalization = "filter",
    one_d: OneDMode = "zero",
) -> Direction:
    """Rescale ``direction`` to the scale of ``weights`` (a new dict; the inputs are untouched).

    Args:
        direction: ``{name: tensor}``; every name must be in ``weights`` with the same shape.
        weights: the parameters the direction starts from (e.g. ``ModelLoss.theta``).
        normalization: for parameters with two or more dimensions, ``"filter"`` rescales each
            slice ``d[i]`` along dim 0 to ``||w[i]||``; ``"layer"`` rescales the whole tensor to
            ``||w||``; ``"none"`` leaves it.
        one_d: parameters with at most one dimension (biases, norm scales): ``"zero"`` sets
            them to zero (default, Li et al.); ``"keep"`` treats the tensor as one block
            (rescaled to ``||w||`` unless ``normalization="none"``); ``"filter"`` treats every
            entry as its own filter, ``d_i -> sign(d_i) |w_i|`` (unless ``"none"``).
    """
    _check_choice("normalization", normalization, NORMALIZATIONS)
    _check_choice("one_d", one_d, ONE_D_MODES)
    out: Direction = {}
    for name, d in direction.items():
        if name not in weights:
            raise KeyError(f"direction: parameter {name!r} is not among the weights {list(weights)}")
        w = weights[name].to(d.device, d.dtype)
        if w.shape != d.shape:
            raise ValueError(f"direction: {name!r} has shape {tuple(d.shape)} but the parameter has {tuple(w.shape)}")
        if d.ndim <= 1:
            if one_d == "zero":
                out[name] = torch.zeros_like(d)
            elif normalization == "none":
                out[name] = d.clone()
            elif one_d == "keep" or d.ndim == 0:
                out[name] = _rescale(d, w, tuple(range(d.ndim)))
            else:
                out[name] = torch.sign(d) * w.abs()
        elif normalization == "filter":
            out[name] = _rescale(d, w, tuple(range(1, d.ndim)))
        elif normalization == "layer":
            out[name] = _rescale(d, w, tuple(range(d.ndim)))
        else:
            out[name] = d.clone()
    return out


def _weights(model: nn.Module, params: ParamSelector, dtype: torch.dtype | None) -> Direction:
    """``{name: detached copy}`` of the selected parameters, in ``dtype`` (default: the model's)."""
    named = dict(model.named_parameters())
    dtype = dtype or model_dtype(model)
    return {n: named[n].detach().to(dtype).clone() for n in _select(model, params)}


def random_directions(
    model: nn.Module,
    count: int = 1,
    *,
    seed: int = 0,
    normalization: Normalization = "filter",
    one_d: OneDMode = "zero",
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
) -> list[Direction]:
    """``count`` Gaussian directions around ``model``'s weights, normalized as asked.

    The raw draw of direction ``k`` for parameter ``name`` is seeded from
    ``(name, shape, seed, k)`` (:func:`stable_seed`): models of the same architecture get the
    same raw directions, different ``seed`` values give different ones, and the first direction
    does not depend on ``count``.

    Args:
        model: read only.
        count: number of directions (1 for a 1D surface, 2 for a plane).
        seed: base seed.
        normalization: ``"filter"`` (default), ``"layer"`` or ``"none"``; see
            :func:`normalize_direction`.
        one_d: ``"zero"`` (default), ``"keep"`` or ``"filter"``: what parameters with at most one
            dimension get; see :func:`normalize_direction`.
        params: which parameters the directions move (default: all with ``requires_grad``);
            see :class:`~landscape.ModelLoss`.
        dtype: dtype of the returned tensors (default: the model's); on the model's device.

    Returns:
        a list of ``count`` dicts ``{name: tensor}`` with the shapes of the parameters.
    """
    if int(count) != count or count < 1:
        raise ValueError(f"count: must be a positive integer (got {count!r})")
    _check_choice("normalization", normalization, NORMALIZATIONS)
    _check_choice("one_d", one_d, ONE_D_MODES)
    return draw_directions(_weights(model, params, dtype), count, seed, normalization, one_d)


def draw_directions(
    weights: Mapping[str, Tensor],
    count: int,
    seed: int = 0,
    normalization: Normalization = "filter",
    one_d: OneDMode = "zero",
) -> list[Direction]:
    """``count`` seeded Gaussian directions around ``weights`` ``{name: tensor}``, normalized as
    asked, on the weights' device and in their dtype (the core of :func:`random_directions`)."""
    out = []
    for k in range(int(count)):
        raw = {n: gaussian_like(n, w.shape, seed, k).to(w.device, w.dtype) for n, w in weights.items()}
        out.append(normalize_direction(raw, weights, normalization, one_d))
    return out


def filter_normalized_directions(model_loss: ModelLoss, n: int, *, seed: int = 0) -> Tensor:
    """``[P, n]`` filter-normalized Gaussian directions around ``model_loss``'s weights, as
    columns in its flat order.

    The same directions :func:`random_directions` draws (seeded per parameter name, shape,
    ``seed`` and index, so surfaces and curvature scalars see the same directions): each output
    slice of a parameter with ``ndim > 1`` is rescaled to the norm of the same slice of ``w``,
    parameters with ``ndim <= 1`` get zero (Li et al. 2018).
    """
    dicts = draw_directions(model_loss.theta, n, seed, "filter", "zero")
    return torch.stack([model_loss.flatten(d) for d in dicts], dim=1)


def _state_of(model: ModelOrState, argument: str) -> Mapping[str, Tensor]:
    if isinstance(model, nn.Module):
        return dict(model.named_parameters())
    if isinstance(model, Mapping):
        return model
    raise TypeError(f"{argument}: expected an nn.Module or a state dict, got {type(model).__name__}")


def _matching(state: Mapping[str, Tensor], weights: Direction, argument: str) -> Direction:
    """The entries of ``state`` named in ``weights``, checked for shape, as detached copies."""
    missing = [n for n in weights if n not in state]
    if missing:
        raise KeyError(f"{argument}: has no parameter named {missing} (needed by the reference model)")
    out = {}
    for n, w in weights.items():
        t = state[n]
        if tuple(t.shape) != tuple(w.shape):
            raise ValueError(f"{argument}: {n!r} has shape {tuple(t.shape)}, the reference model {tuple(w.shape)}")
        out[n] = t.detach().to(w.device, w.dtype).clone()
    return out


def direction_to(
    model_a: nn.Module,
    model_b: ModelOrState,
    *,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
) -> Direction:
    """``theta_b - theta_a`` over the selected parameters of ``model_a``.

    ``model_b`` is a model of the same architecture or its ``state_dict``; moving ``model_a``
    by 1 along the result lands on ``model_b``'s weights (buffers are not part of it).
    """
    wa = _weights(model_a, params, dtype)
    wb = _matching(_state_of(model_b, "model_b"), wa, "model_b")
    return {n: wb[n] - wa[n] for n in wa}


@dataclass
class TrajectoryPCA:
    """Principal directions of a training trajectory around its final weights.

    Attributes:
        directions: ``k`` orthonormal directions ``{name: tensor}`` (unit norm over all selected
            parameters together), largest variance first.
        explained_variance_ratio: ``[k]`` fraction of the trajectory's total variance (about the
            final weights, or about the mean with ``center=True``) each direction holds.
        coords: ``[T, k]`` coordinates of every checkpoint, ``<w_t - w_final, u_j>``; the final
            weights are at the origin. Units: parameter-space (Euclidean) distance.
        singular_values: ``[k]`` singular values of the displacement matrix.
    """

    directions: list[Direction]
    explained_variance_ratio: np.ndarray
    coords: np.ndarray
    singular_values: np.ndarray

    def span(self, margin: float = 0.25) -> tuple[float, float]:
        """Half-widths ``(span_alpha, span_beta)`` of a centered grid that holds the path with a
        relative ``margin``: pass as ``span`` to :func:`landscape.surface_2d`."""
        reach = np.abs(self.coords[:, :2]).max(axis=0) * (1.0 + margin)
        reach = np.where(reach > 0, reach, 1.0)
        return float(reach[0]), float(reach[-1])


def pca_directions(
    model: nn.Module,
    trajectory: Sequence[ModelOrState],
    *,
    k: int = 2,
    center: bool = False,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
) -> TrajectoryPCA:
    """Top-``k`` PCA directions of the checkpoints ``trajectory`` around ``model``'s weights.

    The rows ``w_t - w_final`` (``w_final``: ``model``'s current weights) are stacked into a
    ``[T, P]`` matrix and decomposed by a thin SVD. With ``center=False`` (default) the
    components maximize the captured squared distance *from the final weights*, so the projected
    path is as faithful as possible around the point the surface is drawn at; ``center=True``
    subtracts the mean row first (classical PCA, as scikit-learn's ``PCA`` would). Coordinates
    are always ``<w_t - w_final, u_j>``, so the path ends at the origin when the last checkpoint
    is the model. Signs are fixed so that the first checkpoint has a coordinate <= 0.

    Args:
        model: the final model (the center of the plot); read only.
        trajectory: checkpoints as models or state dicts (e.g. ``copy.deepcopy(m.state_dict())``
            saved during training), oldest first. At least ``k`` of them must differ from the
            final weights.
        k: number of directions (1 <= k <= T).
        center: subtract the mean displacement before the SVD (see above).
        params, dtype: as in :func:`random_directions`.
    """
    if len(trajectory) < 1:
        raise ValueError("trajectory: needs at least one checkpoint")
    if int(k) != k or not 1 <= k <= len(trajectory):
        raise ValueError(f"k: must be an integer in [1, len(trajectory)={len(trajectory)}] (got {k!r})")
    final = _weights(model, params, dtype)
    names = list(final)
    flat = lambda d: torch.cat([d[n].reshape(-1) for n in names])  # noqa: E731
    base = flat(final).to(torch.float64)
    rows = torch.stack(
        [
            flat(_matching(_state_of(ckpt, f"trajectory[{t}]"), final, f"trajectory[{t}]")).to(torch.float64) - base
            for t, ckpt in enumerate(trajectory)
        ]
    )
    mat = rows - rows.mean(0, keepdim=True) if center else rows
    _, s, vh = torch.linalg.svd(mat, full_matrices=False)
    total = float((s**2).sum())
    if total == 0.0 or s[k - 1] <= 1e-12 * s[0]:
        raise ValueError(
            f"trajectory: the checkpoints span fewer than k={k} directions around the final "
            "weights; save checkpoints at distinct points of training or lower k"
        )
    basis = vh[:k]
    coords = rows @ basis.T
    signs = torch.where(coords[0] > 0, -1.0, 1.0).to(torch.float64)
    basis, coords = basis * signs[:, None], coords * signs
    directions = []
    for u in basis:
        parts = torch.split(u, [final[n].numel() for n in names])
        directions.append({n: p.reshape(final[n].shape).to(final[n].dtype) for n, p in zip(names, parts)})
    return TrajectoryPCA(
        directions=directions,
        explained_variance_ratio=(s[:k] ** 2 / total).numpy(),
        coords=coords.numpy(),
        singular_values=s[:k].numpy(),
    )


def as_flat(directions: Sequence[Mapping[str, Tensor] | Tensor], model_loss: ModelLoss) -> Tensor:
    """Stack directions into a ``[k, P]`` block in ``model_loss.names`` order.

    Every direction must name exactly the parameters ``model_loss`` varies, or be a flat ``[P]``
    tensor already.
    """
    rows = []
    names = set(model_loss.names)
    for i, d in enumerate(directions):
        if isinstance(d, Tensor):
            if d.shape != (model_loss.num_params,):
                raise ValueError(
                    f"directions[{i}]: a flat direction must have shape [{model_loss.num_params}], got {tuple(d.shape)}"
                )
            rows.append(d.to(model_loss.device, model_loss.dtype))
            continue
        if not isinstance(d, Mapping):
            raise TypeError(f"directions[{i}]: expected a dict {{name: tensor}} or a flat tensor")
        if set(d) != names:
            extra, missing = sorted(set(d) - names), sorted(names - set(d))
            raise KeyError(
                f"directions[{i}]: must name exactly the varied parameters; unknown {extra}, missing {missing}"
            )
        for n, t in d.items():
            if tuple(t.shape) != tuple(model_loss.theta[n].shape):
                raise ValueError(
                    f"directions[{i}]: {n!r} has shape {tuple(t.shape)}, the parameter "
                    f"{tuple(model_loss.theta[n].shape)}"
                )
        rows.append(model_loss.flatten({n: d[n].to(model_loss.device, model_loss.dtype) for n in d}))
    return torch.stack(rows)
