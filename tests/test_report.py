"""sweeps.posthoc.report: files on disk, a self-contained HTML file, rich output, a real MLflow store, the CLI."""

from __future__ import annotations

import base64
import io
import itertools
import json

import numpy as np
import pandas as pd
import pytest

from sweeps.posthoc.report import find_parent_run, make_report, print_table, report_sweep, trend_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_results(seed: int = 0, *, diverged_cell: bool = True, drop_diverged: bool = False) -> pd.DataFrame:
    """A 3 x 2 x 2 grid (lr x width x optimizer) with two seeds, two measures and (by default) one
    diverged cell (lr 1, width 16, adam)."""
    rng = np.random.default_rng(seed)
    rows = []
    for number, (lr, width, opt, s) in enumerate(
        itertools.product([0.01, 0.1, 1.0], [16, 32], ["sgd", "adam"], [0, 1])
    ):
        gap = 0.05 * np.log10(1 / lr) + 0.02 * (opt == "adam") + rng.normal(0, 0.005)
        diverged = diverged_cell and lr == 1.0 and width == 16 and opt == "adam"
        rows.append(
            {
                "sweep": "toy",
                "trial_number": number,
                "run_id": f"r{number}",
                "status": "diverged" if diverged else "converged",
                "train.lr": lr,
                "model.width": width,
                "train.optimizer": opt,
                "seed": s,
                "gen_gap": np.nan if diverged else gap,
                "test_acc": np.nan if diverged else 0.95 - gap,
                "hessian_top_eig": np.nan if diverged else 10 ** (20 * gap) * (1 + rng.normal(0, 0.05)),
                "hessian_trace": np.nan if diverged else rng.lognormal(3, 1),
                "n_test": 2000,
            }
        )
    df = pd.DataFrame(rows)
    return df[df["status"] == "converged"] if drop_diverged else df


def test_make_report_writes_csv_json_pngs_and_self_contained_html(tmp_path):
    report = make_report(synthetic_results(diverged_cell=False), tmp_path / "out", n_boot=50)

    figures = [k for k in report.files if k not in ("csv", "json", "html")]
    assert set(figures) == {
        "psi_heatmap",
        "scatter_hessian_top_eig",
        "trend_hessian_top_eig",
        "scatter_hessian_trace",
        "trend_hessian_trace",
    }
    for name in figures:
        assert report.files[name].read_bytes()[:8] == PNG_MAGIC, name

    csv = pd.read_csv(report.files["csv"], index_col="measure")
    assert list(csv.index) == ["hessian_top_eig", "hessian_trace"]
    assert csv.loc["hessian_top_eig", "tau"] == pytest.approx(report.table.loc["hessian_top_eig", "tau"])
    assert {"psi[train.lr]", "psi[model.width]", "psi[train.optimizer]", "Psi", "cmi", "sign_error_max"} <= set(
        csv.columns
    )
    assert report.table.loc["hessian_top_eig", "Psi"] > 0.5  # a complete grid: Psi defined

    data = json.loads(report.files["json"].read_text())
    assert data["attrs"]["grid_complete"] is True and data["attrs"]["n_models"] == 12
    assert data["measures"]["hessian_top_eig"]["tau_ci_low"] <= data["measures"]["hessian_top_eig"]["tau"]

    page = report.html.read_text()
    embedded = page.count("src='data:image/png;base64,")
    assert embedded == len(figures) and page.count("src=") == embedded  # nothing linked from outside
    first = page.split("src='data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(first)[:8] == PNG_MAGIC
    assert "hessian_top_eig" in page and "Jiang et al." in page and "INCOMPLETE" not in page


def test_incomplete_grid_and_exclusions_are_impossible_to_miss(tmp_path):
    report = make_report(synthetic_results(), tmp_path, n_boot=0)  # the diverged cell stays missing
    assert np.isnan(report.table.loc["hessian_top_eig", "Psi"])
    page = report.html.read_text()
    assert "class='warn'>INCOMPLETE GRID: 1 of 12 cells missing" in page
    assert "train.optimizer=adam) [diverged]" in page and "excluded: 2 diverged" in page

    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    print_table(report.table, console=console)
    text = console.file.getvalue()
    assert "INCOMPLETE GRID" in text and "excluded: 2 diverged" in text and "hessian_top_eig" in text
    assert "psi[train.lr]" in text and "psi[train.optimizer]" in text  # not eaten as rich markup
    assert "larger = worse generalization" in text


def test_trend_axes_are_logarithmic_only_where_values_span_decades():
    df = synthetic_results(drop_diverged=True)
    fig = trend_figure(df, "hessian_top_eig", ["train.lr", "model.width", "train.optimizer"])
    lr_axis, width_axis, opt_axis = fig.axes[:3]
    assert lr_axis.get_xscale() == "log" and width_axis.get_xscale() == "linear"
    assert [t.get_text() for t in opt_axis.get_xticklabels()] == ["adam", "sgd"]
    assert lr_axis.get_yscale() == "log"  # lambda_max spans decades


# --- real MLflow store: the parent run gets the artifacts --------------------------------------


@pytest.fixture(scope="module")
def mlflow_sweep(tmp_path_factory):
    """A sweep recorded through sweeps.service.tracking into sqlite: parent run + one child run per trial."""
    from sweeps.service.tracking import Tracker

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(uri, artifact_root=(root / "artifacts").as_uri())
    name = "toy-sweep"
    parent = tracker.start_parent(
        name, flat_config={"name": name}, resolved_config={"name": name}, config_yaml="name: toy-sweep\n"
    )
    for _, row in synthetic_results(drop_diverged=True).iterrows():
        params = {k: row[k] for k in ("train.lr", "model.width", "train.optimizer", "seed")}
        child = tracker.start_child(name, parent, int(row["trial_number"]), params)
        metrics = {k: float(row[k]) for k in ("gen_gap", "test_acc", "hessian_top_eig", "hessian_trace", "n_test")}
        tracker.finish_child(child, "converged", metrics)
    tracker.end_parent(parent, "FINISHED", {"trials": 22})
    return name, uri, parent, root


def _artifact_names(uri: str, run_id: str, path: str) -> set[str]:
    from mlflow import MlflowClient

    return {a.path.split("/")[-1] for a in MlflowClient(tracking_uri=uri).list_artifacts(run_id, path)}


def test_report_sweep_logs_artifacts_and_metrics_on_the_parent_run(mlflow_sweep, tmp_path):
    from mlflow import MlflowClient

    name, uri, parent, _ = mlflow_sweep
    assert find_parent_run(name, uri) == parent
    report = report_sweep(name, uri, tmp_path / "report", n_boot=50)
    assert report.table.attrs["n_models"] == 11 and report.table.attrs["excluded"] == {}

    artifacts = _artifact_names(uri, parent, "analysis")
    assert {
        "correlations.csv",
        "correlations.json",
        "report.html",
        "psi_heatmap.png",
        "scatter_hessian_top_eig.png",
        "trend_hessian_trace.png",
    } <= artifacts
    metrics = MlflowClient(tracking_uri=uri).get_run(parent).data.metrics
    assert metrics["analysis.tau.hessian_top_eig"] == pytest.approx(report.table.loc["hessian_top_eig", "tau"])
    with pytest.raises(LookupError, match="no sweep named 'missing'"):
        find_parent_run("missing", uri)


def test_cli_report_prints_the_table_and_writes_the_folder(mlflow_sweep, tmp_path, capsys):
    from sweeps.cli import main

    name, uri, parent, _ = mlflow_sweep
    out = tmp_path / "cli-report"
    code = main(["report", name, "--tracking-uri", uri, "--out", str(out), "--n-boot", "20", "--no-log"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "hessian_top_eig" in printed and "Psi" in printed and str(out / "report.html") in printed
    assert (out / "report.html").exists() and (out / "correlations.csv").exists()

    assert main(["report", "nope", "--tracking-uri", uri, "--out", str(out)]) == 2
    assert "no sweep named 'nope'" in capsys.readouterr().err
