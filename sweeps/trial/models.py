"""Models by name, each a builder registered in :data:`MODELS` with :func:`register_model`.

===========  ============  ====================================================================
name         inputs        architecture (``width`` default, ``depth`` default)
===========  ============  ====================================================================
``mlp``      any           flatten, ``depth`` x [Linear(width), (BN), act, (dropout)], Linear (256, 2)
``cnn1d``    ``[L]``,      ``depth`` x [Conv1d(width, k=5, stride 2), (BN), act], flatten, (dropout),
             ``[C, L]``    Linear; the MNIST-1D CNN (32, 3)
``cnn``      ``[C, H, W]`` ``depth`` x [Conv3x3(width * 2^i), (BN), act, maxpool 2], global
                           average pool, (dropout), Linear (32, 3)
``nin``      ``[C, H, W]`` Network-in-Network: ``depth`` x [Conv3x3, Conv1x1, Conv1x1 (width), act,
                           stride-2 conv between blocks], Conv1x1 to classes, global average
                           pool (96, 2)
``resnet``   ``[C, H, W]`` ResNet: Conv3x3 stem, 3 stages (width, 2 width, 4 width) of ``depth``
                           basic blocks, global average pool, Linear (16, 1 -> ResNet-8)
===========  ============  ====================================================================

``width_multiplier`` scales every width (rounded, at least 1). ``batch_norm`` and ``dropout``
apply to all built-in models. A custom model is ``name: "package.module:factory"``; it is called
as ``factory(input_shape=..., num_classes=..., **model.kwargs)`` and must return an
``nn.Module``. Initialization is seeded by :func:`build_model`'s ``seed`` without touching the
global RNG state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..spec.errors import ConfigError
from ..spec.imports import import_object

if TYPE_CHECKING:  # annotations only: config.py imports this module to check model names
    from ..spec.config import ModelConfig

Builder = Callable[["ModelConfig", tuple[int, ...], int], nn.Module]
MODELS: dict[str, Builder] = {}

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(cfg, input_shape, num_classes) -> nn.Module``."""

    def deco(fn: Builder) -> Builder:
        MODELS[name] = fn
        return fn

    return deco


def resolve_factory(path: str) -> Callable[..., nn.Module]:
    """``"package.module:factory"`` -> the callable (``ValueError`` naming the problem)."""
    obj = import_object(path)
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")
    return obj


def _width(cfg: ModelConfig, default: int) -> int:
    return max(1, round((cfg.width or default) * cfg.width_multiplier))


def _act(cfg: ModelConfig) -> nn.Module:
    return _ACTIVATIONS[cfg.activation]()


def _norm(cfg: ModelConfig, channels: int, dims: int) -> nn.Module:
    if not cfg.batch_norm:
        return nn.Identity()
    return {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](channels)


def _dropout(cfg: ModelConfig) -> nn.Module:
    return nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()


def _need_image(cfg: ModelConfig, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3:
        raise ConfigError(
            f"model.name: {cfg.name!r} needs image inputs [C, H, W]; the dataset gives "
            f"{list(input_shape)}: use mlp or cnn1d (got {cfg.name!r})"
        )


@register_model("mlp")
def mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    width, depth = _width(cfg, 256), cfg.depth or 2
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), _norm(cfg, width, 1), _act(cfg), _dropout(cfg)]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


@register_model("cnn1d")
def cnn1d(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) not in (1, 2):
        raise ConfigError(
            f"model.name: 'cnn1d' needs inputs [L] or [C, L]; the dataset gives {list(input_shape)} (got 'cnn1d')"
        )
    width, depth = _width(cfg, 32), cfg.depth or 3
    channels, length = (1, input_shape[0]) if len(input_shape) == 1 else input_shape
    layers: list[nn.Module] = [nn.Unflatten(1, (1, length))] if len(input_shape) == 1 else []
    for _ in range(depth):
        layers += [nn.Conv1d(channels, width, 5, stride=2, padding=2), _norm(cfg, width, 1), _act(cfg)]
        channels, length = width, (length + 1) // 2
    layers += [nn.Flatten(), _dropout(cfg), nn.Linear(channels * length, num_classes)]
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


def _head(cfg: ModelConfig, channels: int, num_classes: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), _dropout(cfg), nn.Linear(channels, num_classes)]


@register_model("cnn")
def cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    _need_image(cfg, input_shape)
    width, depth = _width(cfg, 32), cfg.depth or 3
    channels, size = input_shape[0], min(input_shape[1:])
    layers: list[nn.Module] = []
    for i in range(depth):
        out = width * 2 ** min(i, 2)
        layers += [nn.Conv2d(channels, out, 3, padding=1), _norm(cfg, out, 2), _act(cfg)]
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        channels = out
    layers += _head(cfg, channels, num_classes)
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


@register_model("nin")
def nin(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    _need_image(cfg, input_shape)
    width, depth = _width(cfg, 96), cfg.depth or 2
    channels = input_shape[0]
    layers: list[nn.Module] = []
    for i in range(depth):
        stride = 2 if i > 0 else 1
        for conv in (
            nn.Conv2d(channels, width, 3, stride=stride, padding=1),
            nn.Conv2d(width, width, 1),
            nn.Conv2d(width, width, 1),
        ):
            layers += [conv, _norm(cfg, width, 2), _act(cfg)]
        channels = width
    layers += [_dropout(cfg), nn.Conv2d(channels, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cfg: ModelConfig, channels_in: int, channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels, 3, stride=stride, padding=1, bias=not cfg.batch_norm),
            _norm(cfg, channels, 2),
            _act(cfg),
            nn.Conv2d(channels, channels, 3, padding=1, bias=not cfg.batch_norm),
            _norm(cfg, channels, 2),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels, 1, stride=stride, bias=False), _norm(cfg, channels, 2)
            )
        self.act = _act(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


@register_model("resnet")
def resnet(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    _need_image(cfg, input_shape)
    width, depth = _width(cfg, 16), cfg.depth or 1
    layers: list[nn.Module] = [
        nn.Conv2d(input_shape[0], width, 3, padding=1, bias=not cfg.batch_norm),
        _norm(cfg, width, 2),
        _act(cfg),
    ]
    channels = width
    for stage in range(3):
        out = width * 2**stage
        for block in range(depth):
            layers.append(BasicBlock(cfg, channels, out, stride=2 if stage > 0 and block == 0 else 1))
            channels = out
    layers += _head(cfg, channels, num_classes)
    return nn.Sequential(*layers)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """Build the model named by ``cfg`` with initialization seeded by ``seed``.

    The global RNG state is left as it was. Raises :class:`~sweeps.spec.errors.ConfigError` when
    the model does not fit the data (e.g. a CNN on flat inputs).
    """
    input_shape = tuple(int(d) for d in input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if ":" in cfg.name:
            model = resolve_factory(cfg.name)(input_shape=input_shape, num_classes=num_classes, **cfg.kwargs)
            if not isinstance(model, nn.Module):
                raise TypeError(f"model.name: factory {cfg.name!r} returned {type(model).__name__}, not an nn.Module")
            return model
        if cfg.kwargs:
            raise ConfigError(
                f"model.kwargs: only custom factory models take kwargs; {cfg.name!r} does not (got {cfg.kwargs})"
            )
        return MODELS[cfg.name](cfg, input_shape, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODELS", "register_model", "build_model", "resolve_factory", "count_parameters"]
