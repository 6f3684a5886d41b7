"""The batched evaluator: points and parameter sets against brute force (copy the model, set its
weights, evaluate), with and without the first-layer affine trick."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from landscape import ModelLoss, evaluate
from landscape.directions import as_flat, random_directions
from landscape.evaluate import _Network, first_linear, loss_at_parameters, loss_at_points

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def brute_force(model, loss_fn, batches, names, flat_points):
    """Per point: a copy of the model with its selected weights set, evaluated batch by batch."""
    losses, accs = [], []
    for w in flat_points:
        moved = copy.deepcopy(model).eval()
        named = dict(moved.named_parameters())
        with torch.no_grad():
            for n, part in zip(names, torch.split(w, [named[n].numel() for n in names])):
                named[n].copy_(part.reshape(named[n].shape))
            total = correct = count = 0.0
            for x, y in batches:
                out = moved(x)
                total += len(y) * float(loss_fn(out, y))
                correct += float((out.argmax(-1) == y).sum())
                count += len(y)
        losses.append(total / count)
        accs.append(correct / count)
    return np.array(losses), np.array(accs)


def network(first_bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 7, bias=first_bias), nn.Tanh(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3)
    ).to(F64)


def data(sizes=(9, 8)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 2, 3, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


@pytest.mark.parametrize(
    "first_bias, params",
    [
        (True, None),  # every parameter varied
        (False, None),  # no first bias
        (True, lambda n, p: n != "1.bias"),  # first bias held fixed
        (True, lambda n, p: not n.startswith("1.")),  # first layer held fixed entirely
    ],
)
def test_affine_first_layer_matches_brute_force(first_bias, params, monkeypatch):
    monkeypatch.setattr(evaluate, "AFFINE_MIN_RATIO", 1)  # 6 inputs >= 1 x 3 basis terms: trick on
    model, batches, loss_fn = network(first_bias), data(), nn.CrossEntropyLoss()
    ml = ModelLoss(model, loss_fn, batches, params=params)
    assert first_linear(ml)[0] == 1  # the trick applies (after the Flatten)
    D = as_flat(random_directions(model, 2, seed=3, params=ml.names, one_d="keep"), ml)
    assert _Network(ml, D).split == 1
    coords = np.array([[0.0, 0.0], [0.7, -0.3], [-1.0, 0.5], [0.2, 1.3]])
    loss, acc = loss_at_points(ml, D, coords, chunk_size=1, micro_batch=4)  # one-point passes: the trick
    expected_loss, expected_acc = brute_force(
        model, loss_fn, batches, ml.names, ml.theta_flat() + torch.as_tensor(coords) @ D
    )
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
    np.testing.assert_allclose(acc, expected_acc, rtol=0, atol=1e-12)
    vmapped, _ = loss_at_points(ml, D, coords, chunk_size=3)  # no trick on vmapped chunks
    np.testing.assert_allclose(vmapped, expected_loss, rtol=1e-12)


def test_float32_trick_and_loader_and_three_directions(monkeypatch):
    monkeypatch.setattr(evaluate, "AFFINE_MIN_RATIO", 1)
    model, loss_fn = network().float(), nn.CrossEntropyLoss()
    batches = [(x.float(), y) for x, y in data((12, 5, 7))]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])),
        batch_size=10,
    )
    ml = ModelLoss(model, loss_fn, loader)
    D = as_flat(random_directions(model, 3, seed=1), ml)
    coords = torch.randn(6, 3, generator=torch.Generator().manual_seed(2)).numpy()
    loss, acc = loss_at_points(ml, D, coords)
    expected_loss, expected_acc = brute_force(
        model, loss_fn, batches, ml.names, ml.theta_flat() + torch.as_tensor(coords) @ D
    )
    np.testing.assert_allclose(loss, expected_loss, rtol=2e-6)
    np.testing.assert_allclose(acc, expected_acc, atol=1e-6)


def test_other_models_take_the_plain_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(4, 3)).to(F64)
    batches = [(torch.randn(5, 2, 3, dtype=F64), torch.randint(0, 3, (5,)))]
    ml = ModelLoss(model, nn.CrossEntropyLoss(), batches)
    assert first_linear(ml) is None
    D = as_flat(random_directions(model, 1, seed=0), ml)
    loss, _ = loss_at_points(ml, D, np.array([[0.5], [-0.5]]))
    np.testing.assert_allclose(
        loss,
        brute_force(
            model,
            nn.CrossEntropyLoss(),
            batches,
            ml.names,
            ml.theta_flat() + torch.tensor([[0.5], [-0.5]], dtype=F64) @ D,
        )[0],
        rtol=1e-12,
    )


def test_loss_at_parameters_with_other_batches_and_loss():
    model, batches = network(), data()
    ml = ModelLoss(model, nn.CrossEntropyLoss(), batches)
    points = ml.theta_flat() + 0.1 * torch.randn(
        5, ml.num_params, generator=torch.Generator().manual_seed(0), dtype=F64
    )
    subset = [(batches[0][0][:4], batches[0][1][:4])]
    mse_like = lambda out, y: out.pow(2).mean()  # noqa: E731 (any loss_fn is honoured)
    loss, acc = loss_at_parameters(ml, points, batches=subset, loss_fn=mse_like)
    expected_loss, expected_acc = brute_force(model, mse_like, subset, ml.names, points)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
    np.testing.assert_allclose(acc, expected_acc, atol=1e-12)
    with pytest.raises(ValueError, match="points: expected shape"):
        loss_at_parameters(ml, points[:, :3])


def _one_at_a_time_loss(ml, group, flat):
    p = ml.unflatten(flat)
    with torch.no_grad():
        return sum(len(y) * float(ml.loss_fn(ml.forward(p, x), y)) for x, y in group) / sum(len(y) for _, y in group)


def test_average_sharpness_and_pacbayes_batched_equal_one_draw_at_a_time():
    """The draws go through the evaluator in one call; the numbers are those of evaluating each
    draw on its own (the same seeded draws, in the same order)."""
    from landscape.sharpness import average_sharpness, pacbayes_flatness, perturbation_scale

    model, batches = network(), data((20, 12))
    loss_fn = nn.CrossEntropyLoss()
    ml = ModelLoss(model, loss_fn, batches)
    theta = ml.theta_flat()
    result = average_sharpness(model, loss_fn, batches, rho=0.2, m=16, n_examples=None, n_samples=5, seed=4)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    expected = []
    for i in range(0, 32, 16):
        group = [(x[i : i + 16], y[i : i + 16])]
        base = _one_at_a_time_loss(ml, group, theta)
        draws = [theta + 0.2 * theta.abs() * torch.randn(ml.num_params, generator=gen, dtype=F64) for _ in range(5)]
        expected.append(np.mean([_one_at_a_time_loss(ml, group, w) - base for w in draws]))
    np.testing.assert_allclose(result.per_batch, expected, rtol=1e-10, atol=1e-13)

    flat = pacbayes_flatness(model, loss_fn, batches, n_steps=3, n_samples=3, seed=2)
    sigma = flat.bracket[1]
    gen = torch.Generator().manual_seed(2)
    std = perturbation_scale(theta, sigma, magnitude_aware=True, eps=1e-3)
    accs = []
    for _ in range(3):
        w = ml.unflatten(theta + std * torch.randn(ml.num_params, generator=gen, dtype=F64))
        with torch.no_grad():
            accs.append(float((ml.forward(w, x).argmax(-1) == y).double().mean()))
    assert flat.accuracy - np.mean(accs) == pytest.approx(flat.drops[1], abs=1e-12)


def test_affine_trick_only_for_wide_inputs():
    model = network()
    ml = ModelLoss(model, nn.CrossEntropyLoss(), data())
    D = as_flat(random_directions(model, 2, seed=3), ml)
    assert _Network(ml, D).split is None  # 6 inputs < 16 x 3: the plain product is cheaper


def test_fused_cross_entropy_and_accuracy_equal_torch_with_ties():
    from landscape.evaluate import _fast_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=g, dtype=F64) * 10
    labels = torch.randint(0, 5, (200,), generator=g)
    logits[:20] = 0.0  # all classes tie: argmax picks class 0
    logits[20:30, :2] = 50.0  # two-way ties at the top
    logits[30, 1] = float("inf")
    fused = _fast_cross_entropy(nn.CrossEntropyLoss()).scores(logits[31:], labels[31:])
    assert float(fused[0]) == pytest.approx(float(nn.functional.cross_entropy(logits[31:], labels[31:])), rel=1e-12)
    _, accuracy = _fast_cross_entropy(nn.CrossEntropyLoss()).scores(logits, labels)
    assert float(accuracy) == float((logits.argmax(-1) == labels).double().mean())
    assert _fast_cross_entropy(nn.CrossEntropyLoss()).scores(logits, labels.double()) is None


def test_cpu_plan_stacks_points_of_small_plain_mlps_only():
    from landscape.evaluate import MAX_STACK, STACK_BYTES, WORKING_SET, _cpu_plan

    assert _cpu_plan(STACK_BYTES / 4000 / 8, 4000, stackable=True) == (8, None)
    assert _cpu_plan(STACK_BYTES / 4000 / 100, 4000, stackable=True) == (MAX_STACK, None)
    assert _cpu_plan(STACK_BYTES / 1000, 4000, stackable=True) == (1, None)  # large: one point, uncut
    assert _cpu_plan(WORKING_SET / 4000 / 8, 4000, stackable=False) == (1, None)
    assert _cpu_plan(WORKING_SET / 1024, 4000, stackable=False) == (1, 1024)  # other models: pieces
    model = network()
    ml = ModelLoss(model, nn.CrossEntropyLoss(), data())
    assert _Network(ml, None).stackable
    mixing = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Softmax(-1), nn.Linear(4, 3)).to(F64)
    assert not _Network(
        ModelLoss(mixing, nn.CrossEntropyLoss(), data()), None
    ).stackable  # softmax mixes a row: not elementwise
