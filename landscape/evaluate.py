"""One batched evaluator: the data-set loss and accuracy of a model at many parameter points.

Surfaces (:mod:`landscape.surface`), interpolation, average sharpness and PAC-Bayes flatness
(:mod:`landscape.sharpness`) all evaluate the network at many points ``w_i`` and read off the
sample-weighted mean loss (and accuracy, for classifiers) over the data. They do it here:

* :func:`loss_at_points`: points ``theta + coords @ directions`` (a line, a plane, k axes);
* :func:`loss_at_parameters`: points given as rows ``[N, P]`` (random perturbations).

Points are never materialized as model copies: every point is a parameter set the network is
evaluated at. A plain MLP (an ``nn.Sequential`` of ``nn.Linear`` and elementwise layers) runs
layer by layer into buffers reused from point to point, on a CPU several points per pass (the
first layer as one product with the stacked weights, the others as batched products); other
models go through :func:`torch.func.functional_call`, on a GPU as chunks of ``G`` points that
:func:`torch.func.vmap` pushes through at once (``G`` from a memory budget), on a CPU one point
per pass in cache-sized pieces of the batch (see :func:`_cpu_plan`).

First-layer affine trick. When the model is an ``nn.Sequential`` whose first layer (after
optional ``nn.Flatten``) is an ``nn.Linear``, its pre-activations are affine in the
coordinates: ``X (W + sum_k c_k D_k)^T + b + sum_k c_k e_k = Z_0 + sum_k c_k Z_k`` with
``Z_0 = X W^T + b`` and ``Z_k = X D_k^T + e_k`` (``D_k``, ``e_k``: direction ``k``'s part of
the weight and bias). :func:`loss_at_points` computes the ``Z``'s once per batch and each
point's pre-activations as one ``[1, k+1] @ [k+1, n * width]`` product, then runs only the
rest of the network (exact up to float rounding: a sum in another order).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.nn import functional as F

from ._functional import Batch, LossFn, ModelLoss, is_classification
from .evaluation_plan import (  # noqa: F401  (MAX_STACK, ...: re-exported, part of this module's documented plan)
    MAX_STACK,
    MIN_MICRO_BATCH,
    STACK_BYTES,
    WORKING_SET,
    _check_budget,
    _cpu_plan,
    _forward_bytes,
    _parameter_set_bytes,
    bytes_per_point,
    choose_chunk_size,
    default_memory_budget,
)


def _pieces(inputs: Any, targets: Tensor, size: int | None) -> list[tuple[Any, Tensor]]:
    """``(inputs, targets)`` cut along dim 0 into the fewest pieces of at most ``size`` samples,
    of equal size up to one sample (no small remainder piece)."""
    n = len(targets)
    if size is None or n <= size:
        return [(inputs, targets)]
    count = -(-n // size)  # ceil
    cut = lambda t: torch.tensor_split(t, count)  # noqa: E731
    xs = cut(inputs) if isinstance(inputs, Tensor) else list(zip(*(cut(t) for t in inputs)))
    return list(zip(xs, cut(targets)))


class _PlainCrossEntropy:
    """A plain cross-entropy computed as ``logsumexp(z) - z[y]`` (see :func:`_fast_cross_entropy`),
    which can also give the accuracy from the same pass (:meth:`scores`)."""

    def __init__(self, loss_fn: LossFn, ignore_index: int):
        self.loss_fn, self.ignore_index = loss_fn, ignore_index

    def _own(self, outputs: Tensor, targets: Tensor) -> bool:
        return is_classification(outputs, targets) and not bool((targets == self.ignore_index).any())

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if not self._own(outputs, targets):
            return self.loss_fn(outputs, targets)
        picked = outputs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (torch.logsumexp(outputs, dim=-1) - picked).mean()

    def scores(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(loss, accuracy)`` from one shift by the row maxima: ``z = outputs - max`` is exactly
        0 at the maxima, so a sample is right when its target's ``z`` is 0 and no other class
        ties (rows with ties or non-finite scores take ``argmax``, whose first-index rule
        decides). ``outputs`` may carry leading point dimensions (``[G, n, C]`` gives ``[G]``
        results). ``None`` when the outputs are not this loss's (then use ``__call__``)."""
        if not self._own(outputs[(0,) * (outputs.ndim - 2)], targets):
            return None
        labels = targets.expand(outputs.shape[:-1])
        top = outputs.amax(-1, keepdim=True)
        z = outputs - top
        picked = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        loss = (z.exp().sum(-1).log() - picked).mean(-1)
        correct = picked == 0
        unclear = ((z == 0).sum(-1) != 1) | ~torch.isfinite(top.squeeze(-1))
        if bool(unclear.any()):
            correct[unclear] = outputs[unclear].argmax(-1) == labels[unclear]
        return loss, correct.to(loss.dtype).mean(-1)


def _fast_cross_entropy(loss_fn: LossFn) -> LossFn:
    """``loss_fn``, or for a plain cross-entropy (``nn.CrossEntropyLoss()`` with its defaults, or
    ``F.cross_entropy``) the same loss as ``logsumexp(z) - z[y]``, averaged.

    Same value to rounding, and on a CPU several times faster for few classes: torch's
    ``log_softmax`` over a short last dimension (10 classes x 4,000 samples) took 4x the time
    of ``logsumexp`` and a quarter of a small MLP's forward pass. Other targets (class
    probabilities, ``ignore_index`` labels, more than 2 dimensions) go to ``loss_fn``.
    """
    if loss_fn is F.cross_entropy:
        return _PlainCrossEntropy(loss_fn, -100)
    if (
        type(loss_fn) is nn.CrossEntropyLoss
        and loss_fn.weight is None
        and loss_fn.reduction == "mean"
        and loss_fn.label_smoothing == 0.0
    ):
        return _PlainCrossEntropy(loss_fn, loss_fn.ignore_index)
    return loss_fn


def sequential_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """``[(name, layer)]`` of an ``nn.Sequential`` whose layers are plain ``nn.Linear`` or hold
    no parameters or buffers (activations, ``Flatten``, ``Dropout``), none with hooks; such a
    model runs layer by layer with :func:`torch.nn.functional.linear` (exactly what its
    forward computes, without :func:`~torch.func.functional_call`'s per-call overhead).
    ``None`` for any other model."""
    if not isinstance(model, nn.Sequential):
        return None
    layers = list(model.named_children())
    for _, layer in layers:
        hooked = layer._forward_hooks or layer._forward_pre_hooks
        plain = type(layer) is nn.Linear or not (
            any(True for _ in layer.parameters()) or any(True for _ in layer.buffers())
        )
        if hooked or not plain or model._forward_hooks or model._forward_pre_hooks:
            return None
    return layers


def first_linear(model_loss: ModelLoss) -> tuple[int, nn.Linear] | None:
    """``(index, layer)`` of the first ``nn.Linear`` of a model :func:`sequential_layers`
    accepts, when only ``nn.Flatten`` layers come before it (the affine trick applies)."""
    layers = sequential_layers(model_loss.model)
    for index, (_, layer) in enumerate(layers or []):
        if isinstance(layer, nn.Linear):
            return index, layer
        if not isinstance(layer, nn.Flatten):
            return None
    return None


#: The first-layer affine trick is used when the layer's inputs number at least this many times
#: the ``k + 1`` basis terms: it replaces an ``[n, in] x [in, width]`` product by a sum of
#: ``k + 1`` terms over ``[n, width]``, which costs about as much memory traffic as the product
#: for few inputs (MNIST-1D: 40), so it pays only for wide inputs (images). See
#: ``benchmarks/surface.md``.
AFFINE_MIN_RATIO = 16


class _Network:
    """How one point's network is run on one piece of a batch: ``outputs(params, coords, piece)``.

    A model of plain layers (:func:`sequential_layers`) runs layer by layer; others through
    :meth:`ModelLoss.forward`. With the affine trick a piece carries the first layer's
    pre-activation basis ``Z`` (``[k+1, n * width]``) and a point its coordinates.
    """

    def __init__(self, model_loss: ModelLoss, directions: Tensor | None):
        self.ml, self.split = model_loss, None
        self.layers = sequential_layers(model_loss.model)
        if directions is None:
            return
        found = first_linear(model_loss)
        if found is None or found[1].in_features < AFFINE_MIN_RATIO * (len(directions) + 1):
            return
        index, _ = found
        assert isinstance(model_loss.model, nn.Sequential)
        self.split, self.first_names = index, [f"{index}.weight", f"{index}.bias"]
        self.head = model_loss.model[:index]
        self.first: list[tuple[Tensor, Tensor | None]] = []  # (weight, bias) of theta, d_1 .. d_k
        fixed = {n: model_loss.constants.get(n) for n in self.first_names}
        for k, row in enumerate([model_loss.theta_flat(), *directions]):
            parts = model_loss.unflatten(row)
            # a fixed (not varied) weight or bias: its value at theta, zero along directions
            weight = parts.get(self.first_names[0])
            if weight is None:
                fixed_weight = fixed[self.first_names[0]]
                assert fixed_weight is not None
                weight = fixed_weight if k == 0 else torch.zeros_like(fixed_weight)
            bias = parts.get(self.first_names[1], fixed[self.first_names[1]] if k == 0 else None)
            self.first.append((weight, bias))

    def prepare(self, inputs: Any, targets: Tensor) -> tuple[Any, Tensor, Tensor | None]:
        """A piece: inputs, targets and (affine trick) the pre-activation basis ``[k+1, n*h]``."""
        if self.split is None or (isinstance(inputs, tuple) and len(inputs) != 1):
            return inputs, targets, None
        x = inputs[0] if isinstance(inputs, tuple) else inputs
        with torch.no_grad():
            x = self.head(x)
            basis = torch.stack([F.linear(x, w, b) for w, b in self.first])
        return inputs, targets, basis.reshape(len(self.first), -1)

    def outputs(
        self, params: dict[str, Tensor], coords: Tensor | None, piece: tuple[Any, Tensor, Tensor | None]
    ) -> Tensor:
        inputs, targets, basis = piece
        if self.layers is None or isinstance(inputs, tuple) and len(inputs) != 1:
            return self.ml.forward(params, inputs)
        values = {**self.ml.constants, **params}
        x, start, owned = inputs[0] if isinstance(inputs, tuple) else inputs, 0, False
        if basis is not None:
            assert coords is not None and self.split is not None
            weights = torch.cat([coords.new_ones(1), coords]).unsqueeze(0)  # [1, k+1]
            pre = self._buffer("pre", (1, basis.shape[1]), basis)
            x, start, owned = torch.mm(weights, basis, out=pre).view(len(targets), -1), self.split + 1, True
        for name, layer in self.layers[start:]:
            if isinstance(layer, nn.Linear):
                weight, bias = values[f"{name}.weight"], values.get(f"{name}.bias")
                if x.ndim != 2:
                    x, owned = F.linear(x, weight, bias), False
                    continue
                out = self._buffer(name, (x.shape[0], weight.shape[0]), x)
                x = torch.mm(x, weight.T, out=out) if bias is None else torch.addmm(bias, x, weight.T, out=out)
                owned = True
            elif owned and type(layer) in _IN_PLACE:
                x = _IN_PLACE[type(layer)](x)
            else:
                x, owned = layer(x), owned and type(layer) in _VIEWS
        return x

    @property
    def stackable(self) -> bool:
        """Whether :meth:`outputs_stacked` runs this model: plain layers whose first ``nn.Linear``
        sees the data (parameter-free layers only before it) and only linear and elementwise
        layers after it."""
        if self.layers is None:
            return False
        kinds = [isinstance(layer, nn.Linear) for _, layer in self.layers]
        if True not in kinds:
            return False
        after = self.layers[kinds.index(True) :]
        return all(isinstance(layer, nn.Linear) or type(layer) in _ELEMENTWISE for _, layer in after)

    def outputs_stacked(self, params: dict[str, Tensor], inputs: Any) -> Tensor:
        """``[G, n, C]`` outputs of ``G`` points (``params``: ``{name: [G, *shape]}``) on one
        piece, for a :attr:`stackable` model: the first linear layer as one product of the
        shared inputs with the ``G`` stacked weights, the next ones as batched products."""
        count = next(iter(params.values())).shape[0]
        x, shared = inputs[0] if isinstance(inputs, tuple) else inputs, True
        assert self.layers is not None
        for name, layer in self.layers:
            if not isinstance(layer, nn.Linear):
                x = _IN_PLACE[type(layer)](x) if not shared and type(layer) in _IN_PLACE else layer(x)
                continue
            weight, bias = (self._stacked(params, f"{name}.{p}", count) for p in ("weight", "bias"))
            assert weight is not None
            width = weight.shape[1]
            if shared:  # [n, in] x [in, G * width], viewed as [G, n, width]
                out = self._buffer(name, (x.shape[0], count * width), x)
                flat_weight = weight.reshape(count * width, -1).T
                if bias is None:
                    torch.mm(x, flat_weight, out=out)
                else:
                    torch.addmm(bias.reshape(-1), x, flat_weight, out=out)
                x, shared = out.view(x.shape[0], count, width).transpose(0, 1), False
            else:
                out = self._buffer(name, (count, x.shape[1], width), x)
                if bias is None:
                    x = torch.bmm(x, weight.transpose(1, 2), out=out)
                else:
                    x = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2), out=out)
        return x

    def _stacked(self, params: dict[str, Tensor], name: str, count: int) -> Tensor | None:
        """``[G, *shape]``: a varied parameter as given, a fixed one repeated (``None``: no bias)."""
        if name in params:
            return params[name]
        fixed = self.ml.constants.get(name)
        return None if fixed is None else fixed.expand(count, *fixed.shape)

    def _buffer(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A tensor of ``shape`` reused from point to point (a fresh one per point was faulted in
        page by page: at 1 MiB per activation glibc maps and unmaps it every time)."""
        buffers = self.__dict__.setdefault("_buffers", {})
        found = buffers.get((key, shape))
        if found is None or found.dtype != like.dtype or found.device != like.device:
            found = buffers[(key, shape)] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return found


# activations applied in place to the network's own intermediate buffers (never to the data)
_IN_PLACE = {nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_, nn.Sigmoid: torch.sigmoid_}
# layers that return their input or a view of it (eval-mode dropout, flatten)
_VIEWS = (nn.Flatten, nn.Dropout, nn.Identity)
# layers that act on each number on its own (so on stacked points as on one)
_ELEMENTWISE = (
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.LeakyReLU,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
)


def _scores(loss_fn: LossFn, out: Tensor, targets: Tensor, fuse: bool = True) -> tuple[Tensor, Tensor]:
    """``(loss, accuracy)`` of one piece's outputs (accuracy NaN unless classification);
    ``fuse``: from one pass for a plain cross-entropy (not under vmap: it branches on data)."""
    fused = loss_fn.scores(out, targets) if fuse and isinstance(loss_fn, _PlainCrossEntropy) else None
    if fused is not None:
        return fused
    loss = loss_fn(out, targets)
    if is_classification(out, targets):
        return loss, (out.argmax(-1) == targets).to(loss.dtype).mean()
    return loss, torch.full_like(loss, float("nan"))


def _scores_stacked(loss_fn: LossFn, out: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(loss [G], accuracy [G])`` of the ``[G, n, C]`` outputs of ``G`` points."""
    fused = loss_fn.scores(out, targets) if isinstance(loss_fn, _PlainCrossEntropy) else None
    if fused is not None:
        return fused
    return tuple(torch.stack(parts) for parts in zip(*(_scores(loss_fn, o, targets) for o in out)))  # type: ignore[return-value]


def _plan(
    model_loss: ModelLoss,
    num: int,
    chunk_size: int | None,
    memory_budget: int | None,
    micro_batch: int | str | None,
    stackable: bool = False,
) -> tuple[int, int | None]:
    """``(points per pass, samples per piece or None)`` from the arguments (see
    :func:`loss_at_points`)."""
    if micro_batch not in ("auto", None) and not (isinstance(micro_batch, numbers.Integral) and micro_batch >= 1):
        raise ValueError(f"micro_batch: must be 'auto', None or a positive integer (got {micro_batch!r})")
    micro = None
    if chunk_size is None:
        budget = _check_budget(memory_budget, model_loss.device)
        act, batch = _forward_bytes(model_loss)
        chunk_size = int(max(1, min(num, budget // (act + _parameter_set_bytes(model_loss)))))
        if micro_batch == "auto" and not model_loss.train_mode and model_loss.device.type == "cpu":
            chunk_size, micro = _cpu_plan(act / batch, batch, stackable)
            chunk_size = min(chunk_size, num)
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive integer (got {chunk_size!r})")
    if micro_batch not in ("auto", None):
        micro = int(micro_batch)
    return int(chunk_size), micro


def _evaluate(
    model_loss: ModelLoss,
    num: int,
    rows: Callable[[int, int], Tensor],
    coords: Tensor | None,
    directions: Tensor | None,
    *,
    batches: Iterable[Batch] | None,
    loss_fn: LossFn | None,
    chunk_size: int | None,
    memory_budget: int | None,
    micro_batch: int | str | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The engine of :func:`loss_at_points` / :func:`loss_at_parameters`: ``rows(start, stop)``
    gives the ``[G, P]`` parameter sets of points ``start..stop-1``; ``coords`` and
    ``directions`` (both or neither) allow the first-layer affine trick on one-point passes."""
    network = _Network(model_loss, directions)
    stacked = network.stackable and network.split is None  # the affine trick goes one point at a time
    chunk, micro = _plan(model_loss, num, chunk_size, memory_budget, micro_batch, stacked)
    if chunk > 1:
        network.split = None
    loss_fn = _fast_cross_entropy(model_loss.loss_fn if loss_fn is None else loss_fn)
    data = model_loss.batches if batches is None else batches
    in_memory = model_loss.batches.in_memory if batches is None else isinstance(batches, (list, tuple))

    def point(params: dict[str, Tensor], inputs: Any, targets: Tensor) -> tuple[Tensor, Tensor]:
        return _scores(loss_fn, model_loss.forward(params, inputs), targets, fuse=False)

    batched = vmap(point, in_dims=(0, None, None))

    def evaluate(
        start: int, params: dict[str, Tensor], pieces: list[tuple[Any, Tensor, Tensor | None]]
    ) -> tuple[Tensor, Tensor]:
        """Sample-weighted ``(loss [G], accuracy [G])`` of a chunk over the pieces of one batch."""
        total_loss: Tensor | int = 0
        total_acc: Tensor | int = 0
        for piece in pieces:
            inputs, targets, _ = piece
            if chunk == 1:
                c = None if coords is None else coords[start]
                l, a = _scores(loss_fn, network.outputs({n: p[0] for n, p in params.items()}, c, piece), targets)
                l, a = l.reshape(1), a.reshape(1)
            elif network.stackable and not (isinstance(inputs, tuple) and len(inputs) != 1):
                l, a = _scores_stacked(loss_fn, network.outputs_stacked(params, inputs), targets)
            else:
                l, a = batched(params, inputs, targets)
            total_loss, total_acc = total_loss + len(targets) * l, total_acc + len(targets) * a
        n = sum(len(p[1]) for p in pieces)
        return cast(Tensor, total_loss) / n, cast(Tensor, total_acc) / n

    def prepared(inputs: Any, targets: Tensor) -> list[tuple[Any, Tensor, Tensor | None]]:
        return [network.prepare(x, y) for x, y in _pieces(inputs, targets, micro)]

    starts = range(0, num, chunk)
    # Results go straight into preallocated buffers: small result tensors left alive between
    # the large freed activations pinned the top of glibc's heap, so every point's activations
    # were faulted in afresh (twice the wall time for the large benchmark MLP).
    loss = torch.zeros(num, dtype=model_loss.dtype, device=model_loss.device)
    acc = torch.zeros_like(loss)
    count = 0
    with torch.no_grad(), model_loss.mode():
        if in_memory:
            # the pieces (and their pre-activation bases) are built once; each chunk's
            # parameter sets once, reused for every batch
            all_pieces = [(len(y), prepared(x, y)) for x, y in data]
            count = sum(n for n, _ in all_pieces)
            for start in starts:
                params = model_loss.unflatten(rows(start, min(start + chunk, num)))
                for n, pieces in all_pieces:
                    l, a = evaluate(start, params, pieces)
                    loss[start : start + chunk] += n * l
                    acc[start : start + chunk] += n * a
        else:
            # a loader is read once: every chunk is evaluated on each batch as it comes
            for x, y in data:
                pieces = prepared(x, y)
                count += len(y)
                for start in starts:
                    l, a = evaluate(start, model_loss.unflatten(rows(start, min(start + chunk, num))), pieces)
                    loss[start : start + chunk] += len(y) * l
                    acc[start : start + chunk] += len(y) * a
    if count == 0:
        raise ValueError("data yielded no samples")
    mean_loss = (loss / count).to("cpu", torch.float64).numpy()
    mean_acc = (acc / count).to("cpu", torch.float64).numpy()
    return mean_loss, (None if np.isnan(mean_acc).all() else mean_acc)


_EVALUATOR_ARGS = """
        batches: the ``(inputs, targets)`` batches to average over (default: the data of
            ``model_loss``); a list/tuple is kept in memory, other iterables are read once.
        loss_fn: the loss to use instead of ``model_loss.loss_fn`` (e.g. on normalized logits).
        chunk_size: points per pass (stacked for a plain MLP, else vmapped); default from
            ``memory_budget``. ``1`` evaluates points one by one without vmap (for models whose
            ops vmap does not support).
        memory_budget: bytes a chunk may use (default :func:`default_memory_budget`).
        micro_batch: cut every batch into pieces of at most this many samples (exact: the loss
            is a sample-weighted mean, and in eval mode samples do not interact). ``None``:
            never cut. ``"auto"`` (default): on a CPU in eval mode with an automatic chunk size,
            the plan of :func:`_cpu_plan` (a plain MLP: several points per pass, uncut; other
            models: one point per pass in pieces of at most :data:`WORKING_SET` bytes of
            intermediates); elsewhere the same as ``None``.

    Returns:
        ``(loss [N], accuracy [N] or None)`` as float64 numpy arrays; accuracy is ``None``
        unless outputs are ``[n, C]`` scores and targets integer labels."""


def loss_at_points(
    model_loss: ModelLoss,
    directions: Tensor,
    coords: Tensor | np.ndarray,
    *,
    batches: Iterable[Batch] | None = None,
    loss_fn: LossFn | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    micro_batch: int | str | None = "auto",
) -> tuple[np.ndarray, np.ndarray | None]:
    (
        """Data-set loss and accuracy at ``theta + coords @ directions`` for many points.

    One-point passes use the first-layer affine trick when the model allows it (see the
    module docstring).

    Args:
        model_loss: the functional loss (its snapshot ``theta`` is the origin).
        directions: ``[k, P]`` flat directions (see :func:`landscape.directions.as_flat`).
        coords: ``[N, k]`` coordinates of the points."""
        + _EVALUATOR_ARGS
    )
    D = directions.to(model_loss.device, model_loss.dtype)
    C = torch.as_tensor(np.asarray(coords), dtype=model_loss.dtype).to(model_loss.device)
    if C.ndim != 2 or C.shape[1] != D.shape[0]:
        raise ValueError(f"coords: expected shape [N, {D.shape[0]}], got {tuple(C.shape)}")
    theta = model_loss.theta_flat()
    return _evaluate(
        model_loss,
        C.shape[0],
        lambda start, stop: torch.addmm(theta, C[start:stop], D),
        C,
        D,
        batches=batches,
        loss_fn=loss_fn,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        micro_batch=micro_batch,
    )


def loss_at_parameters(
    model_loss: ModelLoss,
    points: Tensor,
    *,
    batches: Iterable[Batch] | None = None,
    loss_fn: LossFn | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    micro_batch: int | str | None = "auto",
) -> tuple[np.ndarray, np.ndarray | None]:
    (
        """Data-set loss and accuracy at the flat parameter sets ``points`` (``[N, P]`` rows in
    ``model_loss.names`` order, e.g. random perturbations of ``theta``).

    Args:
        model_loss: the functional loss (its constants and mode are used).
        points: ``[N, P]`` parameter sets."""
        + _EVALUATOR_ARGS
    )
    if points.ndim != 2 or points.shape[1] != model_loss.num_params:
        raise ValueError(f"points: expected shape [N, {model_loss.num_params}], got {tuple(points.shape)}")
    W = points.to(model_loss.device, model_loss.dtype)
    return _evaluate(
        model_loss,
        W.shape[0],
        lambda start, stop: W[start:stop],
        None,
        None,
        batches=batches,
        loss_fn=loss_fn,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        micro_batch=micro_batch,
    )
