"""sweeps.results: the DataFrame contract, from a real MLflow store written through the Tracker
(no Ray: the runs are recorded exactly as the driver records them)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from sweeps.posthoc.queries import SweepNotFoundError, _cast, list_sweeps, results, sweep_status
from sweeps.service import connections
from sweeps.service.tracking import Tracker
from sweeps.spec.config import load_config

pytestmark = pytest.mark.lowest  # .ci/lowest runs this module on the lowest versions


@pytest.fixture
def recorded(tmp_path):
    """A sweep 'res' of 4 trials: 2 converged, 1 diverged, 1 interrupted then re-run, 1 interrupted only."""
    config = load_config(
        {
            "name": "res",
            "dataset": {"name": "digits"},
            "measure": ["hessian_top_eig"],
            "search": {
                "sampler": "grid",
                "space": {"train.lr": {"values": [0.1, 1.0]}, "model.width": {"values": [8, 16]}},
            },
        }
    )
    conn = connections.resolve(results_dir=tmp_path, env={})
    tracker = Tracker(conn.tracking_uri, conn.artifact_root)
    parent = tracker.start_parent(
        "res", flat_config=config.flat(), resolved_config=config.model_dump(mode="json"), config_yaml=""
    )
    outcomes = [
        (0, {"train.lr": 0.1, "model.width": 8}, "converged", {"test_acc": 0.9, "n_test": 540, "hessian_top_eig": 3.5}),
        (1, {"train.lr": 1.0, "model.width": 8}, "diverged", {"test_acc": 0.1, "n_test": 540}),
        (2, {"train.lr": 0.1, "model.width": 16}, "interrupted", {}),
        (
            3,
            {"train.lr": 1.0, "model.width": 16},
            "converged",
            {"test_acc": 0.8, "n_test": 540, "hessian_top_eig": 9.0},
        ),
        (
            4,
            {"train.lr": 0.1, "model.width": 16},
            "not_converged",
            {"test_acc": 0.7, "n_test": 540, "hessian_top_eig": 1.0},
        ),
    ]
    for number, point, status, metrics in outcomes:
        run = tracker.start_child("res", parent, number, config.with_point(point).flat())
        if status == "interrupted":
            tracker.end(run, status)
        else:
            tracker.finish_child(run, status, metrics, step=5)
    return tmp_path


def test_one_typed_row_per_finished_trial(recorded):
    frame = results("res", results_dir=recorded)
    assert frame["trial_number"].tolist() == [0, 1, 3, 4]  # the interrupted attempt is left out
    assert frame["status"].tolist() == ["converged", "diverged", "converged", "not_converged"]
    assert list(frame.columns[:6]) == ["sweep", "trial_number", "status", "run_id", "train.lr", "model.width"]
    assert frame["train.lr"].dtype == "float64" and frame["train.lr"].tolist() == [0.1, 1.0, 1.0, 0.1]
    assert frame["model.width"].dtype == "int64" and frame["model.width"].tolist() == [8, 8, 16, 16]
    assert frame["seed"].dtype == "int64" and frame["train.nesterov"].dtype == bool
    assert frame["train.optimizer"].tolist() == ["sgd"] * 4
    assert frame["n_test"].dtype == "Int64" and frame["test_acc"].dtype == "float64"
    assert math.isnan(frame.loc[1, "hessian_top_eig"])  # a diverged trial has no measure
    assert (frame["sweep"] == "res").all()
    # the package-level name is the function, whatever was imported before (no submodule of that name)
    import sweeps.posthoc.queries  # noqa: F401

    assert sweeps.results is results
    pd.testing.assert_frame_equal(sweeps.results("res", results_dir=recorded), frame)

    everything = results("res", results_dir=recorded, include_interrupted=True)
    assert sorted(everything["status"]).count("interrupted") == 1 and len(everything) == 5


def test_unknown_sweep_names_the_fix(tmp_path):
    with pytest.raises(SweepNotFoundError, match="no sweep named 'nope'.*sweeps list"):
        results("nope", results_dir=tmp_path)
    with pytest.raises(SweepNotFoundError, match="no sweep named 'nope'"):
        sweep_status("nope", results_dir=tmp_path)
    assert list_sweeps(results_dir=tmp_path / "empty").empty
    assert not (tmp_path / "empty").exists()  # reading does not create stores


@pytest.mark.parametrize(
    "values, example, dtype, expected",
    [
        (["0.1", "1", "1e-3"], 0.05, "float64", [0.1, 1.0, 1e-3]),
        (["8", "16"], 32, "int64", [8, 16]),
        (["8", None], 32, "Int64", [8, None]),
        (["True", "False"], False, "bool", [True, False]),
        (["128", "full"], 64, "str", ["128", "full"]),
        (["4", "7"], None, "int64", [4, 7]),  # a key unset in the base config: inferred
        (["0.5", "2"], None, "float64", [0.5, 2.0]),
        (["relu", "tanh"], "relu", "str", ["relu", "tanh"]),
    ],
)
def test_cast_from_schema_type(values, example, dtype, expected):
    cast = _cast(pd.Series(values, dtype=object), example)
    if dtype == "str":  # the default string dtype: "str" from pandas 3 on, "object" before
        dtype = str(pd.Series(["x"]).astype(str).dtype)
    assert str(cast.dtype) == dtype
    assert cast.astype(object).where(cast.notna(), None).tolist() == expected
