"""The ``sweeps`` command line. Thin: it parses, calls library functions, prints.

Exit codes are :data:`~sweeps.exit_codes.EXIT_CODES` (shown by ``sweeps --help``).

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
from typing import TYPE_CHECKING, Any

from .exit_codes import (
    EXIT_INTERRUPTED,
    EXIT_LEASE_LOST,
    EXIT_NO_OBJECTIVE,
    EXIT_OK,
    EXIT_STORE_DOWN,
    EXIT_USAGE,
    exit_codes_text,
)
from .service.outages import StoreUnavailableError
from .spec.config import ConfigError, check_name
from .spec.errors import UsageError

if TYPE_CHECKING:
    from .runner import SweepSummary


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
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, value parsed as YAML (repeatable), e.g. --set train.lr=0.1",
    )


def _trial_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", metavar="DIR", help="also write plots, arrays and history into DIR")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--progress", action="store_true", help="print training progress to stderr")


def _check_out_dir(out: str | None) -> None:
    """Refuse (``UsageError``) an ``--out DIR`` holding a symbolic link that leads out of it: the
    command writes its files into DIR by fixed names, and a write must not land elsewhere."""
    if out:
        from pathlib import Path

        from .service.connections import check_inside

        folder = Path(out)
        check_inside(folder, sorted(folder.iterdir()) if folder.is_dir() else [], "--out")


@command(
    "trial", help="run one trial here (no Ray, no MLflow) and print its result as JSON", arguments=_trial_arguments
)
def cmd_trial(args: argparse.Namespace) -> int:
    from .spec.config import load_config
    from .trial.run import run_trial

    config = load_config(args.config, args.overrides)
    _check_out_dir(args.out)

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


@command(
    "report",
    help="which flatness measure predicts generalization: table, plots, HTML, MLflow",
    arguments=_report_arguments,
)
def cmd_report(args: argparse.Namespace) -> int:
    from .posthoc.report import print_table, report_sweep

    try:
        check_name(args.name, "NAME")
        _check_out_dir(args.out)
        report = report_sweep(
            args.name,
            args.tracking_uri,
            args.out,
            log=args.log,
            results_dir=args.results_dir,
            target=args.target,
            measures=args.measures,
            n_boot=args.n_boot,
        )
    except (LookupError, ValueError) as err:
        print(f"sweeps report: {err}", file=sys.stderr)
        return 2
    print_table(report.table, title=f"Sweep {args.name}: which measure predicts {args.target}?")
    print(f"report: {report.html}" + ("  (logged to the sweep's MLflow parent run)" if args.log else ""))
    return 0


# --- sweep service: run, resume, submit, results, status, list (sweeps.runner / results) -----
def _store_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a sweep lives (see sweeps.service.connections for the flag > environment > default rule)."""
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (env SWEEPS_TRACKING_URI / MLFLOW_TRACKING_URI; "
        "default sqlite:///<results dir>/mlflow.db)",
    )
    parser.add_argument(
        "--storage",
        help="Optuna storage URL or journal file (env SWEEPS_STORAGE; default sqlite:///<results dir>/optuna.db)",
    )
    parser.add_argument("--results-dir", help="results directory (env SWEEPS_RESULTS_DIR; default ./sweeps-results)")


def _launch_arguments(parser: argparse.ArgumentParser) -> None:
    _store_arguments(parser)
    parser.add_argument(
        "--address",
        help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 (env RAY_ADDRESS; "
        "default: start a local Ray sized to this machine)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        metavar="K",
        help="trials in flight (default: resources.max_concurrent, else as many as the cluster fits)",
    )
    parser.add_argument(
        "--max-retries", type=int, default=2, help="re-runs of a trial whose worker/node died (default 2)"
    )
    parser.add_argument(
        "--prune",
        action="store_true",
        help="stop unpromising trials early (not for grids; see the sweep guide, docs/guide/sweeps.md)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="plain log lines instead of the live view (always so when stderr is not a terminal)",
    )
    parser.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="skip the analysis report at the end of the sweep (run `sweeps report NAME` later)",
    )


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--name", help="sweep name (default: the config's name)")
    _launch_arguments(parser)


def _store_flags(args: argparse.Namespace) -> str:
    """The store flags the user gave, to repeat in a suggested follow-up command."""
    import shlex

    from .service.connections import redact

    given = [
        (f"--{flag.replace('_', '-')}", getattr(args, flag, None))
        for flag in ("results_dir", "storage", "tracking_uri")
    ]
    return "".join(f" {flag} {shlex.quote(redact(str(value)))}" for flag, value in given if value is not None)


def _sweep(args: argparse.Namespace, run: Callable[..., SweepSummary]) -> int:
    """Call run_sweep/resume_sweep with the launch flags; map outcomes to exit codes (:data:`~sweeps.exit_codes.EXIT_CODES`)."""
    from .runner import SweepInterrupted
    from .service.connections import redact
    from .service.lease import LeaseHeldError, LeaseLostError

    prog = f"sweeps {args.command}"
    options = dict(
        address=args.address,
        tracking_uri=args.tracking_uri,
        storage=args.storage,
        results_dir=args.results_dir,
        max_concurrent=args.max_concurrent,
        quiet=args.quiet,
        max_retries=args.max_retries,
        prune=args.prune,
        report=args.report,
    )
    try:
        summary = run(**options)
    except SweepInterrupted as stop:
        print(
            f"{prog}: interrupted; running trials were marked interrupted. Continue with "
            f"`sweeps resume {stop.summary.name}{_store_flags(args)}`",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except LeaseLostError as err:
        print(f"{prog}: {redact(str(err))}", file=sys.stderr)
        return EXIT_LEASE_LOST
    except StoreUnavailableError as err:
        print(
            f"{prog}: stopped: {redact(str(err))}. Running trials were cancelled and keep their checkpoints; "
            f"once the store is back, continue with `sweeps resume {err.sweep or 'NAME'}{_store_flags(args)}`",
            file=sys.stderr,
        )
        return EXIT_STORE_DOWN
    except ConfigError as err:  # a flag checked as the config field it overrides
        print(f"{prog}: {err}", file=sys.stderr)
        return EXIT_USAGE
    # unreachable store, StudyConflictError, bad flags, another driver holds the sweep
    except (ConnectionError, ValueError, LookupError, LeaseHeldError) as err:
        print(f"{prog}: {redact(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    flags = _store_flags(args)
    hint = _mlflow_hint(summary)
    if hint:
        print(hint, file=sys.stderr)
    print(
        f"sweep {summary.name}: {summary.finished}/{summary.budget} trials finished "
        f"({', '.join(f'{k}={v}' for k, v in sorted(summary.counts.items()))}); "
        f"results: sweeps results {summary.name}{flags}"
    )
    if summary.complete == 0:
        print(
            f"{prog}: no trial of sweep {summary.name} produced the objective; see the failures with "
            f"`sweeps results {summary.name}{flags} --all` and each run's traceback.txt in MLflow",
            file=sys.stderr,
        )
        return EXIT_NO_OBJECTIVE
    return EXIT_OK


def _mlflow_hint(summary: Any) -> str:
    """Where to look at the sweep in the MLflow UI (its runs table and parent run), or ``""``."""
    from .service.tracking import ui_hint

    try:
        return ui_hint(summary.connections.tracking_uri, summary.parent_run_id)
    except Exception:  # a link is a courtesy: the sweep's outcome is printed regardless
        return ""


@command(
    "run",
    help="run a sweep (Ray workers, Optuna search, MLflow tracking); continues a sweep of the same config",
    arguments=_run_arguments,
)
def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_sweep
    from .spec.config import load_config, read_config_text

    config = load_config(args.config, args.overrides)
    text = read_config_text(args.config)
    if args.overrides:
        text += "".join(f"\n# --set {o}" for o in args.overrides)
    return _sweep(args, lambda **kw: run_sweep(config, name=args.name, config_yaml=text, **kw))


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--name", help="sweep name (default: the config's name)")
    _store_arguments(parser)
    parser.add_argument("--address", help="Ray cluster the run would use (env RAY_ADDRESS; default: a local Ray)")
    parser.add_argument("--max-concurrent", type=int, metavar="K", help="trials in flight (as for `sweeps run`)")


@command(
    "check",
    help="check a config as `sweeps run` would (fields, stores, paths, dataset, model) and print "
    "what it would run; runs and writes nothing",
    arguments=_check_arguments,
)
def cmd_check(args: argparse.Namespace) -> int:
    from .service.connections import redact
    from .service.plan import check_sweep

    try:
        plan = check_sweep(
            args.config,
            args.overrides,
            name=args.name,
            results_dir=args.results_dir,
            tracking_uri=args.tracking_uri,
            storage=args.storage,
            address=args.address,
            max_concurrent=args.max_concurrent,
        )
    except ConfigError:
        raise  # main(): "invalid config", exit 2
    except (ConnectionError, ValueError, LookupError) as err:  # a store, a taken name, a path
        print(f"sweeps check: {redact(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(plan.lines()))
    return EXIT_OK


def _resume_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="sweep name (its config is read from the study)")
    _launch_arguments(parser)


@command(
    "resume",
    help="continue an interrupted sweep: finished trials are kept, interrupted ones re-run",
    arguments=_resume_arguments,
)
def cmd_resume(args: argparse.Namespace) -> int:
    from .runner import resume_sweep

    check_name(args.name, "NAME")
    return _sweep(args, lambda **kw: resume_sweep(args.name, **kw))


def _submit_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--address", required=True, help="Ray Jobs address of the head node, http://HEAD:8265")
    parser.add_argument("--name", help="sweep name (default: the config's name)")
    parser.add_argument(
        "--working-dir", default=".", help="folder packaged for the job; must contain CONFIG (default .)"
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI as seen from the cluster (an HTTP server)")
    parser.add_argument("--storage", help="Optuna storage URL as seen from the cluster (e.g. postgresql://...)")
    parser.add_argument("--results-dir", help="results directory on the head node")
    parser.add_argument("--max-concurrent", type=int, metavar="K", help="trials in flight")


@command(
    "submit",
    help="submit `sweeps run` to a Ray cluster as a Ray Job and print how to follow it",
    arguments=_submit_arguments,
)
def cmd_submit(args: argparse.Namespace) -> int:
    from .service.submit import submit

    return submit(args)


def _results_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="sweep name")
    _store_arguments(parser)
    parser.add_argument(
        "--format", choices=("table", "csv", "parquet"), default="table", help="output format (default table)"
    )
    parser.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout (required for parquet)")
    parser.add_argument("--include-interrupted", action="store_true", help="also list interrupted attempts")
    parser.add_argument(
        "--all",
        dest="all_columns",
        action="store_true",
        help="every column (default for the table: trial, status, objective, varied "
        "hyperparameters and measures; csv and parquet always have every column)",
    )


@command(
    "results",
    help="one row per trial: hyperparameters, metrics, status (table, CSV or Parquet)",
    arguments=_results_arguments,
)
def cmd_results(args: argparse.Namespace) -> int:
    from .posthoc.queries import results

    if args.format == "parquet" and not args.out:
        print("sweeps results: --format parquet needs --out FILE", file=sys.stderr)
        return 2
    try:
        check_name(args.name, "NAME")
        frame = results(
            args.name, args.tracking_uri, results_dir=args.results_dir, include_interrupted=args.include_interrupted
        )
    except (LookupError, ValueError) as err:
        print(f"sweeps results: {err}", file=sys.stderr)
        return 2
    if args.format == "parquet":
        frame.to_parquet(args.out, index=False)
    elif args.format == "csv":
        frame.to_csv(args.out or sys.stdout, index=False)
    else:
        from .posthoc.queries import summary_columns

        shown = frame if args.all_columns else frame[summary_columns(frame)]
        text = shown.to_string(index=False, max_colwidth=24)
        if args.out:
            with open(args.out, "w") as handle:
                handle.write(text + "\n")
        else:
            print(text)
    return 0


def _measure_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="sweep name")
    parser.add_argument("--metric", dest="metrics", action="append", required=True, metavar="M", help="measure M")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="measure_options.M.K=V")
    parser.add_argument("--force", action="store_true", help="measure again trials that have the measure already")
    _store_arguments(parser)
    parser.add_argument("--address", help="Ray cluster, as for `sweeps run` (default: a local Ray)")
    parser.add_argument("--max-concurrent", type=int, metavar="K", help="tasks in flight (default: as Ray fits)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not rebuild the report")


@command(
    "measure",
    help="compute measures for the trials a sweep measures (converged and not_converged, not diverged or "
    "pruned) from their stored weights; values go to the trials' own MLflow runs",
    arguments=_measure_arguments,
)
def cmd_measure(args: argparse.Namespace) -> int:
    from .posthoc.remeasure import command as measure_command

    check_name(args.name, "NAME")
    return measure_command(args)


def _import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", metavar="MANIFEST.yaml", help="dataset, model and the list of trained models")
    parser.add_argument("--name", help="sweep name (default: the manifest's name)")
    _store_arguments(parser)


@command("import", help="record models trained elsewhere as a finished sweep", arguments=_import_arguments)
def cmd_import(args: argparse.Namespace) -> int:
    from .posthoc.manifest import command as import_command

    return import_command(args)


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="sweep name")
    _store_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


@command(
    "status",
    help="trials per status, budget, best trial and live correlation table of a sweep",
    arguments=_status_arguments,
)
def cmd_status(args: argparse.Namespace) -> int:
    from .posthoc.queries import sweep_status

    try:
        check_name(args.name, "NAME")
        info = sweep_status(
            args.name, storage=args.storage, tracking_uri=args.tracking_uri, results_dir=args.results_dir
        )
    except (LookupError, ValueError) as err:
        print(f"sweeps status: {err}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(info, sys.stdout, indent=1, default=str)
        print()
        return 0
    print(f"sweep {info['name']}: {info['finished']}/{info['budget'] or '?'} finished")
    print("  " + ", ".join(f"{k}={v}" for k, v in sorted(info["counts"].items())))
    print(f"  driver: {_describe_driver(info['driver'])}")
    print("  objective: " + ", ".join(f"{m} ({d})" for m, d in info["objective"].items()))
    for best in info["best"][:5]:
        print(f"  best #{best['number']}: values={best['values']} params={best['params']}")
    if info.get("live"):
        live = info["live"]
        print(
            f"  live correlation with {live['target']} ({live['n_models']} models; + = sharper, worse generalization):"
        )
        width = max(len(str(row["measure"])) for row in live["measures"])
        for row in live["measures"]:
            print(
                f"    {row['measure']:<{width}}  n={row['n']:<5.0f} tau={row['tau']:+.3f} "
                f"[{row['tau_ci_low']:+.3f}, {row['tau_ci_high']:+.3f}]"
            )
    print(f"  optuna: {info['storage']}\n  mlflow: {info['tracking_uri']} (parent run {info['mlflow_parent_run_id']})")
    return 0


def _describe_driver(driver: dict | None) -> str:
    if driver is None:
        return "none (no driver is running this sweep)"
    state = "running" if driver["alive"] else "stopped heart-beating: the next `sweeps run`/`resume` takes over"
    return f"{driver['description']}, {state}"


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", help="Optuna storage URL or journal file (default as for `sweeps run`)")
    parser.add_argument("--results-dir", help="results directory (default ./sweeps-results)")


@command("list", help="the sweeps in an Optuna storage with their progress", arguments=_list_arguments)
def cmd_list(args: argparse.Namespace) -> int:
    from .posthoc.queries import list_sweeps

    frame = list_sweeps(storage=args.storage, results_dir=args.results_dir)
    print(frame.to_string(index=False) if len(frame) else "no sweeps")
    return 0


def build_parser() -> argparse.ArgumentParser:
    epilog = exit_codes_text()
    parser = argparse.ArgumentParser(
        prog="sweeps",
        description="Hyperparameter sweeps that measure the loss landscape of every model.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in _COMMANDS:
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.help,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.arguments(p)
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="also show the INFO logs of Optuna, MLflow and Ray (hidden by default)",
        )
        p.set_defaults(handler=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sweeps``; returns the exit code (:data:`~sweeps.exit_codes.EXIT_CODES`)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2, message printed)
        return int(exit_.code or 0)
    from .service.logs import configure

    configure(verbose=args.verbose)
    try:
        return args.handler(args)
    except ConfigError as err:
        sep = "\n" if len(err.problems) > 1 else " "
        print(f"sweeps {args.command}: invalid config:{sep}{err}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as err:  # a NAME argument or a path refused before anything ran
        print(f"sweeps {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except StoreUnavailableError as err:  # a read (results, status, report, list) waited past its limit
        from .service.connections import redact

        print(f"sweeps {args.command}: {redact(str(err))}", file=sys.stderr)
        return EXIT_STORE_DOWN


if __name__ == "__main__":
    sys.exit(main())
