"""landscape.directions: normalization, seeding, toward-model and trajectory-PCA directions."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

from landscape import ModelLoss
from landscape.directions import (
    as_flat,
    direction_to,
    normalize_direction,
    pca_directions,
    random_directions,
    stable_seed,
)


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))


def test_filter_normalization_matches_each_filter_norm():
    torch.manual_seed(0)
    model = conv_net()
    (d,) = random_directions(model, seed=3)
    named = dict(model.named_parameters())
    for name, w in named.items():
        if w.ndim <= 1:
            assert torch.count_nonzero(d[name]) == 0, f"{name}: 1-D parameters get a zero direction"
            continue
        dims = tuple(range(1, w.ndim))
        torch.testing.assert_close(
            torch.linalg.vector_norm(d[name], dim=dims), torch.linalg.vector_norm(w.detach(), dim=dims)
        )
        # a rescaled Gaussian, not the weights themselves
        assert not torch.allclose(d[name], w.detach())


def test_layer_and_none_normalization_and_one_d_modes():
    torch.manual_seed(0)
    model = conv_net()
    named = {n: p.detach() for n, p in model.named_parameters()}
    (raw,) = random_directions(model, seed=1, normalization="none", one_d="keep")
    (layer,) = random_directions(model, seed=1, normalization="layer", one_d="keep")
    (filt,) = random_directions(model, seed=1, normalization="filter", one_d="filter")
    for n, w in named.items():
        torch.testing.assert_close(layer[n].norm(), w.norm())
        if w.norm() == 0:  # batch-norm shift at init: a zero-norm weight gets a zero direction
            assert torch.count_nonzero(layer[n]) == 0
            continue
        torch.testing.assert_close(layer[n] / layer[n].norm(), raw[n] / raw[n].norm())
    bias = "0.bias"
    torch.testing.assert_close(filt[bias].abs(), named[bias].abs())
    torch.testing.assert_close(torch.sign(filt[bias]), torch.sign(raw[bias]))


def test_same_name_shape_seed_gives_same_direction_across_models():
    torch.manual_seed(0)
    a = conv_net()
    torch.manual_seed(1)
    b = conv_net()
    (da,) = random_directions(a, seed=7, normalization="none", one_d="keep")
    (db,) = random_directions(b, seed=7, normalization="none", one_d="keep")
    (dc,) = random_directions(b, seed=8, normalization="none", one_d="keep")
    for n in da:
        assert torch.equal(da[n], db[n])
        assert not torch.allclose(da[n], dc[n])
    # filter-normalized directions differ only by the per-filter scale of each model's weights
    (fa,) = random_directions(a, seed=7)
    (fb,) = random_directions(b, seed=7)
    w = "4.weight"
    torch.testing.assert_close(fa[w] / fa[w].norm(dim=1, keepdim=True), fb[w] / fb[w].norm(dim=1, keepdim=True))
    # the first of several directions is the single direction; the second differs
    d1, d2 = random_directions(a, 2, seed=7, normalization="none", one_d="keep")
    assert all(torch.equal(d1[n], da[n]) for n in da)
    assert not torch.allclose(d2[w], d1[w])


def test_stable_seed_is_a_sha256_of_name_shape_seed():
    expected = int.from_bytes(hashlib.sha256(b"fc.weight|(3, 4)|5|0").digest()[:8], "little") & (2**63 - 1)
    assert stable_seed("fc.weight", torch.Size([3, 4]), 5) == expected
    assert stable_seed("fc.weight", (3, 4), 5, 1) != expected


def test_direction_to_lands_on_the_other_model():
    torch.manual_seed(0)
    a, b = conv_net(), conv_net()
    d = direction_to(a, b)
    for n, p in a.named_parameters():
        torch.testing.assert_close(p.detach() + d[n], dict(b.named_parameters())[n].detach())
    d_state = direction_to(a, b.state_dict())
    assert all(torch.equal(d[n], d_state[n]) for n in d)
    with pytest.raises(KeyError, match="model_b"):
        direction_to(a, nn.Sequential(nn.Conv2d(2, 4, 3)))
    wrong_shape = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 5))
    with pytest.raises(ValueError, match="model_b.*shape"):
        direction_to(a, wrong_shape)


def test_pca_recovers_a_trajectory_in_a_known_plane():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    ml = ModelLoss(model, nn.MSELoss(), (torch.zeros(1, 6), torch.zeros(1, 2)))
    final = ml.theta_flat().double()
    basis, _ = torch.linalg.qr(torch.randn(ml.num_params, 2, dtype=torch.float64))
    t = torch.linspace(0, 1, 12, dtype=torch.float64)
    path_2d = torch.stack([3 * (1 - t) ** 2, torch.sin(4 * t) * (1 - t)], 1)  # ends at (0, 0)
    trajectory = []
    for point in path_2d:
        w = ml.unflatten((final + basis @ point).float())
        trajectory.append({n: w[n].clone() for n in w})
    before = snapshot(model)
    for center in (False, True):
        pca = pca_directions(model, trajectory, center=center)
        found = torch.stack([ml.flatten(d).double() for d in pca.directions], 1)
        # orthonormal, and the same plane: projecting the true basis onto it keeps its norm
        torch.testing.assert_close(found.T @ found, torch.eye(2, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(
            torch.linalg.norm(found.T @ basis, dim=0), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0
        )
        assert pca.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-6)
        assert pca.explained_variance_ratio[0] >= pca.explained_variance_ratio[1]
        # coordinates reproduce the path (up to rotation within the plane), and it ends at 0
        rebuilt = torch.as_tensor(pca.coords) @ found.T
        torch.testing.assert_close(rebuilt, (basis @ path_2d.T).T, atol=1e-5, rtol=0)
        assert np.allclose(pca.coords[-1], 0, atol=1e-6)
        assert np.all(pca.coords[0] <= 0)
    assert_unchanged(model, before)


def test_pca_explained_variance_below_one_with_a_third_component():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    w = model.weight.detach()
    traj = [{"weight": w + torch.randn_like(w) * s, "bias": model.bias.detach()} for s in (1.0, 0.5, 0.3, 0.1)]
    pca = pca_directions(model, traj)
    assert 0 < pca.explained_variance_ratio.sum() < 1
    with pytest.raises(ValueError, match="trajectory"):
        pca_directions(model, [dict(model.named_parameters())] * 3)


def test_model_unchanged_and_bad_arguments():
    torch.manual_seed(0)
    model = conv_net().train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[4].bias.requires_grad_(False)
    before = snapshot(model)
    random_directions(model, 2, seed=0)
    direction_to(model, conv_net())
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="normalization"):
        random_directions(model, normalization="filters")
    with pytest.raises(ValueError, match="one_d"):
        random_directions(model, one_d="skip")
    with pytest.raises(ValueError, match="count"):
        random_directions(model, 0)
    with pytest.raises(ValueError, match="shape"):
        normalize_direction({"0.weight": torch.ones(3)}, dict(model.named_parameters()))


def test_as_flat_checks_names_and_shapes():
    model = nn.Linear(3, 2)
    ml = ModelLoss(model, nn.MSELoss(), (torch.zeros(1, 3), torch.zeros(1, 2)))
    d = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
    assert as_flat([d], ml).shape == (1, 8)
    with pytest.raises(KeyError, match="missing"):
        as_flat([{"weight": torch.ones(2, 3)}], ml)
    with pytest.raises(ValueError, match=r"\[8\]"):
        as_flat([torch.ones(7)], ml)
