"""What the driver shows while a sweep runs: a rich live table, or plain log lines with ``--quiet``.

The live view shows counts of done / running / failed / diverged trials, the best trial so
far, elapsed time and an ETA (mean finished-trial wall time x trials left / concurrency), plus
one line per running trial with its latest streamed metrics.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..spec.status import TrialStatus, is_finished

if TYPE_CHECKING:
    from rich.live import Live


@dataclass
class RunningTrial:
    """A trial in flight as the view shows it."""

    number: int
    point: Mapping[str, Any]
    started: float
    latest: dict[str, float] = field(default_factory=dict)
    step: int = 0


@dataclass
class Snapshot:
    """The sweep's state at one moment (all times in seconds)."""

    name: str
    budget: int
    counts: Mapping[str, int]
    running: list[RunningTrial]
    best: str
    elapsed: float
    concurrency: int
    mean_trial_seconds: float | None

    @property
    def finished(self) -> int:
        return sum(v for k, v in self.counts.items() if is_finished(k))

    @property
    def eta(self) -> float | None:
        if self.mean_trial_seconds is None:
            return None
        left = max(self.budget - self.finished, 0)
        return self.mean_trial_seconds * math.ceil(left / max(self.concurrency, 1))


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _short(values: Mapping[str, Any], limit: int = 4) -> str:
    parts = []
    for key, value in list(values.items())[:limit]:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key.rsplit('.', 1)[-1]}={text}")
    return " ".join(parts)


class ProgressView:
    """Live terminal view of a sweep; one plain line per event instead with ``quiet=True`` or
    when ``stream`` (default stderr) is not a terminal."""

    def __init__(self, quiet: bool = False, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        # A live view only on a terminal: piped into a file or a log it would wrap at 80 columns.
        self.quiet = quiet or not getattr(self.stream, "isatty", lambda: False)()
        self._live: Live | None = None

    def __enter__(self) -> ProgressView:
        if not self.quiet:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=self.stream), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def log(self, line: str) -> None:
        """An event line (trial started/finished, recovery, interrupt)."""
        stamped = f"[{time.strftime('%H:%M:%S')}] {line}"
        if self._live is not None:
            self._live.console.print(stamped, markup=False, highlight=False)
        else:
            print(stamped, file=self.stream, flush=True)

    def update(self, snap: Snapshot) -> None:
        if self._live is not None:
            self._live.update(self._render(snap))

    @staticmethod
    def _render(snap: Snapshot) -> Any:
        from rich.table import Table

        counts = snap.counts
        table = Table(title=f"sweep {snap.name}", title_justify="left", expand=False)
        for column in ("done", "running", "failed", "diverged", "budget", "elapsed", "ETA"):
            table.add_column(column, justify="right")
        done = sum(counts.get(k, 0) for k in (TrialStatus.CONVERGED, TrialStatus.NOT_CONVERGED, TrialStatus.PRUNED))
        table.add_row(
            str(done),
            str(len(snap.running)),
            str(counts.get(TrialStatus.FAILED, 0)),
            str(counts.get(TrialStatus.DIVERGED, 0)),
            f"{snap.finished}/{snap.budget}",
            _clock(snap.elapsed),
            _clock(snap.eta),
        )
        grid = Table.grid(padding=(0, 1))
        grid.add_row(table)
        grid.add_row(f"best: {snap.best}")
        for trial in sorted(snap.running, key=lambda t: t.number):
            grid.add_row(
                f"  #{trial.number:<4d} {_short(trial.point)} | step {trial.step} {_short(trial.latest)}"
                f" | {_clock(time.monotonic() - trial.started)}"
            )
        return grid
