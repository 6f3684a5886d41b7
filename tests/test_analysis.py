"""sweeps.analysis: every statistic against scipy or a value worked out by hand."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import sweeps
from sweeps.analysis import (
    IncompleteGridError,
    _ordered_pair_table,
    complete_subgrid,
    conditional_mutual_information,
    correlations,
    hoeffding_weight,
    hyperparameter_effects,
    kendall_tau_b,
)


def grid_frame(values: dict[str, list], gap, measures: dict, seeds=(0,), n_test=1000, status="converged"):
    """One converged run per (grid cell, seed); gap/measures are functions of the cell dict and seed."""
    rows = []
    for cell in itertools.product(*values.values()):
        point = dict(zip(values, cell))
        for s in seeds:
            row = {**point, "seed": s, "gen_gap": gap(point, s), "status": status, "n_test": n_test}
            row["test_acc"] = 0.9 - row["gen_gap"]
            row.update({name: f(point, s) for name, f in measures.items()})
            rows.append(row)
    return pd.DataFrame(rows)


# --- tau-b and Spearman ------------------------------------------------------------------------


def test_tau_b_equals_scipy_with_ties_and_bootstrap_counts_equal_resampled_data(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, size=30).astype(float)  # many ties
    y = x + rng.integers(0, 3, size=30)
    assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic, abs=1e-12)
    idx = rng.integers(0, 30, size=(5, 30))
    counts = np.stack([np.bincount(i, minlength=30) for i in idx])
    expected = [stats.kendalltau(x[i], y[i], variant="b").statistic for i in idx]
    np.testing.assert_allclose(kendall_tau_b(x, y, counts), expected, atol=1e-12)
    monkeypatch.setattr("sweeps.analysis.ranks.DENSE_PAIRS_MAX", 10)  # the large-sweep path gives the same
    np.testing.assert_allclose(kendall_tau_b(x, y, counts), expected, atol=1e-12)


def test_equal_infinities_are_ties_in_tau_b():
    """A measure infinite for several models (1/alpha'^2 at alpha' = 0) ranks them tied and above
    every finite value: tau-b equals scipy's on the same data with the infinities replaced by one
    large finite number."""
    x = np.array([np.inf, 3.0, np.inf, 1.0, 2.0, np.inf, 0.5])
    y = np.array([0.9, 0.4, 0.7, 0.1, 0.3, 0.8, 0.2])
    finite = np.where(np.isinf(x), 1e300, x)
    expected = stats.kendalltau(finite, y, variant="b").statistic
    with warnings.catch_warnings():  # inf - inf is NaN, and NaN cast to int8 is undefined: not used
        warnings.simplefilter("error", RuntimeWarning)
        assert kendall_tau_b(x, y) == pytest.approx(expected, abs=1e-12)
        counts = np.ones((1, len(x)), dtype=int)
        np.testing.assert_allclose(kendall_tau_b(x, y, counts), [expected], atol=1e-12)


def test_correlations_tau_and_spearman_match_scipy_on_a_sweep():
    rng = np.random.default_rng(2)
    lrs = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    gaps = {lr: g for lr, g in zip(lrs, rng.permutation(7) / 10)}
    mus = {lr: m for lr, m in zip(lrs, [1, 1, 2, 3, 3, 5, 4])}  # ties in the measure
    df = grid_frame(
        {"train.lr": lrs}, lambda p, s: gaps[p["train.lr"]], {"hessian_top_eig": lambda p, s: mus[p["train.lr"]]}
    )
    table = correlations(df, n_boot=0)
    mu, g = df["hessian_top_eig"].to_numpy(), df["gen_gap"].to_numpy()
    row = table.loc["hessian_top_eig"]
    assert row["tau"] == pytest.approx(stats.kendalltau(mu, g).statistic, abs=1e-12)
    assert row["spearman"] == pytest.approx(stats.spearmanr(mu, g).statistic, abs=1e-12)
    assert row["tau_test_acc"] == pytest.approx(-row["tau"], abs=1e-12)
    assert row["n"] == 7 and row["orientation"] == "sharper"


# --- granulated Kendall ------------------------------------------------------------------------


def test_psi_on_a_hand_built_grid():
    # gap increases with a and with b. Within b=1 the measure ranks a perfectly (+1), within b=2
    # reversed (-1): psi[a] = 0. Across b at a = 1, 2, 3 the measure agrees, agrees, disagrees:
    # psi[b] = (1 + 1 - 1) / 3. Psi = (0 + 1/3) / 2.
    mu = {(1, 1): 1, (2, 1): 2, (3, 1): 3, (1, 2): 13, (2, 2): 12, (3, 2): 0.5}
    df = grid_frame(
        {"h.a": [1, 2, 3], "h.b": [1, 2]},
        lambda p, s: p["h.a"] + 10 * p["h.b"],
        {"hessian_top_eig": lambda p, s: mu[p["h.a"], p["h.b"]]},
    )
    row = correlations(df, n_boot=0).loc["hessian_top_eig"]
    assert row["psi[h.a]"] == pytest.approx(0.0, abs=1e-12)
    assert row["psi[h.b]"] == pytest.approx(1 / 3)
    assert row["Psi"] == pytest.approx(1 / 6)


def test_measure_ranking_only_within_one_hyperparameter_shows_in_psi():
    values = {"train.lr": [0.01, 0.1, 1.0], "train.batch_size": [32, 128, 512]}
    gap = lambda p, s: math.log10(p["train.lr"]) + 10 * math.log2(p["train.batch_size"])  # noqa: E731
    sees_lr_only = lambda p, s: math.log10(p["train.lr"]) - 0.1 * math.log2(p["train.batch_size"])  # noqa: E731
    row = correlations(grid_frame(values, gap, {"hessian_trace": sees_lr_only}), n_boot=0).loc["hessian_trace"]
    assert row["psi[train.lr]"] == pytest.approx(1.0)
    assert row["psi[train.batch_size]"] == pytest.approx(-1.0)
    assert row["Psi"] == pytest.approx(0.0, abs=1e-12)


# --- conditional mutual information ------------------------------------------------------------


def test_cmi_zero_for_independent_measure_and_one_for_the_target_itself():
    values = {"h.a": [1, 2, 3, 4], "h.b": [1, 2, 3]}
    gap = lambda p, s: p["h.a"] + 0.01 * p["h.b"]  # noqa: E731
    df = grid_frame(
        values,
        gap,
        {
            "same": gap,
            "monotone": lambda p, s: math.exp(3 * gap(p, s)),
            # depends only on b while the target's ordering is set by a: V_mu, V_g independent
            # over all pairs of the full grid, so I(V_mu; V_g) = 0 (min over S includes S = {}).
            "independent": lambda p, s: -p["h.b"],
        },
    )
    table = correlations(df, measures=["same", "monotone", "independent"], n_boot=0)
    assert table.loc["same", "cmi"] == pytest.approx(1.0, abs=1e-12)
    assert table.loc["monotone", "cmi"] == pytest.approx(1.0, abs=1e-12)
    assert table.loc["independent", "cmi"] == pytest.approx(0.0, abs=1e-12)


def test_cmi_hand_value_and_random_measure_is_small():
    # 3 models, S = {} only: ordered pairs (6). g = 1, 2, 3; mu = 1, 3, 2.
    # V_g = 1 on 3 pairs; V_mu agrees on 4 of 6 pairs -> joint counts [[2, 1], [1, 2]].
    models = pd.DataFrame({"h.a": [1, 2, 3]})
    g, mu = np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])
    p = np.array([[2, 1], [1, 2]]) / 6
    mi = sum(p[i, j] * math.log2(p[i, j] / 0.25) for i in range(2) for j in range(2))
    for block in (1, 2, 512):  # row blocks of the pair table
        np.testing.assert_array_equal(_ordered_pair_table(mu, g, block=block), [[2, 1], [1, 2]])
    score, given = conditional_mutual_information(mu, g, models, ["h.a"], max_conditioning=0)
    assert score == pytest.approx(mi / 1.0) and given == ()

    rng = np.random.default_rng(3)
    df = grid_frame(
        {"h.a": list(range(12)), "h.b": list(range(10))},
        lambda p, s: rng.normal(),
        {"noise": lambda p, s: rng.normal()},
    )
    assert 0 <= correlations(df, measures=["noise"], n_boot=0).loc["noise", "cmi"] < 0.02


# --- robust sign-error -------------------------------------------------------------------------


def test_robust_sign_error_on_a_crafted_environment():
    # One environment (lr 0.1 vs 1.0), two seeds each -> 4 pairs of runs, n_test = 1000.
    runs = [  # lr, seed, gap, measure
        (0.1, 0, 0.10, 1.0),
        (0.1, 1, 0.12, 1.0),
        (1.0, 0, 0.20, 2.0),
        (1.0, 1, 0.05, 3.0),
    ]
    df = pd.DataFrame(
        [
            {"train.lr": lr, "seed": s, "gen_gap": g, "hessian_top_eig": m, "status": "converged", "n_test": 1000}
            for lr, s, g, m in runs
        ]
    )
    w = lambda dg: max(0.0, 1 - 2 * math.exp(-1000 * dg**2 / 2)) ** 2  # noqa: E731
    # (0.10, 0.20): agree, w = 0.973; (0.12, 0.20): agree, w = 0.843;
    # (0.12, 0.05): measure down, gap up -> error 1, w = 0.685; (0.10, 0.05): w = 0.18 < 0.5, dropped.
    assert w(0.05) < 0.5 < w(0.07)
    expected = w(0.07) / (w(0.10) + w(0.08) + w(0.07))
    row = correlations(df, n_boot=0).loc["hessian_top_eig"]
    assert row["sign_error_max"] == pytest.approx(expected)
    assert row["sign_error_mean"] == pytest.approx(expected)
    assert row["sign_error_max[train.lr]"] == pytest.approx(expected)
    assert row["n_environments"] == 1
    assert hoeffding_weight(np.array([0.07]), np.array([1000]))[0] == pytest.approx(w(0.07))
    # a target that is not an error rate (a loss): no Hoeffding weights, all 4 pairs count, 2 wrong
    df["test_loss"] = 10 * df["gen_gap"]
    table = correlations(df.drop(columns="gen_gap"), target="test_loss", n_boot=0)
    assert table.loc["hessian_top_eig", "sign_error_max"] == pytest.approx(0.5)
    assert table.attrs["sign_error_weighting"].startswith("none: test_loss is not a fraction")


def test_sign_error_max_is_taken_over_environments_per_hyperparameter():
    values = {"train.lr": [0.01, 0.1], "model.width": [8, 64]}
    gap = lambda p, s: 0.1 * (p["train.lr"] == 0.1) + 0.2 * (p["model.width"] == 64)  # noqa: E731
    # right about lr everywhere, wrong about width at lr = 0.01 only
    mu = lambda p, s: (p["train.lr"] == 0.1) + (p["model.width"] == 64) * (1 if p["train.lr"] == 0.1 else -5)  # noqa: E731
    row = correlations(grid_frame(values, gap, {"hessian_top_eig": mu}), n_boot=0).loc["hessian_top_eig"]
    assert row["sign_error_max[train.lr]"] == 0.0
    assert row["sign_error_max[model.width]"] == 1.0
    assert row["sign_error_mean"] == pytest.approx(0.25) and row["n_environments"] == 4


# --- grid, seeds, exclusions, orientation ------------------------------------------------------


def test_incomplete_grid_raises_naming_the_missing_cells():
    values = {"train.lr": [0.01, 0.1, 1.0], "train.batch_size": [32, 256]}
    df = grid_frame(
        values, lambda p, s: p["train.lr"] * p["train.batch_size"], {"hessian_top_eig": lambda p, s: p["train.lr"]}
    )
    df.loc[(df["train.lr"] == 1.0) & (df["train.batch_size"] == 32), "status"] = "diverged"
    df = df[~((df["train.lr"] == 0.01) & (df["train.batch_size"] == 256))]  # never run
    with pytest.raises(IncompleteGridError) as err:
        correlations(df, n_boot=0)
    msg = str(err.value)
    assert "2 of 6" in msg and "allow_incomplete_grid=True" in msg
    assert "train.lr=1.0, train.batch_size=32) [diverged]" in msg
    assert "train.lr=0.01, train.batch_size=256) [not run]" in msg

    with pytest.warns(UserWarning, match="incomplete grid"):
        table = correlations(df, n_boot=0, allow_incomplete_grid=True)
    row = table.loc["hessian_top_eig"]
    assert math.isnan(row["Psi"]) and math.isnan(row["psi[train.lr]"]) and math.isnan(row["cmi"])
    assert "incomplete grid" in row["note"] and np.isfinite(row["tau"])
    assert len(table.attrs["missing_cells"]) == 2 and table.attrs["grid_complete"] is False


def test_seeds_are_averaged_per_configuration_and_exclusions_counted():
    values = {"train.lr": [0.01, 0.1, 1.0, 3.0]}
    # seed 1 ranks the other way than seed 0; the mean follows seed 0 (larger spread)
    mu = lambda p, s: p["train.lr"] * (4 if s == 0 else -1)  # noqa: E731
    df = grid_frame(values, lambda p, s: p["train.lr"], {"hessian_top_eig": mu}, seeds=(0, 1))
    df["data.seed"] = df["seed"] + 100  # a second seed column, found by default
    extra = df.iloc[:4].copy()
    extra["status"] = ["diverged", "failed", "not_converged", "diverged"]
    extra["hessian_top_eig"] = 1e9
    table = correlations(pd.concat([df, extra], ignore_index=True), n_boot=0)
    row = table.loc["hessian_top_eig"]
    assert row["n"] == 4 and row["n_runs"] == 8
    assert row["tau"] == pytest.approx(1.0)
    assert table.attrs["excluded"] == {"diverged": 2, "failed": 1, "not_converged": 1}
    assert table.attrs["seed_columns"] == ["seed", "data.seed"] and table.attrs["keys"] == ["train.lr"]
    # with only "seed" declared, data.seed becomes a hyperparameter: 8 distinct models
    row1 = correlations(df, n_boot=0, seed_columns=["seed"], hyperparameters=["train.lr"]).loc["hessian_top_eig"]
    assert row1["n"] == 8


def test_flatter_metric_gets_its_sign_flipped(monkeypatch):
    from landscape.metrics import METRICS, Metric

    monkeypatch.setitem(METRICS, "toy_flatness", Metric("toy_flatness", "flatter", lambda ctx: 0.0))
    values = {"train.lr": [0.01, 0.1, 1.0], "train.batch_size": [16, 64]}
    gap = lambda p, s: p["train.lr"] + p["train.batch_size"] / 100  # noqa: E731
    flat = lambda p, s: -(gap(p, s) ** 3)  # larger = flatter = smaller gap: agrees with the hypothesis  # noqa: E731
    df = grid_frame(values, gap, {"toy_flatness": flat, "as_is": flat})
    table = correlations(df, measures=["toy_flatness", "as_is"], n_boot=0)
    assert table.loc["toy_flatness", "orientation"] == "flatter" and table.loc["toy_flatness", "sign"] == -1
    assert table.loc["toy_flatness", "tau"] == pytest.approx(1.0) and table.loc["toy_flatness", "Psi"] == pytest.approx(
        1.0
    )
    assert table.loc["toy_flatness", "sign_error_max"] == 0.0
    assert table.loc["as_is", "orientation"] == "neither" and table.loc["as_is", "tau"] == pytest.approx(-1.0)
    assert "orientation unknown" in table.loc["as_is", "note"]
    # the same column declared flatter by the caller
    override = correlations(df, measures=["as_is"], n_boot=0, orientation={"as_is": "flatter"})
    assert override.loc["as_is", "tau"] == pytest.approx(1.0)
    # an accuracy target is oriented too: tau against test_acc with target_larger_is inferred
    acc = correlations(df, target="test_acc", measures=["toy_flatness"], n_boot=0)
    assert acc.attrs["target_larger_is"] == "better" and acc.loc["toy_flatness", "tau"] == pytest.approx(1.0)


def test_default_measures_are_registered_metric_columns():
    df = grid_frame(
        {"train.lr": [0.1, 1.0, 2.0]},
        lambda p, s: p["train.lr"],
        {
            "hessian_top_eig": lambda p, s: p["train.lr"],
            "hessian_top_eig_seconds": lambda p, s: 1.0,
            "hessian_spectrum_trace": lambda p, s: p["train.lr"],
            "wall_time": lambda p, s: 3.0,
        },
    )
    table = correlations(df, n_boot=0)
    assert list(table.index) == ["hessian_top_eig", "hessian_spectrum_trace"]
    assert table.loc["hessian_spectrum_trace", "orientation"] == "sharper"


# --- bootstrap ---------------------------------------------------------------------------------


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_more_models():
    def table(n_b):
        rng = np.random.default_rng(n_b)
        df = grid_frame(
            {"h.a": [1, 2, 3, 4, 5], "h.b": list(range(n_b))},
            lambda p, s: p["h.a"] + rng.normal(0, 2),
            {"hessian_top_eig": lambda p, s: 0},
        )
        df["hessian_top_eig"] = df["gen_gap"] + rng.normal(0, 1.5, len(df))
        return correlations(df, n_boot=300, seed=0).loc["hessian_top_eig"]

    small, large = table(4), table(40)
    for row in (small, large):
        assert row["tau_ci_low"] <= row["tau"] <= row["tau_ci_high"]
        assert row["Psi_ci_low"] <= row["Psi"] <= row["Psi_ci_high"]
        assert row["tau_ci_low"] < row["tau_ci_high"]
    assert (large["tau_ci_high"] - large["tau_ci_low"]) < 0.6 * (small["tau_ci_high"] - small["tau_ci_low"])
    assert (large["Psi_ci_high"] - large["Psi_ci_low"]) < 0.6 * (small["Psi_ci_high"] - small["Psi_ci_low"])


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    df = grid_frame({"train.lr": [0.1, 1.0]}, lambda p, s: p["train.lr"], {"hessian_top_eig": lambda p, s: 1.0})
    with pytest.raises(KeyError, match="target='test_error'"):
        correlations(df, target="test_error")
    with pytest.raises(KeyError, match="measures: 'nope'"):
        correlations(df, measures=["nope"])
    with pytest.raises(ValueError, match="hyperparameters: 'seed'"):
        correlations(df, hyperparameters=["seed"])
    with pytest.raises(ValueError, match="n_boot"):
        correlations(df, n_boot=-1)
    with pytest.raises(ValueError, match="no registered landscape metric"):
        correlations(df.drop(columns="hessian_top_eig"))


def test_in_training_metrics_are_not_taken_for_hyperparameters():
    """``track.<metric>`` columns (last value tracked during training) and ``steps_to_loss_0.1``
    vary like a hyperparameter but are metrics: the default hyperparameters and the grid check
    must ignore them."""
    rng = np.random.default_rng(0)
    rows = [
        {
            "train.lr": lr,
            "model.width": w,
            "gen_gap": g,
            "hessian_top_eig": g + 0.01 * rng.random(),
            "track.hessian_top_eig": rng.random(),
            "steps_to_loss_0.1": rng.integers(100, 1000),  # a metric whose name holds a decimal point
            "status": "converged",
            "n_test": 1000,
        }
        for (lr, w), g in zip(itertools.product([0.1, 0.2], [8, 16]), [0.1, 0.2, 0.3, 0.4])
    ]
    table = sweeps.correlations(pd.DataFrame(rows), measures=["hessian_top_eig"], n_boot=10)
    assert table.attrs["hyperparameters"] == ["train.lr", "model.width"]
    assert table.attrs["grid_complete"]


# --- hyperparameter effects and complete sub-grids ----------------------------------------------
def test_hyperparameter_effects_by_hand():
    """lambda_max = log(batch) - lr: +1 along batch ('full' mapped to its size), -1 along lr, in
    every group; the gap grows with lr in one width group and falls in the other: mean 0. One
    group's tau checked against scipy."""
    values = {"train.lr": [0.1, 0.2, 0.4], "train.batch_size": [32, 128, "full"], "model.width": [64, 256]}
    size = {"full": 4000}

    def gap(p, s):
        return 0.1 + (p["train.lr"] if p["model.width"] == 64 else -p["train.lr"]) + 0.001 * s

    frame = grid_frame(
        values,
        gap,
        {
            "hessian_top_eig": lambda p, s: (
                math.log(size.get(p["train.batch_size"], p["train.batch_size"])) - p["train.lr"]
            )
        },
        seeds=(0, 1),
    )
    table = hyperparameter_effects(frame, ["hessian_top_eig", "gen_gap"], values={"train.batch_size": size}, n_boot=200)
    assert table.loc[("train.batch_size", "hessian_top_eig"), "tau"] == 1.0
    assert table.loc[("train.lr", "hessian_top_eig"), "tau"] == -1.0
    assert table.loc[("train.lr", "hessian_top_eig"), ["tau_ci_low", "tau_ci_high"]].tolist() == [-1.0, -1.0]
    assert table.loc[("train.lr", "gen_gap"), "tau"] == pytest.approx(0.0)
    assert (
        table.loc[("train.lr", "gen_gap"), "n_groups"] == 6 and table.loc[("model.width", "gen_gap"), "n_groups"] == 9
    )
    # one group of width: (lr, batch) fixed, width 64 vs 256 -> gap falls at every lr
    assert table.loc[("model.width", "gen_gap"), "tau"] == -1.0
    one = frame[(frame["model.width"] == 64) & (frame["train.batch_size"] == 32)].groupby("train.lr")["gen_gap"].mean()
    assert stats.kendalltau(one.index, one.to_numpy()).statistic == pytest.approx(1.0)
    assert (
        table.loc[("train.batch_size", "gen_gap"), "tau"] != table.loc[("train.batch_size", "gen_gap"), "tau"]
    )  # NaN: constant in every group
    with pytest.raises(ValueError, match=r"train.batch_size='full' is not a number.*values="):
        hyperparameter_effects(frame, ["hessian_top_eig"])


def test_complete_subgrid_drops_the_value_of_the_missing_cells():
    values = {"train.lr": [0.1, 0.2, 0.4], "train.batch_size": [32, 64, 128], "model.width": [8, 16]}
    frame = grid_frame(values, lambda p, s: 0.1, {"hessian_top_eig": lambda p, s: 1.0}, seeds=(0, 1))
    diverged = (frame["train.lr"] == 0.4) & frame["train.batch_size"].isin([32, 64])
    frame.loc[diverged, "status"] = "diverged"
    rows, dropped = complete_subgrid(frame)
    assert dropped == {"train.lr": [0.4]}
    assert len(rows) == 2 * 3 * 2 * 2 and set(rows["status"]) == {"converged"}
    correlations(rows, n_boot=0)  # complete: no IncompleteGridError
    with pytest.raises(IncompleteGridError):
        correlations(frame, n_boot=0)
    assert complete_subgrid(frame[~diverged])[1] == {"train.lr": [0.4]}  # cells never run are missing too
    whole, none = complete_subgrid(rows)
    assert none == {} and whole.equals(rows)
