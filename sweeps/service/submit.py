"""``sweeps submit``: a sweep submitted to a Ray cluster as a Ray Job.

The config is checked here (not on the cluster); where the job records (tracking URI, storage,
results directory) is resolved from the flags, then the submitting shell's environment, then the
cluster's own environment (read by a probe job): :func:`sweeps.service.connections.job_locations`. A fresh
head answers "try again later" until its job agent is up, and a cluster with token
authentication needs the token in the request: both are handled here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from ..spec.errors import UsageError

#: Seconds ``sweeps submit`` waits for a fresh head's job agent (and for its environment probe).
SUBMIT_AGENT_WAIT_SECONDS = 60


def submit(args: argparse.Namespace) -> int:
    """``sweeps submit``: check the config here, resolve where the job records, submit it, and
    print how to follow it; exit code 0, or 2 with one line when it cannot be submitted."""
    import os
    import shlex
    from pathlib import Path

    from ..spec.config import load_config
    from .connections import redact

    config = load_config(args.config, args.overrides)  # fail here, not on the cluster
    root, path = Path(args.working_dir).resolve(), Path(args.config).resolve()
    if not path.is_relative_to(root):
        print(
            f"sweeps submit: CONFIG {args.config} is outside --working-dir {root}; move it there or pass --working-dir",
            file=sys.stderr,
        )
        return 2
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from .connections import job_locations

    state: dict[str, Any] = {"headers": None, "mode": ""}  # mode: what the follow-up `ray job` commands need

    def call(action: Callable[[JobSubmissionClient], Any]) -> Any:
        """``action(client)``, waiting for a fresh head's job agent and retrying once with a token."""
        try:
            return _with_agent(lambda: action(JobSubmissionClient(args.address, headers=state["headers"])))
        except AuthenticationError:
            # Clusters have token auth on by default (Ray >= 2.59), but the Jobs client sends a token
            # only when this process runs in token mode: retry once with the token at hand, if any.
            token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
            token = os.environ.get("RAY_AUTH_TOKEN") or (token_file.read_text().strip() if token_file.is_file() else "")
            if not token or state["headers"]:
                raise
            state["headers"], state["mode"] = {"Authorization": f"Bearer {token}"}, "RAY_AUTH_MODE=token "
            return _with_agent(lambda: action(JobSubmissionClient(args.address, headers=state["headers"])))

    runtime_env = {
        "working_dir": str(root),
        "excludes": [".git", "**/__pycache__", "sweeps-results", "*.db", "mlartifacts", "mlruns", ".venv"],
    }
    try:
        stores = job_locations(
            tracking_uri=args.tracking_uri,
            storage=args.storage,
            results_dir=args.results_dir,
            env=os.environ,
            cluster_env=lambda: call(_cluster_environment),
        )
        entrypoint = ["python", "-m", "sweeps.cli", "run", str(path.relative_to(root)), "--quiet", "--address", "auto"]
        entrypoint += [f"--set={o}" for o in args.overrides]
        options = {**stores, "name": args.name, "max_concurrent": args.max_concurrent}
        for flag, value in options.items():
            if value is not None:
                entrypoint += [f"--{flag.replace('_', '-')}", str(value)]
        job_id = call(
            lambda client: client.submit_job(
                entrypoint=shlex.join(entrypoint), runtime_env=runtime_env, metadata={"sweep": args.name or config.name}
            )
        )
    except UsageError as err:
        print(f"sweeps submit: {err}", file=sys.stderr)
        return 2
    except AuthenticationError:
        print(
            f"sweeps submit: {redact(args.address)} requires a Ray auth token: set RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH; `ray get-auth-token` on the head prints it)",
            file=sys.stderr,
        )
        return 2
    except (ConnectionError, RuntimeError) as err:
        print(f"sweeps submit: cannot submit to {redact(args.address)}: {redact(str(err))}", file=sys.stderr)
        return 2
    mode = state["mode"]
    print(job_id)
    print(f"follow it:  {mode}ray job logs --address {redact(args.address)} --follow {job_id}", file=sys.stderr)
    print(f"status:     {mode}ray job status --address {redact(args.address)} {job_id}", file=sys.stderr)
    print(
        f"stop it:    {mode}ray job stop --address {redact(args.address)} {job_id}   (then `sweeps resume` continues it)",
        file=sys.stderr,
    )
    return 0


def _with_agent(request: Callable[[], Any]) -> Any:
    """``request()``; a head that has just started answers 500 "No available agent to submit job,
    please try again later" until its job agent is up (seconds): retried for up to
    :data:`SUBMIT_AGENT_WAIT_SECONDS`, then raised."""
    deadline, waiting = time.monotonic() + SUBMIT_AGENT_WAIT_SECONDS, False
    while True:
        try:
            return request()
        except RuntimeError as err:
            if "try again later" not in str(err) or time.monotonic() > deadline:
                raise
            if not waiting:
                print(
                    f"sweeps submit: the cluster's job agent is not up yet; retrying for up to "
                    f"{SUBMIT_AGENT_WAIT_SECONDS} s",
                    file=sys.stderr,
                )
                waiting = True
            time.sleep(1.0)


#: The marker of the environment probe's output line (:func:`_cluster_environment`).
_PROBE = "SWEEPS-CLUSTER-ENVIRONMENT "


def _cluster_environment(client: Any) -> dict[str, str | None]:
    """The store settings of the cluster's own environment, as a job sees them: a tiny probe job
    (no working directory, a second or two) prints them; the job is deleted afterwards."""
    import shlex

    from ray.job_submission import JobStatus

    from .connections import ENVIRONMENT

    names = [k for keys in ENVIRONMENT.values() for k in keys]
    code = f"import json, os; print({_PROBE!r} + json.dumps({{k: os.environ.get(k) for k in {names!r}}}))"
    job = client.submit_job(entrypoint=shlex.join(["python", "-c", code]), metadata={"sweeps": "environment probe"})
    deadline = time.monotonic() + SUBMIT_AGENT_WAIT_SECONDS
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            client.stop_job(job)
            raise RuntimeError(f"the environment probe job {job} did not finish within {SUBMIT_AGENT_WAIT_SECONDS} s")
        time.sleep(0.3)
    logs = client.get_job_logs(job)
    with contextlib.suppress(Exception):  # a leftover finished probe is harmless
        client.delete_job(job)
    line = next((ln for ln in logs.splitlines() if ln.startswith(_PROBE)), None)
    if status != JobStatus.SUCCEEDED or line is None:
        raise RuntimeError(f"the environment probe job {job} failed ({status}): {logs[-500:]}")
    return json.loads(line[len(_PROBE) :])
