"""The sharpness / generalization correlation of a running sweep, live on its MLflow parent run.

As trials finish the driver hands each one's point, status and metrics to
:class:`LiveCorrelation`. At most every ``interval`` seconds (and always at the end) a
background thread computes :func:`sweeps.analysis.tau_table` over the trials so far: the same
models, orientation, seed averaging and bootstrap as :func:`sweeps.correlations`, Kendall tau-b
only. The driver then logs on the parent run, with ``step`` = the number of models counted:

* ``live.tau.<measure>``, ``live.tau_ci_low.<measure>``, ``live.tau_ci_high.<measure>``
  (the 95 % percentile bootstrap interval) and ``live.n.<measure>`` (models with that measure)
  for every measure of the sweep, and ``live.n_models``;
* one figure per measure, ``live/<measure>.png``: the measure against test accuracy, one dot
  per converged trial, coloured by the first swept hyperparameter (replaced at every update;
  the report has the panels for the others).

So the MLflow UI's chart view of the parent run shows tau forming as models finish, and its
artifact view the scatter. ``sweeps status NAME`` prints the latest values
(:func:`read_live_table`). The computation never runs in the driver's loop (only the logging
does), waits ``interval`` seconds or ten times its own last duration, whichever is longer, and
a failure in it is logged, never raised. A resumed sweep starts from the trials already
recorded, so its series continues.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..spec.status import TrialStatus

#: Default seconds between two updates (at the least).
UPDATE_SECONDS = 10.0
#: Bootstrap resamples of the live intervals.
LIVE_BOOTSTRAP = 200
#: Metric name prefix on the parent run.
PREFIX = "live."
#: The columns of :func:`~sweeps.analysis.tau_table` logged per measure (``live.<column>.<measure>``).
LIVE_COLUMNS = ("n", "tau", "tau_ci_low", "tau_ci_high")


def live_target(objective_metrics: Sequence[str]) -> str:
    """What the live tau is computed against: the sweep's first objective when it is an outcome
    of training (``test_acc``, ``gen_gap``, losses), else ``gen_gap``."""
    from ..analysis import OUTCOME_COLUMNS

    first = objective_metrics[0] if objective_metrics else "gen_gap"
    return first if first in OUTCOME_COLUMNS and first not in ("n_test", "n_train") else "gen_gap"


def metric_names(table: pd.DataFrame) -> dict[str, float]:
    """The parent run's metrics for one :func:`~sweeps.analysis.tau_table` (NaN values left out:
    MLflow would show them as gaps anyway)."""
    out = {f"{PREFIX}n_models": float(table.attrs.get("n_models", 0))}
    for measure, row in table.iterrows():
        for column in LIVE_COLUMNS:
            value = float(row[column])
            if math.isfinite(value):
                out[f"{PREFIX}{column}.{measure}"] = value
    return out


class LiveCorrelation:
    """Rows of finished trials in, throttled tau tables and figures out (see the module docstring).

    Args:
        target: the column tau is computed against (:func:`live_target`).
        hyperparameters: the swept config keys, for the figures' colours.
        write: ``write(metrics, step, figure_dir)``: log the update on the parent run (called
            from the driver's thread, in :meth:`poll` and :meth:`close`).
        log: one-line messages (a failed update).
        interval: seconds between updates, at the least.
        history: rows of trials recorded before this driver run (e.g. the results frame of a
            resumed sweep), read in the background at the first update; keyed by
            ``trial_number`` like the rows :meth:`add` gets, so nothing counts twice.
    """

    def __init__(
        self,
        target: str,
        hyperparameters: Sequence[str],
        write: Callable[[dict[str, float], int, Path], None],
        log: Callable[[str], None],
        *,
        interval: float = UPDATE_SECONDS,
        history: Callable[[], pd.DataFrame] | None = None,
        n_boot: int = LIVE_BOOTSTRAP,
    ) -> None:
        self.target, self.hyperparameters, self.write, self.log = target, list(hyperparameters), write, log
        self.interval, self.history, self.n_boot = interval, history, n_boot
        self.rows: dict[int, dict[str, Any]] = {}
        self.changed = False
        self.next_start = 0.0
        self._thread: threading.Thread | None = None
        self._done: tuple[dict[str, float], int, Path] | None = None
        self._lock = threading.Lock()  # _done is set in the background thread, taken in the driver's
        self._history_rows: list[dict[str, Any]] = []
        self._figures = Path(tempfile.mkdtemp(prefix="sweeps-live-"))
        weakref.finalize(self, shutil.rmtree, self._figures, True)  # the figures' folder goes with the object

    def add(self, number: int, status: str, point: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """A finished trial: its number, status, search point (dotted keys) and final metrics."""
        self.rows[number] = {"trial_number": number, "status": str(status), **point, **metrics}
        self.changed = True

    def poll(self) -> None:
        """Log a finished update, start the next one when due; never blocks, never raises."""
        self._write_done()
        if self._thread is None and self.changed and time.monotonic() >= self.next_start:
            self._start()

    def close(self) -> None:
        """The final update: wait for the one running, compute the last one here, log it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._write_done()
        if self.changed:
            self._compute(list(self.rows.values()))
            self._write_done()

    def refresh(self) -> None:
        """One update now from ``history`` alone, no trial added: after measures were added to the
        recorded trials (``sweeps measure``); logged before it returns."""
        self.changed = True
        self.close()

    # -- internals ------------------------------------------------------------------------------
    def _start(self) -> None:
        rows = list(self.rows.values())
        self.changed = False
        self._thread = threading.Thread(target=self._compute, args=(rows,), name="sweeps-live", daemon=True)
        self._thread.start()

    def _compute(self, rows: list[dict[str, Any]]) -> None:
        started = time.monotonic()
        try:
            if self.history is not None:
                self._merge_history(self.history)
            rows = list(
                {**{r["trial_number"]: r for r in self._history_rows}, **{r["trial_number"]: r for r in rows}}.values()
            )
            done = self._update(pd.DataFrame(rows))
            with self._lock:
                self._done = done
        except Exception:  # the live view is a convenience: its failure must not end the sweep
            self.log("live correlation: update failed: " + traceback.format_exc().strip().splitlines()[-1])
        finally:
            spent = time.monotonic() - started
            self.next_start = time.monotonic() + max(self.interval, 10 * spent)

    def _merge_history(self, load: Callable[[], pd.DataFrame]) -> None:
        self.history = None
        try:
            frame = load()
        except Exception as err:  # no earlier trials (a new sweep) or an unreadable store
            self.log(f"live correlation: earlier trials not read ({type(err).__name__}: {err})")
            return
        from ..analysis import config_columns

        constant = [c for c in config_columns(frame) if c not in self.hyperparameters]  # not in add()'s rows either
        self._history_rows = frame.drop(columns=constant).to_dict("records")

    def _update(self, frame: pd.DataFrame) -> tuple[dict[str, float], int, Path] | None:
        from ..analysis import tau_table

        if (
            frame.empty
            or "status" not in frame
            or not (frame["status"] == TrialStatus.CONVERGED).any()
            or self.target not in frame
        ):
            return None
        table = tau_table(frame, self.target, n_boot=self.n_boot)
        step = int(table.attrs["n_models"])
        self._figures_for(frame, list(table.index))
        return metric_names(table), step, self._figures

    def _figures_for(self, frame: pd.DataFrame, measures: list[str]) -> None:
        from ..analysis.figures import scatter_figure

        runs = frame[frame["status"] == TrialStatus.CONVERGED]
        y = "test_acc" if "test_acc" in runs else self.target
        from ..analysis import default_seed_columns

        seeds = set(default_seed_columns(runs))
        colour_by = [h for h in self.hyperparameters if h in runs and h not in seeds and runs[h].nunique() > 1][:1]
        for measure in measures:
            if runs[measure].notna().sum() < 2:
                continue
            fig = scatter_figure(runs[runs[measure].notna()], measure, y, colour_by)
            fig.savefig(self._figures / f"{measure}.png", dpi=80)

    def _write_done(self) -> None:
        with self._lock:  # else an update set between the read and the reset would be lost
            done, self._done = self._done, None
        if self._thread is not None and not self._thread.is_alive():
            self._thread = None
        if done is None:
            return
        try:
            self.write(*done)
        except Exception as err:  # e.g. the tracking server is briefly unreachable
            self.log(f"live correlation: not logged ({type(err).__name__}: {err})")


def read_live_table(metrics: Mapping[str, float]) -> pd.DataFrame:
    """The latest live table from a parent run's metrics (``run.data.metrics``): one row per
    measure with the :data:`LIVE_COLUMNS`; ``.attrs["n_models"]``. Empty when the sweep has
    logged none yet."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(PREFIX) and key.count(".") >= 2:
            _, column, measure = key.split(".", 2)
            rows.setdefault(measure, {})[column] = value
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(LIVE_COLUMNS))
    table.index.name = "measure"
    table.attrs["n_models"] = int(metrics.get(f"{PREFIX}n_models", 0))
    return table.sort_index()


__all__ = [
    "LIVE_BOOTSTRAP",
    "LIVE_COLUMNS",
    "PREFIX",
    "UPDATE_SECONDS",
    "LiveCorrelation",
    "live_target",
    "metric_names",
    "read_live_table",
]
