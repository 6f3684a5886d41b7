"""sweeps.trial.models: every model builds for its inputs, is seeded, scales with width, trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sweeps.spec.config import ConfigError, ModelConfig
from sweeps.trial.models import MODELS, build_model, count_parameters


def tiny_factory(input_shape, num_classes, hidden=5):
    """A custom model for the import-path test (``test_models:tiny_factory``)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(int(torch.tensor(input_shape).prod()), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


CASES = [  # name, input shape, small config
    ("mlp", (40,), dict(width=16)),
    ("mlp", (1, 8, 8), dict(width=16, batch_norm=True, dropout=0.1)),
    ("cnn1d", (40,), dict(width=8)),
    ("cnn", (1, 8, 8), dict(width=4)),
    ("cnn", (3, 12, 12), dict(width=4, batch_norm=True)),
    ("nin", (3, 12, 12), dict(width=8)),
    ("resnet", (3, 12, 12), dict(width=4, batch_norm=True)),
    ("resnet", (1, 8, 8), dict(width=4, depth=2)),
]


@pytest.mark.parametrize("name, shape, kw", CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}" for c in CASES])
def test_builds_and_learns_a_few_steps(name, shape, kw, single_thread):
    model = build_model(ModelConfig(name=name, **kw), shape, 3, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, *shape, generator=g), torch.randint(0, 3, (24,), generator=g)
    assert model(x).shape == (24, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.eval()
    with torch.no_grad():
        first = float(F.cross_entropy(model(x), y))
    model.train()
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < first  # memorizes a tiny batch


def test_seeded_initialization_leaves_global_rng_alone():
    cfg = ModelConfig(name="mlp", width=8)
    state = torch.random.get_rng_state()
    a, b, c = (build_model(cfg, (4,), 2, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_width_multiplier_and_depth_change_size():
    base = count_parameters(build_model(ModelConfig(name="mlp", width=10), (4,), 2))
    assert base == 4 * 10 + 10 + 10 * 10 + 10 + 10 * 2 + 2
    assert count_parameters(
        build_model(ModelConfig(name="mlp", width=10, width_multiplier=2), (4,), 2)
    ) == count_parameters(build_model(ModelConfig(name="mlp", width=20), (4,), 2))
    assert count_parameters(build_model(ModelConfig(name="mlp", width=10, depth=3), (4,), 2)) == base + 110
    small, big = (
        count_parameters(build_model(ModelConfig(name="resnet", width=4, width_multiplier=m), (3, 8, 8), 10))
        for m in (1, 2)
    )
    assert 3 < big / small < 4.2  # conv weights grow ~ width^2


def test_activation_batch_norm_dropout_are_used():
    model = build_model(ModelConfig(name="mlp", width=8, activation="tanh", batch_norm=True, dropout=0.5), (4,), 2)
    kinds = {type(m) for m in model.modules()}
    assert {nn.Tanh, nn.BatchNorm1d, nn.Dropout} <= kinds and nn.ReLU not in kinds


def test_custom_factory_by_import_path():
    model = build_model(ModelConfig(name="test_models:tiny_factory", kwargs={"hidden": 7}), (2, 3), 4)
    assert model[1].out_features == 7 and model(torch.randn(5, 2, 3)).shape == (5, 4)


def test_shape_mismatch_and_stray_kwargs_are_config_errors():
    with pytest.raises(
        ConfigError, match=r"model.name: 'resnet' needs image inputs \[C, H, W\]; the dataset gives \[40\]"
    ):
        build_model(ModelConfig(name="resnet"), (40,), 10)
    with pytest.raises(ConfigError, match=r"model.name: 'cnn1d' needs inputs \[L\] or \[C, L\]"):
        build_model(ModelConfig(name="cnn1d"), (3, 8, 8), 10)
    with pytest.raises(ConfigError, match="model.kwargs: only custom factory models take kwargs"):
        build_model(ModelConfig(name="mlp", kwargs={"x": 1}), (4,), 2)


def test_registry_lists_all_models():
    assert {"mlp", "cnn1d", "cnn", "nin", "resnet"} <= set(MODELS)
