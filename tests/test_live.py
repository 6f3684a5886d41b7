"""sweeps.service.live: the live tau series equals sweeps.correlations on the same trials at every step,
a failing update is logged and not raised, and the table reads back from the parent's metrics."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from sweeps.analysis import correlations, tau_table
from sweeps.service.live import LIVE_BOOTSTRAP, LiveCorrelation, live_target, read_live_table


def synthetic_trials(n_seeds: int = 2) -> pd.DataFrame:
    """A grid lr x width x seed with measures that track the gap (noisily) and a few non-converged trials."""
    rng = np.random.default_rng(0)
    rows = []
    for number, (lr, width, seed) in enumerate(itertools.product([0.01, 0.03, 0.1, 0.3], [8, 32], range(n_seeds))):
        gap = 0.2 - 0.3 * lr + 0.01 * rng.standard_normal()
        rows.append(
            {
                "trial_number": number,
                "status": "not_converged" if number % 7 == 3 else "converged",
                "train.lr": lr,
                "model.width": width,
                "seed": seed,
                "gen_gap": gap,
                "test_acc": 0.9 - gap,
                "n_test": 500,
                "hessian_top_eig": 10 * gap + rng.random(),
                "dist_from_init": width * lr + rng.random(),
            }
        )
    return pd.DataFrame(rows)


@pytest.mark.filterwarnings("ignore:incomplete grid")
def test_the_live_series_equals_correlations_at_every_step():
    frame = synthetic_trials()
    written, messages = [], []
    live = LiveCorrelation(
        "gen_gap",
        ["train.lr", "model.width", "seed"],
        lambda m, step, fig: written.append((step, m, fig)),
        messages.append,
        interval=0.0,
    )
    for count, row in enumerate(frame.to_dict("records"), 1):
        point = {k: row[k] for k in ("train.lr", "model.width", "seed")}
        metrics = {k: row[k] for k in ("gen_gap", "test_acc", "n_test", "hessian_top_eig", "dist_from_init")}
        live.add(row["trial_number"], row["status"], point, metrics)
        written.clear()
        live.close()  # the update a driver makes at the end; here after every trial
        so_far = frame.iloc[:count]
        if not (so_far["status"] == "converged").any():
            assert not written
            continue
        ((step, metrics, figures),) = written
        reference = (
            correlations(
                so_far.drop(columns="trial_number"), "gen_gap", n_boot=LIVE_BOOTSTRAP, allow_incomplete_grid=True
            )
            if count > 1
            else None
        )
        assert (
            step
            == metrics["live.n_models"]
            == so_far.loc[so_far["status"] == "converged", ["train.lr", "model.width"]].drop_duplicates().shape[0]
        )
        if reference is None or step < 2:
            continue
        for measure in ("hessian_top_eig", "dist_from_init"):
            for column in ("tau", "tau_ci_low", "tau_ci_high"):
                expected = reference.loc[measure, column]
                assert metrics.get(f"live.{column}.{measure}", np.nan) == pytest.approx(
                    expected, abs=1e-12, nan_ok=True
                )
        assert {p.name for p in figures.glob("*.png")} == {"hessian_top_eig.png", "dist_from_init.png"}
    assert not messages
    table = read_live_table(written[-1][1])
    assert list(table.index) == ["dist_from_init", "hessian_top_eig"] and table.attrs["n_models"] == 8
    assert table.loc["hessian_top_eig", "tau"] == pytest.approx(
        tau_table(frame, "gen_gap", n_boot=LIVE_BOOTSTRAP).loc["hessian_top_eig", "tau"]
    )


def test_history_counts_once_and_a_failing_update_is_logged_not_raised():
    frame = synthetic_trials()
    written, messages = [], []
    earlier = frame.iloc[:10].assign(**{"train.batch_size": 32})  # a constant config column, as in sweeps.results
    live = LiveCorrelation(
        "gen_gap",
        ["train.lr", "model.width", "seed"],
        lambda m, step, fig: written.append(step),
        messages.append,
        interval=0.0,
        history=lambda: earlier,
    )
    for row in frame.iloc[8:].to_dict("records"):  # trials 8, 9 are in the history too: counted once
        live.add(
            row["trial_number"],
            row["status"],
            {k: row[k] for k in ("train.lr", "model.width", "seed")},
            {k: row[k] for k in ("gen_gap", "test_acc", "n_test", "hessian_top_eig", "dist_from_init")},
        )
    live.close()
    assert written == [8] and not messages

    def broken(*_):
        raise ConnectionError("tracking server unreachable")

    failing = LiveCorrelation("gen_gap", ["train.lr"], broken, messages.append, interval=0.0)
    failing.add(0, "converged", {"train.lr": 0.1}, {"gen_gap": 0.1, "hessian_top_eig": 1.0})
    failing.add(1, "converged", {"train.lr": 0.2}, {"gen_gap": 0.2, "hessian_top_eig": 2.0})
    failing.close()
    assert messages and "not logged (ConnectionError" in messages[-1]


def test_the_target_is_the_objective_when_it_is_an_outcome():
    assert live_target(["test_acc"]) == "test_acc"
    assert live_target(["hessian_top_eig"]) == "gen_gap" and live_target([]) == "gen_gap"


def test_a_failing_update_in_the_background_is_logged_and_the_next_one_still_comes():
    written, messages = [], []
    live = LiveCorrelation(
        "gen_gap", ["train.lr"], lambda m, step, fig: written.append((step, m)), messages.append, interval=0.0
    )
    live.add(0, "converged", {"train.lr": 0.1}, {"gen_gap": 0.1, "hessian_top_eig": "not a number"})
    live.poll()  # starts the update in its thread; the driver goes on
    live.close()  # waits for it: it failed, nothing to log
    assert not written and len(messages) == 1 and "update failed: ValueError" in messages[0]
    live.add(
        0, "converged", {"train.lr": 0.1}, {"gen_gap": 0.1, "hessian_top_eig": 1.0}
    )  # the same trial, recorded again
    live.add(1, "converged", {"train.lr": 0.2}, {"gen_gap": 0.2, "hessian_top_eig": 2.0})
    live.close()
    ((step, metrics),) = written
    assert step == metrics["live.n_models"] == 2 and metrics["live.tau.hessian_top_eig"] == 1.0
