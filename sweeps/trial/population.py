"""Populations: K models of one shape trained as one stack of tensors.

A *population* is a group of trials that share everything fixing tensor shapes and the code
path, so their parameters can be stacked along a leading member axis ``[K, ...]`` and trained by
one loop (:func:`sweeps.trial.train.train_population`). They may differ in per-model scalars: lr,
momentum, nesterov, weight_decay, betas, the schedule and its parameters, stop targets,
max_epochs, divergence_factor, eval_every_epochs, the trial ``seed`` (initialization and
mini-batch order), the measures and their options.

The data is shared: ``dataset`` (its seed included, since it draws the subsample and the label
noise) is part of :func:`population_key`, so trials on different data seeds form different
populations.

Pieces, each used by the training loop:

* :func:`population_key` / :func:`stack_check`: which trials can be grouped, and why not.
* :class:`StackedParameters`: the trainable parameters of K models in one ``[K, P]`` buffer
  (member-major), with per-parameter views ``[K, *shape]``.
* :func:`make_forward`: the stacked forward ``(params, x) -> outputs [K, B, C]``: batched
  matmuls (``baddbmm``) for plain MLPs, ``vmap`` of ``functional_call`` for other stackable
  modules, and the module itself (``functional_call``) for one model that does not stack.
* :class:`StackedOptimizer`: SGD (momentum, Nesterov, weight decay), Adam and AdamW with
  per-member hyperparameters as ``[K, 1]`` columns; numerically the update of
  :class:`torch.optim.SGD` / :class:`~torch.optim.Adam` / :class:`~torch.optim.AdamW`.
* :class:`Stack`: the three together, with gradient, step, evaluation outputs and ``take``
  (members leave the stack).

Every operation is row-wise: nothing reduces across members, so a NaN stays in its member.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from landscape._functional import training_mode

from ..spec.config import SweepConfig, TrainConfig

# TrainConfig fields that fix the code path or tensor shapes (the rest are per-member scalars).
SHARED_TRAIN_FIELDS = ("optimizer", "batch_size", "loss", "eval_batch_size", "track", "checkpoint")

Forward = Callable[[dict[str, Tensor], Tensor, bool], Tensor]
MemberLoss = Callable[[Tensor, Tensor], Tensor]  # outputs [K, B, C], targets [K, B] -> losses [K]

_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.GELU, nn.ELU, nn.SiLU, nn.Sigmoid, nn.LeakyReLU, nn.Softplus, nn.Identity)


# --- grouping ---------------------------------------------------------------------------
def population_key(config: SweepConfig) -> Hashable:
    """The shape key: trials with equal keys can be trained as one population.

    It is made of the whole ``dataset`` and ``model`` sections, the shared training fields
    (:data:`SHARED_TRAIN_FIELDS`: optimizer kind, batch size, loss, eval_batch_size, track
    settings) and the per-task resources (``cpus_per_trial``, ``gpus_per_trial``, ``compile``). Device and
    dtype are the task's (one per task), not a trial's.
    """
    train = config.train.model_dump(mode="json", include=set(SHARED_TRAIN_FIELDS))
    parts = {
        "dataset": config.dataset.model_dump(mode="json"),
        "model": config.model.model_dump(mode="json"),
        "train": train,
        "resources": config.resources.model_dump(mode="json", include={"cpus_per_trial", "gpus_per_trial", "compile"}),
    }
    return json.dumps(parts, sort_keys=True)


def stack_check(config: SweepConfig) -> str | None:
    """``None`` when the model of ``config`` can be trained in a stack of K > 1 members, else a
    one-line reason. Built-in models stack unless they have batch norm or dropout; a factory
    model (``package.module:factory``) is built on the dataset's input shape and must pass
    :func:`module_stack_reason`."""
    cfg = config.model
    if cfg.batch_norm:
        return "model.batch_norm: batch norm in train mode keeps running statistics per module"
    if cfg.dropout:
        return "model.dropout: the members' dropout masks would come from one random stream"
    if ":" not in cfg.name:
        return None
    from .data import load_dataset
    from .models import build_model

    data = load_dataset(config.dataset)
    model = build_model(cfg, data.input_shape, data.num_classes, seed=config.seed)
    return module_stack_reason(model, data.x_train[:4])


def module_stack_reason(model: nn.Module, example: Tensor | None = None) -> str | None:
    """``None`` if K copies of ``model`` train correctly as one stack, else why not.

    Structural checks (batch norm, dropout, frozen parameters), then, given an ``example``
    input batch, a functional check: the stacked forward of two differently perturbed copies
    must equal each copy's own forward.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"{name or 'model'}: batch norm in train mode keeps running statistics per module"
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return f"{name or 'model'}: dropout masks would come from one random stream"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        return f"{frozen[0]}: frozen parameters are not stacked"
    if example is None:
        return None
    try:
        params = StackedParameters.from_models([model, model])
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            params.flat[1] += 0.01 * torch.randn(params.flat.shape[1], generator=gen).to(params.flat)
            stacked = make_forward(model, 2)(params.views(), example.unsqueeze(0).expand(2, *example.shape), False)
            alone = [functional_call(model, params.member(k), (example,)) for k in range(2)]
        if not all(torch.allclose(stacked[k], alone[k], rtol=1e-4, atol=1e-5) for k in range(2)):
            return "the stacked forward differs from the model's own forward"
    except Exception as err:  # any failure of the check is a reason not to stack
        return f"the stacked forward fails: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


# --- parameters -------------------------------------------------------------------------
class StackedParameters:
    """Trainable parameters of K models with the same named shapes in one buffer ``flat``
    ``[K, P]`` (row k = member k, parameters concatenated in ``named_parameters`` order)."""

    def __init__(self, flat: Tensor, names: Sequence[str], shapes: Sequence[torch.Size]):
        self.flat, self.names, self.shapes = flat, list(names), list(shapes)
        self.sizes = [math.prod(s) for s in shapes]
        self._grad: tuple[Tensor, list[Tensor]] | None = None  # gradient buffer and its views

    @classmethod
    def from_models(cls, models: Sequence[nn.Module]) -> StackedParameters:
        named = [[(n, p) for n, p in m.named_parameters() if p.requires_grad] for m in models]
        names, shapes = [n for n, _ in named[0]], [p.shape for _, p in named[0]]
        for k, members in enumerate(named[1:], 1):
            if [n for n, _ in members] != names or [p.shape for _, p in members] != shapes:
                raise ValueError(f"models[{k}]: its parameters differ in names or shapes from models[0]'s")
        with torch.no_grad():
            flat = torch.stack([torch.cat([p.reshape(-1) for _, p in members]) for members in named])
        return cls(flat, names, shapes)

    def __len__(self) -> int:
        return len(self.flat)

    def views(self, flat: Tensor | None = None) -> dict[str, Tensor]:
        """``{name: [K, *shape]}`` views into ``flat`` (default: the parameters)."""
        flat = self.flat if flat is None else flat
        parts = torch.split(flat, self.sizes, dim=1)
        return {n: part.view(len(flat), *s) for n, part, s in zip(self.names, parts, self.shapes)}

    def leaves(self) -> dict[str, Tensor]:
        """Views ``[K, *shape]`` that autograd differentiates (leaves sharing ``flat``'s memory,
        so in-place updates of ``flat`` are seen by the next forward)."""
        return {n: v.detach().requires_grad_() for n, v in self.views().items()}

    def member(self, k: int) -> dict[str, Tensor]:
        """``{name: [*shape]}`` views of member ``k``."""
        return {n: v[k] for n, v in self.views().items()}

    def take(self, rows: Sequence[int]) -> None:
        """Keep only the members ``rows`` (in that order)."""
        self.flat = self.flat[torch.as_tensor(rows, dtype=torch.long, device=self.flat.device)]
        self._grad = None

    def flat_grad(self, grads: Sequence[Tensor]) -> Tensor:
        """Per-parameter gradients ``[K, *shape]`` -> ``[K, P]``, in a buffer that the next
        call overwrites (one ``_foreach_copy_``, as :mod:`torch.optim` batches its updates)."""
        if self._grad is None:
            buffer = torch.empty_like(self.flat)
            self._grad = (buffer, list(self.views(buffer).values()))
        torch._foreach_copy_(self._grad[1], list(grads))
        return self._grad[0]

    @torch.no_grad()
    def write_to(self, model: nn.Module, k: int) -> None:
        """Copy member ``k``'s parameters into ``model``."""
        for name, value in self.member(k).items():
            model.get_parameter(name).copy_(value)


# --- forward ----------------------------------------------------------------------------
def _mlp_layers(model: nn.Module) -> list[tuple[str, Any]] | None:
    """``nn.Sequential`` of [Flatten], Linear and elementwise activations, as a plan of
    ``("linear", (weight, bias-or-None))`` / ``("act", module)`` steps; else ``None``."""
    if not isinstance(model, nn.Sequential):
        return None
    plan: list[tuple[str, Any]] = []
    for i, (name, layer) in enumerate(model.named_children()):
        if isinstance(layer, nn.Flatten) and i == 0 and layer.start_dim == 1 and layer.end_dim == -1:
            plan.append(("flatten", None))
        elif isinstance(layer, nn.Linear) and all(p.requires_grad for p in layer.parameters()):
            plan.append(("linear", (f"{name}.weight", None if layer.bias is None else f"{name}.bias")))
        elif isinstance(layer, _ELEMENTWISE):
            plan.append(("act", layer))
        else:
            return None
    return plan if any(kind == "linear" for kind, _ in plan) else None


def make_forward(model: nn.Module, k: int) -> Forward:
    """The stacked forward of K copies of ``model``: ``forward(params, x, shared)`` with
    ``params`` ``{name: [K, *shape]}`` and ``x`` ``[K, B, ...]`` (one batch per member) or,
    with ``shared=True``, ``[B, ...]`` (the same batch for all); returns ``[K, B, C]``.

    Plain MLPs (``nn.Sequential`` of Flatten, Linear, elementwise activations) use batched
    matmuls (``baddbmm``; faster than ``vmap`` on a CPU, see ``benchmarks/population.md``);
    K = 1 of any other model calls the module itself (batch norm and dropout as usual); K > 1
    of a stackable model uses ``vmap`` over ``functional_call``.
    """
    plan = _mlp_layers(model)
    if plan is not None:
        return _mlp_forward(plan)
    if k == 1:

        def single(params: dict[str, Tensor], x: Tensor, shared: bool) -> Tensor:
            return functional_call(model, {n: p[0] for n, p in params.items()}, (x if shared else x[0],)).unsqueeze(0)

        return single

    def one(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, params, (x,))

    stacked = torch.func.vmap(one, in_dims=(0, 0))
    broadcast = torch.func.vmap(one, in_dims=(0, None))
    return lambda params, x, shared: (broadcast if shared else stacked)(params, x)


def _mlp_forward(plan: list[tuple[str, Any]]) -> Forward:
    """Activations are kept feature-major, ``[K, features, B]``: ``W @ h`` gives weight
    gradients in the parameters' own layout (no transposed copies), and a shared batch meets
    all members' first-layer weights in one matmul."""

    def forward(params: dict[str, Tensor], x: Tensor, shared: bool) -> Tensor:
        h = x.mT
        for kind, what in plan:
            if kind == "flatten":
                h = (x.flatten(1) if shared else x.flatten(2)).mT
            elif kind == "act":
                h = what(h)
            else:
                weight, bias = params[what[0]], what[1] and params[what[1]]
                if shared:  # [K, out, in] @ [in, B]: one matmul over all members
                    h = torch.matmul(weight, h) if bias is None else torch.matmul(weight, h) + bias.unsqueeze(-1)
                    shared = False
                else:
                    h = torch.bmm(weight, h) if bias is None else torch.baddbmm(bias.unsqueeze(-1), weight, h)
        return h.mT

    return forward


def evaluation(model: nn.Module, forward: Forward) -> contextlib.AbstractContextManager:
    """Eval mode for the module-calling forward of :func:`make_forward`; stacked forwards have
    no mode (their models have neither batch norm nor dropout)."""
    return training_mode(model, False) if _mlp_layers(model) is None else contextlib.nullcontext()


# --- optimizer --------------------------------------------------------------------------
class StackedOptimizer:
    """Per-member SGD / Adam / AdamW on ``[K, P]`` parameters, as :mod:`torch.optim` computes
    them (SGD: weight decay added to the gradient, momentum buffer started at the first
    gradient, Nesterov ``g + m * buf``; Adam: bias-corrected moments, ``eps = 1e-8``, weight
    decay added to the gradient; AdamW: decoupled decay ``p *= 1 - lr * wd`` first).

    Args:
        cfgs: one :class:`TrainConfig` per member (same ``optimizer``).
        like: a tensor with the parameters' dtype and device.
    """

    eps = 1e-8

    def __init__(self, cfgs: Sequence[TrainConfig], like: Tensor):
        self.kind = cfgs[0].optimizer
        self.steps = 0
        col = lambda values: torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1)  # noqa: E731
        self.col = col
        self.weight_decay = col([c.weight_decay for c in cfgs])
        self.momentum = col([c.momentum for c in cfgs])
        self.nesterov = torch.tensor([c.nesterov and c.momentum > 0 for c in cfgs], device=like.device).view(-1, 1)
        self.betas = [tuple(c.betas) for c in cfgs]
        self.beta1, self.beta2 = col([b[0] for b in self.betas]), col([b[1] for b in self.betas])
        self.state: dict[str, Tensor] = {}
        self._lr: tuple[list[float], Tensor] = ([], like.new_empty(0))
        self._flags()

    def _flags(self) -> None:
        """Skip the terms no member uses (a zero weight decay, Nesterov nowhere or everywhere)."""
        self.decay = bool(self.weight_decay.any())
        self.nesterov_all = bool(self.nesterov.all())
        self.nesterov_any = bool(self.nesterov.any())
        self.heavy_ball = bool(self.momentum.any())

    def _lr_column(self, lrs: Sequence[float]) -> Tensor:
        if self._lr[0] != list(lrs):  # constant schedules: built once
            self._lr = (list(lrs), self.col(lrs))
        return self._lr[1]

    def take(self, rows: Sequence[int]) -> None:
        """Keep only the members ``rows`` (hyperparameters and state)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.momentum.device)
        for name in ("weight_decay", "momentum", "nesterov", "beta1", "beta2"):
            setattr(self, name, getattr(self, name)[index])
        self.betas = [self.betas[r] for r in rows]
        self.state = {k: v[index] for k, v in self.state.items()}
        self._lr = ([], self._lr[1])
        self._flags()

    @torch.no_grad()
    def step(self, flat: Tensor, grad: Tensor, lrs: Sequence[float]) -> None:
        """One update of ``flat`` [K, P] in place with gradient ``grad`` [K, P] and the
        members' current learning rates ``lrs``."""
        self.steps += 1
        lr = self._lr_column(lrs)
        g = torch.addcmul(grad, self.weight_decay, flat) if self.decay and self.kind != "adamw" else grad
        if self.kind == "sgd" and not self.heavy_ball:
            flat.addcmul_(lr, g, value=-1)
            return
        if self.kind == "sgd":
            buf = self.state.get("momentum_buffer")
            buf = self.state["momentum_buffer"] = g.clone() if buf is None else buf.mul_(self.momentum).add_(g)
            if self.nesterov_any:
                nesterov = g + self.momentum * buf
                buf = nesterov if self.nesterov_all else torch.where(self.nesterov, nesterov, buf)
            flat.addcmul_(lr, buf, value=-1)
            return
        if self.kind == "adamw" and self.decay:
            flat.mul_(1 - lr * self.weight_decay)
        if "exp_avg" not in self.state:
            self.state["exp_avg"], self.state["exp_avg_sq"] = torch.zeros_like(flat), torch.zeros_like(flat)
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        m.lerp_(g, 1 - self.beta1)
        v.mul_(self.beta2).add_(g * g * (1 - self.beta2))
        t = self.steps
        step_size = self.col([a / (1 - b1**t) for a, (b1, _) in zip(lrs, self.betas)])
        bc2_sqrt = self.col([(1 - b2**t) ** 0.5 for _, b2 in self.betas])
        flat.sub_(step_size * (m / (v.sqrt() / bc2_sqrt).add_(self.eps)))


# --- the three together -------------------------------------------------------------------
class Stack:
    """K models of one shape as one (row k = member k): their :class:`StackedParameters`,
    :class:`StackedOptimizer` state and stacked forward. The models are not written to until
    :meth:`write_to`."""

    def __init__(self, models: Sequence[nn.Module], cfgs: Sequence[TrainConfig]):
        self.models = list(models)
        self.params = StackedParameters.from_models(self.models)
        self.optimizer = StackedOptimizer(cfgs, self.params.flat)
        self._restacked()

    def __len__(self) -> int:
        return len(self.models)

    def _restacked(self) -> None:
        self.forward = make_forward(self.models[0], len(self.models)) if self.models else None
        self.leaves = self.params.leaves()

    def take(self, rows: Sequence[int]) -> None:
        """Keep only the members ``rows`` (in that order): the others stop costing anything."""
        self.params.take(rows)
        self.optimizer.take(rows)
        self.models = [self.models[r] for r in rows]
        self._restacked()

    def gradient(
        self, loss_fn: MemberLoss, x: Tensor, y: Tensor, *, shared: bool = False, weight: float = 1.0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(gradient [K, P] of weight * loss, losses [K], outputs [K, B, C])`` on ``x``
        (``[K, B, ...]``, or ``[B, ...]`` for all with ``shared``) and ``y [K, B]``, in the
        models' current mode. The gradient is a buffer that the next call overwrites."""
        assert self.forward is not None
        out = self.forward(self.leaves, x, shared)
        losses = loss_fn(out, y)
        grads = torch.autograd.grad((losses * weight).sum(), list(self.leaves.values()))
        return self.params.flat_grad(grads), losses.detach(), out.detach()

    def step(self, grad: Tensor, lrs: Sequence[float]) -> None:
        """One optimizer step of every member with the learning rates ``lrs``."""
        self.optimizer.step(self.params.flat, grad, lrs)

    @torch.no_grad()
    def outputs(self, rows: Sequence[int], x: Tensor) -> Tensor:
        """Outputs ``[len(rows), B, C]`` of the members ``rows`` (increasing) on the shared
        batch ``x [B, ...]``, in eval mode."""
        rows = list(rows)
        whole = len(rows) == len(self)
        if whole:
            assert self.forward is not None
            forward = self.forward
        else:
            forward = make_forward(self.models[rows[0]], len(rows))
        views = self.params.views(self.params.flat if whole else self.params.flat[rows])
        with evaluation(self.models[rows[0]], forward):
            return forward(views, x, True)

    def write_to(self, row: int) -> None:
        """Copy member ``row``'s parameters into its model."""
        self.params.write_to(self.models[row], row)
