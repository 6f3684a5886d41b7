"""The driver's Ray connection: connect to a cluster or start a private local one, and how many
tasks fit on it at once. Used by ``sweeps run`` and ``sweeps measure``."""

from __future__ import annotations

from typing import Any


def connect_ray(address: str | None, quiet: bool) -> bool:
    """Connect to Ray (``address``) or start a private local one sized to this machine; True if started here.

    Without an address the private instance is started with Ray's ``address="local"``: a cluster
    that ``ray start`` left on this machine (live, or a stale ``ray_current_cluster`` file of a
    killed one) is left alone and never breaks the run (``--address auto`` uses it)."""
    import ray

    from .logs import ray_logging_level

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=quiet, logging_level=ray_logging_level())
    else:
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=quiet,
            object_store_memory=256 * 2**20,
            logging_level=ray_logging_level(),
        )
    return True


def task_slots(config: Any, max_concurrent: int | None) -> int:
    """Tasks a sweep (or ``sweeps measure``) runs at once: ``max_concurrent``, else
    ``resources.max_concurrent``, else as many as the connected cluster's CPUs (and GPUs) fit."""
    import ray

    limit = max_concurrent or config.resources.max_concurrent
    if limit:
        return int(limit)
    resources = ray.cluster_resources()
    fits = resources.get("CPU", 1) // config.resources.cpus_per_trial
    if config.resources.gpus_per_trial > 0:
        fits = min(fits, resources.get("GPU", 0) // config.resources.gpus_per_trial)
    return max(1, int(fits))
