"""Generalization measures of Jiang et al. 2020 / Dziugaite et al. 2020 against brute force:
margins by a loop over samples, norms by numpy SVDs, the path norm by enumerating paths, the
Fisher-Rao norm by per-sample gradients and by the homogeneity identity, PAC-Bayes bounds by
their formulas from one sigma search; the registry lines, and a sweep trial that lists them."""

from __future__ import annotations

import copy
import functools
import itertools
import math

import numpy as np
import pytest
import torch
from conftest import assert_unchanged, make_batches, make_classifier, snapshot
from torch import nn

import landscape
from landscape import generalization as G
from landscape import sharpness
from landscape.metrics import METRICS, check_request

NEW_METRICS = [
    "inverse_margin",
    "param_norm",
    "fro_over_spec",
    "log_prod_of_spec",
    "log_prod_of_fro",
    "fro_dist_from_init",
    "spec_dist_from_init",
    "log_prod_of_spec_over_margin",
    "log_prod_of_fro_over_margin",
    "path_norm",
    "path_norm_over_margin",
    "fisher_rao_norm",
    "ggn_top_eig",
    "pacbayes_init",
    "pacbayes_orig",
    "pacbayes_mag_init",
    "pacbayes_mag_orig",
]


def brute_margins(model, batches):
    out = []
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            for row, label in zip(logits.tolist(), y.tolist()):
                others = [v for c, v in enumerate(row) if c != label]
                out.append(row[label] - max(others))
    return out


@pytest.fixture(scope="module")
def trained():
    """``(model, init_state, batches)``: an MLP 4-8-3 fitted to a teacher's labels (about 95% train
    accuracy, so the sigma searches bracket), float64, 60 samples in uneven batches."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 4, generator=g, dtype=torch.float64)
    teacher = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = (x @ teacher).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    init_state = copy.deepcopy(model.state_dict())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only wait for each other
    for _ in range(150):  # full-batch gradient descent (torch.optim's first step imports seconds of code)
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= 1.0 * g
    torch.set_num_threads(threads)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).double().mean() > 0.9
    batches = [(x[:25], y[:25]), (x[25:43], y[25:43]), (x[43:], y[43:])]
    return model, init_state, batches


def test_output_margin_is_the_abs_kth_smallest_margin():
    model = make_classifier("relu")
    batches = make_batches()  # 23 samples: k = 23 // 10 = 2
    brute = sorted(brute_margins(model, batches))
    result = G.output_margin(model, nn.CrossEntropyLoss(), batches)
    assert result.k == 2
    assert result.value == pytest.approx(abs(brute[1]), rel=1e-12)
    np.testing.assert_allclose(np.sort(result.margins), brute, rtol=1e-12)
    assert G.inverse_margin(model, nn.CrossEntropyLoss(), batches) == pytest.approx(1 / brute[1] ** 2, rel=1e-12)
    few = make_batches(sizes=(4, 3))  # m < 10: the smallest margin (k = 1)
    assert G.output_margin(model, nn.CrossEntropyLoss(), few).value == pytest.approx(
        abs(min(brute_margins(model, few))), rel=1e-12
    )


def test_margin_needs_class_scores():
    model = nn.Linear(4, 1).double()
    data = (torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="class scores"):
        G.output_margin(model, nn.MSELoss(), data)


def test_layer_norm_measures_match_numpy(trained):
    model, init_state, batches = trained
    out = landscape.measure(
        model,
        nn.CrossEntropyLoss(),
        batches,
        [
            "param_norm",
            "fro_over_spec",
            "log_prod_of_spec",
            "log_prod_of_fro",
            "fro_dist_from_init",
            "spec_dist_from_init",
            "log_prod_of_spec_over_margin",
            "log_prod_of_fro_over_margin",
        ],
        init_state=init_state,
    )
    weights = [model[0].weight.detach().numpy(), model[2].weight.detach().numpy()]  # biases are not layers
    inits = [init_state["0.weight"].numpy(), init_state["2.weight"].numpy()]
    fro = [np.linalg.norm(w) ** 2 for w in weights]
    spec = [np.linalg.svd(w, compute_uv=False)[0] ** 2 for w in weights]
    gamma = abs(sorted(brute_margins(model, batches))[60 // 10 - 1])
    assert out["param_norm"] == pytest.approx(sum(fro), rel=1e-10)
    assert out["fro_over_spec"] == pytest.approx(sum(f / s for f, s in zip(fro, spec)), rel=1e-10)
    assert out["log_prod_of_spec"] == pytest.approx(sum(np.log(spec)), rel=1e-10)
    assert out["log_prod_of_fro"] == pytest.approx(sum(np.log(fro)), rel=1e-10)
    assert out["log_prod_of_spec_over_margin"] == pytest.approx(sum(np.log(spec)) - 2 * np.log(gamma), rel=1e-10)
    assert out["log_prod_of_fro_over_margin"] == pytest.approx(sum(np.log(fro)) - 2 * np.log(gamma), rel=1e-10)
    diffs = [w - w0 for w, w0 in zip(weights, inits)]
    assert out["fro_dist_from_init"] == pytest.approx(sum(np.linalg.norm(d) ** 2 for d in diffs), rel=1e-10)
    assert out["spec_dist_from_init"] == pytest.approx(
        sum(np.linalg.svd(d, compute_uv=False)[0] ** 2 for d in diffs), rel=1e-10
    )


def test_path_norm_is_the_sum_over_paths_of_squared_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))  # float32, with biases
    W1, b1 = model[0].weight.double(), model[0].bias.double()
    W2, b2 = model[2].weight.double(), model[2].bias.double()
    brute = 0.0
    for k in range(2):
        brute += float(b2[k] ** 2)
        for j in range(4):
            brute += float(W2[k, j] ** 2 * b1[j] ** 2)
            for i in range(3):
                brute += float(W2[k, j] ** 2 * W1[j, i] ** 2)
    data = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    before = snapshot(model)
    assert G.path_norm(model, data) == pytest.approx(brute, rel=1e-12)
    assert_unchanged(model, before)
    # bias-free, three layers: 1^T (W3^2)(W2^2)(W1^2) 1 with elementwise squares
    deep = make_classifier("relu", width=5)
    for layer in deep:
        if isinstance(layer, nn.Linear):
            layer.bias = None
    sq = [layer.weight.detach() ** 2 for layer in deep if isinstance(layer, nn.Linear)]
    closed = float((sq[2] @ sq[1] @ sq[0]).sum())
    assert G.path_norm(deep, make_batches()) == pytest.approx(closed, rel=1e-12)
    margin = G.output_margin(deep, nn.CrossEntropyLoss(), make_batches()).value
    assert G.path_norm_over_margin(deep, nn.CrossEntropyLoss(), make_batches()) == pytest.approx(
        closed / margin**2, rel=1e-12
    )


def _bn_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    bn = model[1]
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.5)
        bn.weight.copy_(torch.randn(4))
        bn.bias.copy_(torch.randn(4))
    return model.eval()


def test_fold_batch_norm_keeps_the_function_and_path_norm_uses_it():
    model = _bn_model()
    before = snapshot(model)
    folded = G.fold_batch_norm(model)
    assert_unchanged(model, before)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
    x = torch.randn(7, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    # the folded first layer by hand: W' = s W, b' = beta - s mu, s = gamma / sqrt(var + eps)
    bn = model[1]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    W1, b1 = (s[:, None] * model[0].weight).detach(), (bn.bias - s * bn.running_mean).detach()
    W2, b2 = model[3].weight.detach(), model[3].bias.detach()
    brute = float((b2**2).sum() + ((W2**2) @ (b1**2)).sum() + ((W2**2) @ (W1**2)).sum())
    assert G.path_norm(model, (x, torch.zeros(7, dtype=torch.long))) == pytest.approx(brute, rel=1e-12)


def test_layer_measures_fold_batch_norm_like_the_reference():
    model = _bn_model()
    start = _bn_model()
    with torch.no_grad():  # another initial point, with the running statistics of a fresh net
        for p in start.parameters():
            p.add_(0.5)
        start[1].running_mean.zero_()
        start[1].running_var.fill_(1.0)
    init_state = copy.deepcopy(start.state_dict())

    def folded_first(net):
        bn = net[1]
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return (s[:, None] * net[0].weight).detach().numpy()

    weights = [folded_first(model), model[3].weight.detach().numpy()]
    inits = [folded_first(start), start[3].weight.detach().numpy()]
    x = torch.randn(30, 3, dtype=torch.float64)
    data = (x, model(x).argmax(1).detach())
    out = landscape.measure(
        model,
        nn.CrossEntropyLoss(),
        data,
        ["param_norm", "log_prod_of_spec", "fro_dist_from_init", "spec_dist_from_init"],
        init_state=init_state,
    )
    assert out["param_norm"] == pytest.approx(sum(np.linalg.norm(w) ** 2 for w in weights), rel=1e-10)
    assert out["log_prod_of_spec"] == pytest.approx(
        sum(2 * np.log(np.linalg.svd(w, compute_uv=False)[0]) for w in weights), rel=1e-10
    )
    diffs = [w - w0 for w, w0 in zip(weights, inits)]
    assert out["fro_dist_from_init"] == pytest.approx(sum(np.linalg.norm(d) ** 2 for d in diffs), rel=1e-10)
    assert out["spec_dist_from_init"] == pytest.approx(
        sum(np.linalg.svd(d, compute_uv=False)[0] ** 2 for d in diffs), rel=1e-10
    )
    with pytest.raises(ValueError, match="running statistics"):
        G.layer_distances(model, {n: p for n, p in init_state.items() if "running" not in n})


def test_batch_norm_that_cannot_be_folded_is_refused():
    after_relu = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="cannot be folded"):
        G.path_norm(after_relu, (torch.randn(5, 3), torch.randint(0, 2, (5,))))


def per_sample_gradients(model, loss_fn, batches):
    rows = []
    for x, y in batches:
        for xi, yi in zip(x, y):
            model.zero_grad(set_to_none=True)
            loss_fn(model(xi.unsqueeze(0)), yi.unsqueeze(0)).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


@pytest.mark.parametrize("depth", [2, 3])
def test_fisher_rao_norm_by_gradients_and_by_homogeneity(depth):
    """``mean_i <w, g_i>^2`` from per-sample gradients; for a bias-free ReLU net of ``depth``
    layers also ``depth^2 mean_i <p_i - e_{y_i}, f_i>^2`` (Liang et al. 2019)."""
    torch.manual_seed(depth)
    widths = [4, 6, 5, 3][:depth] + [3]
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).double()
    batches = make_batches()
    loss_fn = nn.CrossEntropyLoss()
    before = snapshot(model)
    value = G.fisher_rao_norm(model, loss_fn, batches)
    assert_unchanged(model, before)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    grads = per_sample_gradients(model, loss_fn, batches)
    assert value == pytest.approx(float((grads @ w).square().mean()), rel=1e-10)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        f = model(x)
        r = f.softmax(1) - nn.functional.one_hot(y, 3)
    assert value == pytest.approx(float((depth * (r * f).sum(1)).square().mean()), rel=1e-10)
    assert value > 1e-4


def test_fisher_rao_norm_is_w_f_w_with_biases():
    model = make_classifier("tanh", width=5)
    batches = make_batches()
    F = landscape.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), batches)
    w = F.theta_flat()
    assert G.fisher_rao_norm(model, nn.CrossEntropyLoss(), batches) == pytest.approx(float(w @ (F @ w)), rel=1e-10)


def _bound_formulas(model, init_state, sigma, m, *, mag, eps=1e-3):
    """Jiang et al. eqs. 48/49 (plain) and 56/57 (magnitude-aware) over the weights only."""
    w = np.concatenate([model[0].weight.detach().numpy().ravel(), model[2].weight.detach().numpy().ravel()])
    w0 = np.concatenate([init_state["0.weight"].numpy().ravel(), init_state["2.weight"].numpy().ravel()])
    tail = math.log(m / sigma) + 10
    if not mag:
        return np.sum((w - w0) ** 2) / (4 * sigma**2) + tail, np.sum(w**2) / (4 * sigma**2) + tail
    omega = len(w)

    def bound(ref):
        num = eps**2 + (sigma**2 + 1) * np.sum(ref**2) / omega
        return 0.25 * np.sum(np.log(num / (eps**2 + sigma**2 * (w - w0) ** 2))) + tail

    return bound(w - w0), bound(w)


def test_pacbayes_bounds_share_one_sigma_search_and_match_their_formulas(trained, monkeypatch):
    model, init_state, batches = trained
    calls = []
    original = sharpness.pacbayes_flatness

    @functools.wraps(original)
    def counting(*args, **kwargs):
        calls.append(kwargs["magnitude_aware"])
        return original(*args, **kwargs)

    monkeypatch.setattr(sharpness, "pacbayes_flatness", counting)
    names = [
        "pacbayes_flatness",
        "pacbayes_init",
        "pacbayes_orig",
        "pacbayes_mag_flatness",
        "pacbayes_mag_init",
        "pacbayes_mag_orig",
    ]
    settings = {"n_steps": 10, "n_samples": 4}
    out = landscape.measure(
        model, nn.CrossEntropyLoss(), batches, names, init_state=init_state, options={n: settings for n in names}
    )
    assert sorted(calls) == [False, True]  # one search per noise kind
    plain = original(model, nn.CrossEntropyLoss(), batches, magnitude_aware=False, **settings)
    mag = original(model, nn.CrossEntropyLoss(), batches, magnitude_aware=True, **settings)
    assert plain.bracketed and mag.bracketed and 0 < plain.level < 2 and 0 < mag.level < 2
    assert out["pacbayes_flatness"] == pytest.approx(plain.value, rel=1e-12)
    assert out["pacbayes_mag_flatness"] == pytest.approx(mag.value, rel=1e-12)
    init, orig = _bound_formulas(model, init_state, plain.level, 60, mag=False)
    assert out["pacbayes_init"] == pytest.approx(init, rel=1e-10)
    assert out["pacbayes_orig"] == pytest.approx(orig, rel=1e-10)
    init, orig = _bound_formulas(model, init_state, mag.level, 60, mag=True)
    assert out["pacbayes_mag_init"] == pytest.approx(init, rel=1e-10)
    assert out["pacbayes_mag_orig"] == pytest.approx(orig, rel=1e-10)
    assert out["pacbayes_init"] != out["pacbayes_orig"]


def test_pacbayes_bounds_need_init_state_except_the_plain_orig(trained):
    model, _, batches = trained
    for name in ["pacbayes_init", "pacbayes_mag_init", "pacbayes_mag_orig"]:
        with pytest.raises(ValueError, match="init_state"):
            landscape.measure(model, nn.CrossEntropyLoss(), batches, [name])
    out = landscape.measure(
        model, nn.CrossEntropyLoss(), batches, ["pacbayes_orig"], options={"pacbayes_orig": {"n_steps": 4}}
    )
    assert math.isfinite(out["pacbayes_orig"])
    with pytest.raises(ValueError, match="fixed"):
        check_request(["pacbayes_init"], {"pacbayes_init": {"magnitude_aware": True}})


def test_steps_to_loss():
    history = [
        {"kind": "epoch", "step": 0, "train_loss": 2.3},
        {"kind": "track", "step": 5, "hessian_top_eig": 1.0},
        {"kind": "epoch", "step": 10, "train_loss": 0.4},
        {"kind": "epoch", "step": 20, "train_loss": 0.1},
        {"kind": "epoch", "step": 30, "train_loss": 0.05},
    ]
    assert G.steps_to_loss(history) == 20
    assert G.steps_to_loss(history, 0.3) == 20
    assert G.steps_to_loss(history, 0.01) == math.inf
    assert G.steps_to_loss(history, 5.0) == 0
    with pytest.raises(ValueError, match="step order"):
        G.steps_to_loss(history[::-1], 0.01)


def test_registry_lines_declare_orientation_unit_reference():
    for name in NEW_METRICS:
        metric = METRICS[name]
        assert metric.unit and metric.reference, name
        assert metric.larger_is in ("sharper", "neither"), name
    assert check_request(NEW_METRICS) == NEW_METRICS
    assert all(m.unit and m.reference for m in METRICS.values())


def test_new_metrics_in_a_sweep_trial():
    """Every new metric can be listed in a sweep config's ``measure:`` and comes back from
    ``sweeps.trial.run.run_trial``; ``steps_to_loss`` applies to the trial's history."""
    from sweeps.spec.config import load_config
    from sweeps.trial.run import run_trial

    config = load_config(
        {
            "name": "generalization-measures",
            "dataset": {
                "name": "teacher",
                "train_size": 120,
                "options": {"input_dim": 5, "num_classes": 3, "test_size": 100},
            },
            "model": {"name": "mlp", "width": 8},
            "train": {"lr": 0.1, "momentum": 0.9, "batch_size": 40, "max_epochs": 30, "stop": {"train_loss": 0.2}},
            "measure": NEW_METRICS,
            "measure_options": {name: {"n_steps": 6} for name in NEW_METRICS if name.startswith("pacbayes")},
            "resources": {"cpus_per_trial": 1},
        }
    )
    result = run_trial(config)
    for name in NEW_METRICS:
        assert math.isfinite(result.metrics[name]), name
    steps = G.steps_to_loss(result.history, 0.2)
    assert steps <= result.metrics["steps"] or result.status != "converged"
