"""The exit codes of the ``sweeps`` command line, defined once (``sweeps --help`` lists them,
the README and the sweep guide state them, tests/test_cli_sweep.py checks both)."""

from __future__ import annotations

import textwrap

#: Exit codes of every subcommand (``run``/``resume`` use all of them).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_OBJECTIVE, EXIT_LEASE_LOST, EXIT_STORE_DOWN, EXIT_INTERRUPTED = (
    0,
    1,
    2,
    3,
    4,
    5,
    130,
)
EXIT_CODES = {
    EXIT_OK: "success (run/resume: the sweep finished and at least one trial produced the objective)",
    EXIT_ERROR: "an unexpected error (a traceback is printed)",
    EXIT_USAGE: "bad input or an unreachable service: invalid config, flag or name, a store that cannot be "
    "reached, or a sweep held by another live driver; nothing was run or written",
    EXIT_NO_OBJECTIVE: "run/resume: the sweep finished but no trial produced the objective (all failed or diverged); "
    "measure: some trials could not be measured (each is named on stderr)",
    EXIT_LEASE_LOST: "run/resume: another driver took over this sweep while this one was paused; it stopped "
    "without writing",
    EXIT_STORE_DOWN: "a store (Optuna storage or MLflow tracking store) stayed unreachable past "
    "SWEEPS_STORE_RETRY_SECONDS (reads: SWEEPS_READ_RETRY_SECONDS); run/resume cancelled the running trials "
    "(they keep their checkpoints) and `sweeps resume NAME` continues",
    EXIT_INTERRUPTED: "run/resume: interrupted (Ctrl-C / SIGTERM); running trials were recorded interrupted and "
    "`sweeps resume NAME` continues; measure: interrupted, run it again to continue",
}


def exit_codes_text() -> str:
    """The exit codes as ``--help`` shows them."""
    return "exit codes:\n" + "\n".join(
        textwrap.fill(text, 96, initial_indent=f"  {code:<5d}", subsequent_indent=" " * 7)
        for code, text in EXIT_CODES.items()
    )


__all__ = [
    "EXIT_CODES",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_LEASE_LOST",
    "EXIT_NO_OBJECTIVE",
    "EXIT_OK",
    "EXIT_STORE_DOWN",
    "EXIT_USAGE",
    "exit_codes_text",
]
