"""A model's data-set loss as a pure function of its parameters.

Every measurement in :mod:`landscape` goes through :class:`ModelLoss`, which

* snapshots the selected parameters (and all buffers) once, in the computing dtype and on the
  model's device, and evaluates the network with :func:`torch.func.functional_call`, so the
  user's module is never written to (weights, ``requires_grad``, ``.grad`` stay as they were);
* sets train/eval mode only for the duration of a call and restores every submodule's flag;
* defines the loss over *all* of the data as the sample-weighted mean of the per-batch mean
  losses, so a partial last batch counts exactly as many times as it has samples.

``data`` is one ``(inputs, targets)`` batch or any re-iterable of such batches (a list, a
:class:`torch.utils.data.DataLoader`). ``inputs`` is a tensor or a tuple of tensors passed as
positional arguments to the model; the batch size is ``len(targets)``. ``loss_fn(outputs,
targets)`` must return the *mean* loss over the batch (the default of every ``torch.nn`` loss).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

Batch = tuple[Any, Tensor]
ParamSelector = None | Sequence[str] | Callable[[str, nn.Parameter], bool]
LossFn = Callable[[Tensor, Tensor], Tensor]


class NonDeterministicLossError(ValueError):
    """The loss of the same data at the same weights differed between two evaluations."""


def weights_only(name: str, param: Tensor) -> bool:
    """Parameter selector that keeps matrices/filters and drops biases and normalization scales.

    Use as ``params=landscape.weights_only``.
    """
    return param.ndim > 1


def _is_single_batch(data: Any) -> bool:
    """``(inputs, targets)`` with tensor targets, as opposed to a sequence of such pairs."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)):
        return False
    inputs = data[0]
    return isinstance(inputs, Tensor) or (isinstance(inputs, tuple) and all(isinstance(t, Tensor) for t in inputs))


def _move(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(obj, Tensor):
        obj = obj.to(device, non_blocking=True)
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return tuple(_move(o, device, dtype) for o in obj)
    raise TypeError(f"batch elements must be tensors or tuples of tensors, got {type(obj).__name__}")


class Batches:
    """Re-iterable view of ``data`` as ``(inputs, targets)`` on one device and dtype.

    In-memory data (one batch, or a list/tuple of batches) is moved once; other iterables (a
    DataLoader) are iterated afresh on every pass and each batch moved as it comes.
    """

    def __init__(self, data: Any, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self._loader = None
        if _is_single_batch(data):
            self._cached: list[Batch] | None = [self._prepare(data)]
        elif isinstance(data, (list, tuple)):
            if not data:
                raise ValueError("data is empty: pass an (inputs, targets) batch or a list of them")
            self._cached = [self._prepare(b) for b in data]
        elif isinstance(data, Iterable):
            self._check_loader(data)
            self._cached, self._loader = None, data
        else:
            raise TypeError(
                f"data must be an (inputs, targets) batch or an iterable of such batches, got {type(data).__name__}"
            )

    @staticmethod
    def _check_loader(loader: Iterable) -> None:
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.RandomSampler):
            raise NonDeterministicLossError(
                "data is a shuffling DataLoader: curvature methods make many passes over the data "
                "and need the same batches each time. Build it with shuffle=False."
            )
        if getattr(loader, "drop_last", False):
            raise ValueError(
                "data is a DataLoader with drop_last=True: the last samples would never count. "
                "Build it with drop_last=False (partial batches are weighted correctly)."
            )

    def _prepare(self, batch: Any) -> Batch:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("each batch must be a pair (inputs, targets)")
        inputs, targets = batch
        return _move(inputs, self.device, self.dtype), _move(targets, self.device, self.dtype)

    def __iter__(self) -> Iterator[Batch]:
        if self._cached is not None:
            yield from self._cached
        else:
            assert self._loader is not None
            for batch in self._loader:
                yield self._prepare(batch)

    @property
    def in_memory(self) -> bool:
        return self._cached is not None


def _select(model: nn.Module, params: ParamSelector) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    elif callable(params):
        names = [n for n, p in named.items() if params(n, p)]
    else:
        names = list(params)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise KeyError(f"params: no parameter named {unknown}; the model has {list(named)}")
    if not names:
        raise ValueError("params: the selection is empty; no parameter to differentiate")
    return names


@contextlib.contextmanager
def training_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Set ``model.train(train)`` for the block and restore every submodule's own flag after."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


class ModelLoss:
    """The data-set loss of ``model`` as a function of (a subset of) its parameters.

    Args:
        model: any ``nn.Module``; it is read, never modified.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean loss (scalar).
        data: one ``(inputs, targets)`` batch or an iterable of batches.
        params: which parameters are variables: ``None`` (all with ``requires_grad``), a list of
            names, or a predicate ``f(name, param) -> bool`` such as :func:`weights_only`. The
            others are held fixed at their current values.
        dtype: computing dtype (e.g. ``torch.float64`` for reference values); default: the
            model's parameter dtype. Floating inputs and targets are cast to it.
        train_mode: evaluate with the model in train mode (BN batch statistics, dropout on).
            Default ``False``: eval mode, the deterministic loss of the trained network.
        check_deterministic: evaluate the first batch twice, from two separate passes over the
            data, and raise :class:`NonDeterministicLossError` if the losses differ.

    Attributes:
        names: names of the variable parameters, in the order of flat vectors.
        theta: ``{name: tensor}`` snapshot of the variables (detached, computing dtype).
        num_params: P, the length of flat vectors.
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
    ):
        self.model, self.loss_fn, self.train_mode = model, loss_fn, train_mode
        self.device = model_device(model)
        self.dtype = dtype or model_dtype(model)
        self.names = _select(model, params)
        chosen = set(self.names)

        def snap(t: Tensor) -> Tensor:
            t = t.detach()
            t = t.to(self.dtype) if t.is_floating_point() else t
            return t.clone()

        named = dict(model.named_parameters())
        self.theta: dict[str, Tensor] = {n: snap(named[n]) for n in self.names}
        self.constants: dict[str, Tensor] = {n: snap(p) for n, p in named.items() if n not in chosen}
        self.constants.update({n: snap(b) for n, b in model.named_buffers()})
        self.shapes = [self.theta[n].shape for n in self.names]
        self.numels = [self.theta[n].numel() for n in self.names]
        self.num_params = sum(self.numels)
        self.batches = Batches(data, self.device, self.dtype)
        if check_deterministic:
            self.check_deterministic()

    # --- parameters as flat vectors -------------------------------------------------------
    def flatten(self, tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (dict or sequence in ``names`` order) to ``[..., P]``.

        Leading batch dimensions are kept: tensors of shape ``[K, *shape]`` give ``[K, P]``.
        """
        seq = [tensors[n] for n in self.names] if isinstance(tensors, dict) else list(tensors)
        lead = seq[0].shape[: seq[0].ndim - len(self.shapes[0])]
        return torch.cat([t.reshape(*lead, -1) for t in seq], dim=-1)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split ``[..., P]`` into ``{name: [..., *shape]}`` views (no copy)."""
        lead = vec.shape[:-1]
        parts = torch.split(vec, self.numels, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes)}

    def theta_flat(self) -> Tensor:
        """The snapshot parameters as one flat vector ``[P]``."""
        return self.flatten(self.theta)

    # --- evaluation ------------------------------------------------------------------------
    def forward(self, params: dict[str, Tensor], inputs: Any) -> Tensor:
        """Network outputs at ``params`` (variables only; constants are added here)."""
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return functional_call(self.model, {**self.constants, **params}, args, strict=False)

    def batch_loss(self, params: dict[str, Tensor], inputs: Any, targets: Tensor) -> Tensor:
        """Mean loss of one batch at ``params``; differentiable with ``torch.func``."""
        return self.loss_fn(self.forward(params, inputs), targets)

    def mode(self) -> contextlib.AbstractContextManager:
        """Context in which the model is in the mode measurements use (restored after)."""
        return training_mode(self.model, self.train_mode)

    def weighted_sum(self, per_batch: Callable[[Any, Tensor], Any]) -> Any:
        """``sum_b n_b f(batch_b) / N`` over all data; ``f`` returns a tensor or tuple of tensors.

        The single place that defines how batches are combined into a data-set quantity.
        """
        total, count = None, 0
        with self.mode():
            for inputs, targets in self.batches:
                n = len(targets)
                out = per_batch(inputs, targets)
                out = out if isinstance(out, tuple) else (out,)
                scaled = tuple(o * n for o in out)
                total = scaled if total is None else tuple(a + b for a, b in zip(total, scaled))
                count += n
        if count == 0:
            raise ValueError("data yielded no samples")
        assert total is not None
        result = tuple(t / count for t in total)
        return result if len(result) > 1 else result[0]

    @torch.no_grad()
    def loss(self, params: dict[str, Tensor] | Tensor | None = None) -> float:
        """Data-set mean loss at ``params`` (dict or flat vector; default: the snapshot)."""
        p = self._as_dict(params)
        return float(self.weighted_sum(lambda x, y: self.batch_loss(p, x, y)))

    @torch.no_grad()
    def evaluate(self, params: dict[str, Tensor] | Tensor | None = None) -> tuple[float, float | None]:
        """``(loss, accuracy)`` over the data; accuracy is ``None`` unless outputs are ``[n, C]``
        class scores and targets are integer labels ``[n]``."""
        p = self._as_dict(params)

        def per_batch(x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
            out = self.forward(p, x)
            loss = self.loss_fn(out, y)
            if is_classification(out, y):
                return loss, (out.argmax(-1) == y).to(loss.dtype).mean()
            return loss, torch.full_like(loss, float("nan"))

        loss, acc = self.weighted_sum(per_batch)
        return float(loss), (None if torch.isnan(acc) else float(acc))

    def _as_dict(self, params: dict[str, Tensor] | Tensor | None) -> dict[str, Tensor]:
        if params is None:
            return self.theta
        if isinstance(params, Tensor):
            return self.unflatten(params.to(self.device, self.dtype))
        return params

    def check_deterministic(self) -> None:
        """Raise :class:`NonDeterministicLossError` if the loss of the first batch is not
        reproducible (dropout in train mode, a shuffling or augmenting loader)."""
        values = []
        with torch.no_grad(), self.mode():
            for _ in range(2):
                inputs, targets = next(iter(self.batches))
                values.append(float(self.batch_loss(self.theta, inputs, targets)))
        a, b = values
        rtol = 1e-10 if self.dtype == torch.float64 else 1e-5
        if not abs(a - b) <= rtol * max(abs(a), abs(b)):
            mode = "train" if self.train_mode else "eval"
            raise NonDeterministicLossError(
                f"the loss of the same batch at the same weights changed between two evaluations "
                f"({a!r} vs {b!r}) with the model in {mode} mode. Curvature needs a deterministic "
                "loss: use eval mode (train_mode=False) so dropout is off, and a DataLoader "
                "without shuffling or random augmentation. Pass check_deterministic=False only "
                "if you intend to measure a stochastic objective."
            )


def is_classification(outputs: Tensor, targets: Tensor) -> bool:
    """True when ``outputs`` are ``[n, C]`` scores and ``targets`` integer labels ``[n]``."""
    return (
        outputs.ndim == 2
        and targets.ndim == 1
        and not targets.is_floating_point()
        and outputs.shape[0] == targets.shape[0]
    )
