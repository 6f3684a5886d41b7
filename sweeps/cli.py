"""The ``sweeps`` command line. Thin: it parses, calls library functions, prints.

Exit codes: 0 success, 2 bad usage or bad config (message on stderr, nothing run), anything an
uncaught exception gives otherwise.

Adding a subcommand: write ``def cmd_xxx(args) -> int`` and decorate it with
``@command("xxx", help="...", arguments=_xxx_arguments)`` where ``_xxx_arguments(parser)`` adds
its options. Subcommands appear in the order they are defined.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import ConfigError


@dataclass(frozen=True)
class _Command:
    name: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None]
    help: str


_COMMANDS: list[_Command] = []


def command(name: str, *, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register ``fn(args) -> int`` as subcommand ``name`` with options added by ``arguments``."""

    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _COMMANDS.append(_Command(name, fn, arguments, help))
        return fn

    return deco


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG`` and repeatable ``--set dotted.key=value`` (shared by config-taking commands)."""
    parser.add_argument("config", metavar="CONFIG.yaml", help="sweep config file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, value parsed as YAML (repeatable), e.g. --set train.lr=0.1",
    )


def _trial_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", metavar="DIR", help="also write plots, arrays and history into DIR")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--progress", action="store_true", help="print training progress to stderr")


@command("trial", help="run one trial here (no Ray, no MLflow) and print its result as JSON", arguments=_trial_arguments)
def cmd_trial(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trial import run_trial

    config = load_config(args.config, args.overrides)

    def progress(metrics: dict[str, float], step: int) -> None:
        print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), file=sys.stderr)

    result = run_trial(config, out_dir=args.out, device=args.device, log=progress if args.progress else None)
    json.dump(result.to_dict(), sys.stdout, indent=1)
    print()
    return 0


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="sweep name")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: as for `sweeps run`)")
    parser.add_argument("--results-dir", help="results directory of the default stores")
    parser.add_argument("--out", metavar="DIR", help="report folder (default: <results dir>/reports/NAME)")
    parser.add_argument("--target", default="gen_gap", help="column to predict (default: gen_gap)")
    parser.add_argument("--measures", type=lambda s: s.split(","), help="comma-separated measure columns")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    parser.add_argument("--no-log", dest="log", action="store_false", help="do not log to the MLflow parent run")


@command("report", help="which flatness measure predicts generalization: table, plots, HTML, MLflow", arguments=_report_arguments)
def cmd_report(args: argparse.Namespace) -> int:
    from .report import print_table, report_sweep

    try:
        report = report_sweep(
            args.name, args.tracking_uri, args.out, log=args.log, results_dir=args.results_dir,
            target=args.target, measures=args.measures, n_boot=args.n_boot,
        )
    except (LookupError, ValueError) as err:
        print(f"sweeps report: {err}", file=sys.stderr)
        return 2
    print_table(report.table, title=f"Sweep {args.name}: which measure predicts {args.target}?")
    print(f"report: {report.html}" + ("  (logged to the sweep's MLflow parent run)" if args.log else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweeps", description="Hyperparameter sweeps that measure the loss landscape of every model."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in _COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sweeps``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2, message printed)
        return int(exit_.code or 0)
    try:
        return args._run(args)
    except ConfigError as err:
        print(f"sweeps {args.command}: invalid config:\n{err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
