"""The analysis report of a sweep: table, figures, CSV/JSON, one self-contained HTML file, MLflow.

* :func:`make_report` works on a results DataFrame alone (no MLflow): it computes
  :func:`sweeps.analysis.correlations` and writes into ``out_dir``

  - ``correlations.csv`` and ``correlations.json`` (the table; the JSON adds ``attrs``: target,
    exclusion counts, missing grid cells, orientation convention),
  - ``psi_heatmap.png``: granulated Kendall psi, measures x hyperparameters,
  - ``scatter_<measure>.png``: each measure against test accuracy, one panel per hyperparameter,
    points coloured by that hyperparameter,
  - ``trend_<measure>.png``: each measure against each hyperparameter (median over the other
    hyperparameters and seeds, every run as a faint dot; log axes where values span decades),
  - ``report.html``: all of the above in one file, images embedded as base64; with a
    ``connectivity`` table (a sweep measured with ``sweeps measure --metric seed_barrier``) also
    whether flatter configurations are more connected across seeds
    (:func:`sweeps.posthoc.connectivity.connectivity_lines`).

* :func:`print_table` prints the table with rich.
* :func:`log_report` puts the folder on an MLflow run (artifact path ``analysis/``) plus summary
  metrics ``analysis.tau.<measure>`` / ``analysis.Psi.<measure>``.
* :func:`report_sweep` fetches a sweep's results from MLflow, makes the report, logs it to the
  sweep's parent run and returns it; ``sweeps report NAME`` and the runner call it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..analysis import correlations, format_cells
from ..analysis.figures import is_numeric, psi_heatmap, scatter_figure, trend_figure
from ..service.outages import retrying_read
from ..spec.status import TrialStatus
from .queries import find_parent_run

REFERENCES = (
    "Kendall (1938, 1945) tau-b; Jiang et al. (2020) 'Fantastic generalization measures and where to find them' "
    "(granulated Kendall psi/Psi, CMI); Dziugaite et al. (2020) 'In search of robust measures of "
    "generalization' (robust sign-error)"
)


@dataclass
class Report:
    """What :func:`make_report` produced.

    Attributes:
        table: the :func:`~sweeps.analysis.correlations` table (``.attrs`` included).
        out_dir: the folder holding every file.
        files: ``{name: path}`` of every file written (``"csv"``, ``"json"``, ``"html"``, and
            one entry per figure, keyed by its file stem, e.g. ``"psi_heatmap"``).
        connectivity: the sentences on flatness vs connectivity across seeds
            (:func:`sweeps.posthoc.connectivity.connectivity_lines`); empty without seed_barrier results.
    """

    table: pd.DataFrame
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    connectivity: list[str] = field(default_factory=list)

    @property
    def html(self) -> Path:
        return self.files["html"]


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(value) else float(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def table_json(table: pd.DataFrame) -> dict[str, Any]:
    """The table as ``{"measures": {name: {column: value}}, "attrs": {...}}``, NaN as null."""
    return _json_ready({"measures": table.to_dict(orient="index"), "attrs": dict(table.attrs)})


def summary_lines(table: pd.DataFrame) -> list[str]:
    """Plain-text lines that must not be missed: runs used, exclusions, grid status, convention."""
    a = table.attrs
    excluded = ", ".join(f"{v} {k}" for k, v in a.get("excluded", {}).items()) or "none"
    lines = [
        f"target: {a.get('target')} (larger = {a.get('target_larger_is')} generalization); "
        f"{a.get('n_runs_used')} of {a.get('n_runs_total')} runs used, {a.get('n_models')} models after "
        f"averaging seeds {a.get('seed_columns')}; excluded: {excluded}",
    ]
    if not a.get("grid_complete", True):
        missing = a.get("missing_cells", [])
        lines.append(
            f"INCOMPLETE GRID: {a.get('n_missing_cells', len(missing))} of {a.get('n_cells')} cells missing, psi/Psi/CMI are undefined (NaN): "
            + format_cells(missing, 5)
        )
    lines.append(f"orientation: {a.get('convention')}")
    lines.append(f"sign-error weighting: {a.get('sign_error_weighting')}")
    return lines


def _fmt(value: Any, ci: tuple[Any, Any] | None = None, signed: bool = True) -> str:
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return "-"
        text = f"{value:+.3f}" if signed else f"{value:.3f}"
        if ci is not None and all(isinstance(c, (float, np.floating)) and math.isfinite(c) for c in ci):
            text += f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"
        return text
    return str(value)


def print_table(table: pd.DataFrame, console: Any = None, title: str | None = None) -> None:
    """Print the correlations table with rich: one row per measure, then the summary lines."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    psi_cols = [c for c in table.columns if c.startswith("psi[")]
    rich_table = Table(title=title or f"How well each measure predicts {table.attrs.get('target', 'the target')}")
    for name in ["measure", "larger is", "n", "tau [CI]", "spearman", *psi_cols, "Psi [CI]", "CMI", "sign-err max"]:
        rich_table.add_column(
            escape(name), justify="left" if name in ("measure", "larger is") else "right", no_wrap=name == "measure"
        )
    for measure, row in table.iterrows():
        rich_table.add_row(
            escape(str(measure)),
            str(row["orientation"]),
            str(row["n"]),
            _fmt(row["tau"], (row["tau_ci_low"], row["tau_ci_high"])),
            _fmt(row["spearman"]),
            *[_fmt(row[c]) for c in psi_cols],
            _fmt(row["Psi"], (row["Psi_ci_low"], row["Psi_ci_high"])),
            _fmt(row["cmi"], signed=False),
            _fmt(row["sign_error_max"], signed=False),
        )
    console.print(rich_table)
    for line in summary_lines(table):
        console.print(line, style="bold red" if line.startswith("INCOMPLETE") else None, markup=False)
    notes = {part for n in table["note"] if n for part in str(n).split("; ") if not part.startswith("incomplete grid")}
    for note in sorted(notes):
        console.print(f"note: {note}", markup=False)


def _html_document(
    title: str, table: pd.DataFrame, images: Mapping[str, Path], connectivity: pd.DataFrame | None = None
) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        ".warn{color:#b00;font-weight:bold}img{max-width:100%;margin:1em 0}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for line in summary_lines(table):
        cls = " class='warn'" if line.startswith("INCOMPLETE") else ""
        parts.append(f"<p{cls}>{html.escape(line)}</p>")
    parts.append(f"<p>References: {html.escape(REFERENCES)}.</p>")
    parts.append(table.to_html(float_format=lambda v: f"{v:.3f}", na_rep="-", escape=True))
    if connectivity is not None and not connectivity.empty:
        from .connectivity import connectivity_lines

        parts.append("<h2>Are flatter configurations more connected across seeds?</h2>")
        parts.append(
            "<p>Seed pairs of each configuration joined by a straight line (sweeps measure --metric "
            "seed_barrier); Kendall tau over the configurations between a measure's mean and the mean barrier, "
            "95% bootstrap interval over configurations.</p>"
        )
        parts.extend(f"<p>{html.escape(line)}</p>" for line in connectivity_lines(connectivity))
        parts.append(connectivity.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))
    for name, path in images.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def make_report(
    df: pd.DataFrame,
    out_dir: str | Path,
    *,
    target: str = "gen_gap",
    measures: Sequence[str] | None = None,
    hyperparameters: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    title: str | None = None,
    allow_incomplete_grid: bool = True,
    dpi: int = 110,
    connectivity: pd.DataFrame | None = None,
    **correlation_options: Any,
) -> Report:
    """Compute :func:`~sweeps.analysis.correlations` on ``df`` and write the report into ``out_dir``.

    ``allow_incomplete_grid`` defaults to True here (a diverged cell must not cost the whole
    report): psi/Psi/CMI are then NaN and the report says so in red. Other keyword arguments go
    to :func:`~sweeps.analysis.correlations` (``seed_columns``, ``orientation``, ...). Figures are
    PNG at ``dpi``. ``connectivity``: a :func:`sweeps.posthoc.connectivity.flatness_vs_connectivity`
    table (``seed_barriers(NAME, flatness=True)``), stated in the HTML when given and not empty.
    Returns a :class:`Report` with the table and the paths of all files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = correlations(
        df,
        target=target,
        measures=measures,
        hyperparameters=hyperparameters,
        n_boot=n_boot,
        seed=seed,
        allow_incomplete_grid=allow_incomplete_grid,
        **correlation_options,
    )
    report = Report(table=table, out_dir=out)
    if connectivity is not None and not connectivity.empty:
        from .connectivity import connectivity_lines

        report.connectivity = connectivity_lines(connectivity)
    report.files["csv"] = out / "correlations.csv"
    table.to_csv(report.files["csv"])
    report.files["json"] = out / "correlations.json"
    report.files["json"].write_text(json.dumps(table_json(table), indent=2, allow_nan=False))

    runs = df[df["status"].astype(str) == TrialStatus.CONVERGED] if "status" in df.columns else df
    runs = runs.copy()
    for k in table.attrs["hyperparameters"]:
        if not is_numeric(runs[k]):
            runs[k] = runs[k].astype(str)
    hps = list(table.attrs["hyperparameters"])
    y = "test_acc" if "test_acc" in runs.columns else target
    figures: dict[str, Figure] = {"psi_heatmap": psi_heatmap(table)}
    for m in table.index:
        usable = runs[np.isfinite(pd.to_numeric(runs[m], errors="coerce")) & runs[y].notna()]
        if usable.empty:
            continue
        figures[f"scatter_{_safe_name(m)}"] = scatter_figure(usable, m, y, hps)
        if hps:
            figures[f"trend_{_safe_name(m)}"] = trend_figure(usable, m, hps)
    for name, fig in figures.items():
        report.files[name] = out / f"{name}.png"
        fig.savefig(report.files[name], dpi=dpi)
    images = {name: report.files[name] for name in figures}
    title = title or f"Sweep analysis: which measure predicts {target}?"
    report.files["html"] = out / "report.html"
    report.files["html"].write_text(_html_document(title, table, images, connectivity), encoding="utf-8")
    return report


def _tracking_uri(tracking_uri: str | None, results_dir: str | Path | None = None) -> str:
    """The URI ``sweeps run`` would use: argument, $SWEEPS_TRACKING_URI, $MLFLOW_TRACKING_URI, results dir."""
    from ..service.connections import resolve

    return resolve(tracking_uri=tracking_uri, results_dir=results_dir, create=False).tracking_uri


def log_report(
    report: Report,
    run_id: str,
    tracking_uri: str | None = None,
    artifact_path: str = "analysis",
    *,
    results_dir: str | Path | None = None,
) -> None:
    """Upload the report folder to MLflow run ``run_id`` under ``artifact_path`` and log summary metrics.

    Metrics: ``analysis.tau.<measure>``, ``analysis.Psi.<measure>``, ``analysis.cmi.<measure>``,
    ``analysis.sign_error_max.<measure>`` (finite values only), in one batch.
    """
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=_tracking_uri(tracking_uri, results_dir))
    client.log_artifacts(run_id, str(report.out_dir), artifact_path=artifact_path)
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"analysis.{stat}.{_safe_name(measure)}", float(row[stat]), now, 0)
        for measure, row in report.table.iterrows()
        for stat in ("tau", "Psi", "cmi", "sign_error_max")
        if isinstance(row[stat], (float, np.floating)) and math.isfinite(row[stat])
    ]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)


@retrying_read
def report_sweep(
    name: str,
    tracking_uri: str | None = None,
    out_dir: str | Path | None = None,
    *,
    log: bool = True,
    df: pd.DataFrame | None = None,
    results_dir: str | Path | None = None,
    **report_options: Any,
) -> Report:
    """Fetch sweep ``name``'s results, write the report to ``out_dir`` and log it to the parent run.

    Args:
        name: sweep name (= MLflow experiment name).
        tracking_uri: MLflow tracking URI (``None``: as for ``sweeps run``: $SWEEPS_TRACKING_URI,
            $MLFLOW_TRACKING_URI, else the results directory's ``mlflow.db``).
        out_dir: folder for the files (default ``<results dir>/reports/<name>``).
        log: upload to the sweep's parent run (artifact path ``analysis/``).
        df: use these results instead of fetching them with :func:`sweeps.results`.
        results_dir: results directory for the default tracking URI (see :func:`sweeps.results`).
        report_options: passed to :func:`make_report` (``target``, ``measures``, ``n_boot``, ...).
    """
    if df is None:
        from .queries import results

        df = results(name, tracking_uri=tracking_uri, results_dir=results_dir)
    if out_dir is None:
        from ..service.connections import resolve

        out_dir = (
            resolve(tracking_uri=tracking_uri, results_dir=results_dir, create=False).results_dir
            / "reports"
            / _safe_name(name)
        )
    out = Path(out_dir)
    report_options.setdefault("title", f"Sweep {name}: which measure predicts generalization?")
    if "connectivity" not in report_options:
        from .connectivity import flatness_table

        report_options["connectivity"] = flatness_table(name, df, tracking_uri, results_dir=results_dir)
    report = make_report(df, out, **report_options)
    if log:
        parent = find_parent_run(name, tracking_uri, results_dir=results_dir)
        log_report(report, parent, tracking_uri, results_dir=results_dir)
    return report


__all__ = [
    "Report",
    "find_parent_run",
    "log_report",
    "make_report",
    "print_table",
    "psi_heatmap",
    "report_sweep",
    "scatter_figure",
    "trend_figure",
]
