"""The metric registry and ``measure()``: names, orientation, options, errors, model state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from landscape import curvature, norms, sharpness
from landscape.metrics import METRICS, MeasureContext, Metric, measure, register_metric

F64 = torch.float64

REQUIRED = {
    "hessian_top_eig": "sharper",
    "hessian_min_eig": "neither",
    "hessian_trace": "sharper",
    "hessian_spectrum": "sharper",
    "keskar_sharpness": "sharper",
    "sharpness_worst": "sharper",
    "adaptive_sharpness_worst": "sharper",
    "sharpness_avg": "sharper",
    "adaptive_sharpness_avg": "sharper",
    "pacbayes_flatness": "sharper",
    "pacbayes_mag_flatness": "sharper",
    "sharpness_flatness": "sharper",
    "sharpness_mag_flatness": "sharper",
    "filter_curvature": "sharper",
    "adaptive_trace": "sharper",
    "param_count": "neither",
    "frobenius_norm_sum": "neither",
    "frobenius_norm_prod": "neither",
    "spectral_norm_sum": "neither",
    "spectral_norm_prod": "neither",
    "dist_from_init": "neither",
}

# cheap settings for every metric of this module's registry lines
CHEAP = {
    "keskar_sharpness": {"max_iter": 3},
    "sharpness_worst": {"steps": 3, "m": None},
    "adaptive_sharpness_worst": {"steps": 3, "m": 32},
    "sharpness_avg": {"n_samples": 4},
    "adaptive_sharpness_avg": {"n_samples": 4},
    "pacbayes_flatness": {"n_steps": 4, "n_samples": 2},
    "pacbayes_mag_flatness": {"n_steps": 4, "n_samples": 2},
    "sharpness_flatness": {"n_steps": 3, "steps": 2, "restarts": 1},
    "sharpness_mag_flatness": {"n_steps": 3, "steps": 2, "restarts": 1},
    "filter_curvature": {"n_directions": 2},
    "adaptive_trace": {"max_hvp": 16, "rtol": 1.0},
    "param_count": {},
    "frobenius_norm_sum": {},
    "frobenius_norm_prod": {},
    "spectral_norm_sum": {},
    "spectral_norm_prod": {},
    "dist_from_init": {},
    "pacbayes_init": {"n_steps": 4, "n_samples": 2},
    "pacbayes_orig": {"n_steps": 4, "n_samples": 2},
    "pacbayes_mag_init": {"n_steps": 4, "n_samples": 2},
    "pacbayes_mag_orig": {"n_steps": 4, "n_samples": 2},
    "param_norm": {},
    "fro_over_spec": {},
    "log_prod_of_spec": {},
    "log_prod_of_fro": {},
    "fro_dist_from_init": {},
    "spec_dist_from_init": {},
    "inverse_margin": {},
    "log_prod_of_spec_over_margin": {},
    "log_prod_of_fro_over_margin": {},
    "path_norm": {},
    "path_norm_over_margin": {},
    "fisher_rao_norm": {},
}
# the rest of the registry, cheap too: with CHEAP it covers every registered metric
CHEAP_CURVATURE = {
    "hessian_top_eig": {"tol": 1e-2},
    "hessian_min_eig": {"tol": 1e-2},
    "hessian_trace": {"rtol": 0.5, "max_hvp": 16},
    "hessian_spectrum": {"num_runs": 2, "num_steps": 5, "grid_size": 20},
    "surface_1d_curvature": {"steps": 5},
    "surface_2d_curvature": {"steps": 5, "span": 0.2},
    "surface_2d": {"steps": 5, "span": 0.2},
    "flatness_radius": {"steps": 5},
    "ggn_top_eig": {"tol": 1e-2},
    "ggn_trace": {"rtol": 0.5, "max_hvp": 16},
    "fisher_trace": {"rtol": 0.5, "max_hvp": 16},
}


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is fastest


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).to(F64)
    init = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    X = torch.randn(64, 5, dtype=F64)
    y = X[:, :3].argmax(1)
    return model, (X, y), init


def test_registry_names_and_orientations():
    for name, orientation in REQUIRED.items():
        assert name in METRICS, name
        assert METRICS[name].larger_is == orientation, name
        assert METRICS[name].name == name and METRICS[name].description


def test_measure_returns_values_and_seconds_and_leaves_model_unchanged(setup):
    model, data, init = setup
    model.train()
    model[2].eval()  # a mixed-mode model must come back mixed
    model[0].bias.requires_grad_(False)
    model[3].weight.grad = torch.ones_like(model[3].weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    artifacts: dict = {}
    out = measure(
        model,
        nn.CrossEntropyLoss(),
        data,
        list(CHEAP),
        options=CHEAP,
        init_state=init,
        artifacts=artifacts,
    )
    for name in CHEAP:
        assert isinstance(out[name], float), name
        assert out[f"{name}_seconds"] >= 0, name
    assert set(out) == set(CHEAP) | {f"{n}_seconds" for n in CHEAP}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad
    assert torch.equal(model[3].weight.grad, torch.ones_like(model[3].weight))
    assert model[0].weight.grad is None
    assert isinstance(artifacts["adaptive_sharpness_worst"], sharpness.SharpnessResult)
    assert isinstance(artifacts["pacbayes_mag_flatness"], sharpness.FlatnessResult)


def test_measure_values_equal_direct_calls(setup):
    model, data, init = setup
    loss = nn.CrossEntropyLoss()
    out = measure(
        model,
        loss,
        data,
        [
            "adaptive_sharpness_avg",
            "sharpness_worst",
            "filter_curvature",
            "param_count",
            "spectral_norm_prod",
            "dist_from_init",
        ],
        seed=5,
        init_state=init,
        options={
            "adaptive_sharpness_avg": {"n_samples": 6, "m": 16},
            "sharpness_worst": {"steps": 4},
        },
    )
    assert (
        out["adaptive_sharpness_avg"] == sharpness.average_sharpness(model, loss, data, n_samples=6, m=16, seed=5).value
    )
    assert (
        out["sharpness_worst"]
        == sharpness.worst_case_sharpness(model, loss, data, adaptive=False, steps=4, seed=5).value
    )
    assert out["filter_curvature"] == pytest.approx(
        curvature.filter_curvature(model, loss, data, seed=5).value, rel=1e-12
    )
    assert out["param_count"] == sum(p.numel() for p in model.parameters())
    assert out["spectral_norm_prod"] == pytest.approx(norms.weight_norms(model).spectral_prod)
    assert out["dist_from_init"] == pytest.approx(norms.distance_from_init(model, init))


def test_options_params_and_dtype_build_a_separate_loss(setup):
    model, data, _ = setup
    loss = nn.CrossEntropyLoss()
    only_last = ["3.weight", "3.bias"]
    out = measure(
        model,
        loss,
        data,
        ["sharpness_avg"],
        options={"sharpness_avg": {"params": only_last, "n_samples": 4}},
    )
    direct = sharpness.average_sharpness(model, loss, data, adaptive=False, params=only_last, n_samples=4)
    assert out["sharpness_avg"] == direct.value
    everything = measure(model, loss, data, ["sharpness_avg"], options={"sharpness_avg": {"n_samples": 4}})
    assert everything["sharpness_avg"] != out["sharpness_avg"]


def test_unknown_metric_lists_the_known_ones(setup):
    model, data, _ = setup
    with pytest.raises(KeyError, match="adaptive_sharpness_worst") as info:
        measure(model, nn.CrossEntropyLoss(), data, ["adaptive_sharpnes_worst"])
    assert "unknown ['adaptive_sharpnes_worst']" in str(info.value)


@pytest.mark.parametrize(
    "metrics, options, init, error, match",
    [
        (["sharpness_avg"], {"sharpness_avg": {"n_sample": 3}}, None, TypeError, "n_samples"),
        (["sharpness_avg"], {"sharpness_avg": 3}, None, TypeError, "dict of keyword"),
        (["sharpness_avg"], {"sharpness_worst": {}}, None, KeyError, "not in metrics"),
        (["sharpness_avg"], {"sharpness_avg": {"adaptive": True}}, None, ValueError, "fixed"),
        (["param_count", "param_count"], None, None, ValueError, "more than once"),
        (["param_count", "dist_from_init"], None, None, ValueError, "init_state"),
    ],
)
def test_bad_requests_raise_clear_errors(setup, metrics, options, init, error, match):
    model, data, _ = setup
    with pytest.raises(error, match=match):
        measure(model, nn.CrossEntropyLoss(), data, metrics, options=options, init_state=init)


def test_register_metric_adds_one_name(setup):
    model, data, _ = setup

    def train_loss(ctx: MeasureContext) -> float:
        return ctx.model_loss.loss()

    metric = Metric("test_train_loss", "neither", train_loss, "data-set loss")
    register_metric(metric)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_metric(metric)
        out = measure(model, nn.CrossEntropyLoss(), data, ["test_train_loss"])
        with torch.no_grad():
            model.eval()
            assert out["test_train_loss"] == pytest.approx(float(nn.functional.cross_entropy(model(data[0]), data[1])))
    finally:
        METRICS.pop("test_train_loss")


def test_context_shares_one_model_loss(setup):
    model, data, _ = setup
    ctx = MeasureContext(model, nn.CrossEntropyLoss(), data)
    assert ctx.model_loss is ctx.hessian


def test_package_attribute_is_callable_and_curvature_metrics_share_the_operator(setup):
    import landscape

    model, data, _ = setup
    artifacts: dict = {}
    out = landscape.measure(
        model,
        nn.CrossEntropyLoss(),
        data,
        ["hessian_top_eig", "hessian_trace", "adaptive_trace"],
        options={"hessian_trace": {"seed": 3}},
        artifacts=artifacts,
    )
    from landscape.hvp import HessianOperator

    dense = HessianOperator(model, nn.CrossEntropyLoss(), data).dense()
    assert out["hessian_top_eig"] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6)
    assert abs(out["hessian_trace"] - float(dense.trace())) <= 4 * artifacts["hessian_trace"].std_err + 1e-9
    assert out["adaptive_trace"] == artifacts["adaptive_trace"].value


def test_check_request_validates_without_computing():
    from landscape.metrics import check_request

    assert check_request(["param_count"], {"param_count": {}}) == ["param_count"]
    with pytest.raises(ValueError, match="fixed"):
        check_request(["sharpness_worst"], {"sharpness_worst": {"adaptive": True}})
    with pytest.raises(TypeError, match="accepted"):
        check_request(["pacbayes_mag_flatness"], {"pacbayes_mag_flatness": {"sigma": 1}})
    with pytest.raises(KeyError, match="known metrics"):
        check_request(["no_such_metric"])


def test_every_registered_metric_declares_its_options_and_keys(setup):
    """Walks the whole registry: an unknown option is rejected naming it and the accepted ones,
    every declared option passes, and measure() reports exactly the declared keys."""
    from landscape.metrics import check_request

    model, data, init = setup
    cheap = {**CHEAP, **CHEAP_CURVATURE}
    assert set(cheap) == set(METRICS), "give every registered metric cheap settings here"
    for name, metric in METRICS.items():
        with pytest.raises(TypeError, match=r"unknown option\(s\) \['no_such_option'\]; accepted: \[") as info:
            check_request([name], {name: {"no_such_option": 1}})
        assert all(repr(o) in str(info.value) for o in metric.options), name
        assert metric.options and "seed" in metric.options or name in _UNSEEDED, name
        for option in metric.options:
            check_request([name], {name: {option: None}})  # names only: values are not checked
        assert not set(metric.options) & {"model", "loss_fn", "data", "operator", "model_loss", "init_state"}
    out = measure(model, nn.CrossEntropyLoss(), data, list(cheap), options=cheap, init_state=init)
    expected = {key for m in METRICS.values() for key in m.keys} | {f"{n}_seconds" for n in METRICS}
    assert set(out) == expected
    assert METRICS["hessian_spectrum"].keys == ("hessian_spectrum_trace",)
    assert METRICS["hessian_trace"].keys == ("hessian_trace",)


_UNSEEDED = {
    "param_count",
    "frobenius_norm_sum",
    "frobenius_norm_prod",
    "spectral_norm_sum",
    "spectral_norm_prod",
    "dist_from_init",
    "param_norm",
    "fro_over_spec",
    "log_prod_of_spec",
    "log_prod_of_fro",
    "fro_dist_from_init",
    "spec_dist_from_init",
    "inverse_margin",
    "log_prod_of_spec_over_margin",
    "log_prod_of_fro_over_margin",
    "path_norm",
    "path_norm_over_margin",
    "fisher_rao_norm",
}


def test_the_misspelled_trace_option_of_the_issue_is_rejected_before_anything_runs():
    from landscape.metrics import check_request

    with pytest.raises(
        TypeError, match=r"options\['hessian_trace'\]: unknown option\(s\) \['rtoll'\]; accepted: .*'rtol'"
    ):
        check_request(["hessian_trace"], {"hessian_trace": {"rtoll": 0.05}})
    for name in ("hessian_top_eig", "hessian_min_eig", "hessian_spectrum"):
        with pytest.raises(TypeError, match=r"\['tool'\]"):
            check_request([name], {name: {"tool": 1}})
    with pytest.raises(ValueError, match="fixed"):
        check_request(["hessian_top_eig"], {"hessian_top_eig": {"k": 2}})
    assert check_request(["surface_2d"], {"surface_2d": {"steps": 21}}) == ["surface_2d"]  # a default, not fixed


def test_user_metric_options_from_its_signature_and_keys_enforced(setup):
    model, data, _ = setup

    def scaled_loss(ctx: MeasureContext, *, scale: float = 1.0) -> dict[str, float]:
        return {"test_scaled_loss": scale * ctx.model_loss.loss(), "test_scaled_loss_half": 0.5 * scale}

    declared = Metric("test_scaled_loss", "neither", scaled_loss, keys=("test_scaled_loss", "test_scaled_loss_half"))
    assert declared.options == ("scale",)
    assert Metric("test_free", "neither", lambda ctx, **kw: 1.0).options is None  # **kwargs: anything
    register_metric(declared)
    try:
        out = measure(
            model, nn.CrossEntropyLoss(), data, ["test_scaled_loss"], options={"test_scaled_loss": {"scale": 2.0}}
        )
        assert set(out) == {"test_scaled_loss", "test_scaled_loss_half", "test_scaled_loss_seconds"}
        assert out["test_scaled_loss_half"] == 1.0
        with pytest.raises(TypeError, match="accepted: \\['scale'\\]"):
            measure(
                model, nn.CrossEntropyLoss(), data, ["test_scaled_loss"], options={"test_scaled_loss": {"scal": 2.0}}
            )
        register_metric(Metric("test_scaled_loss", "neither", scaled_loss), overwrite=True)  # keys not declared
        with pytest.raises(ValueError, match="declares keys"):
            measure(model, nn.CrossEntropyLoss(), data, ["test_scaled_loss"])
    finally:
        METRICS.pop("test_scaled_loss")
