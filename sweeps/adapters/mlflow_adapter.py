"""What the sweep service needs of MLflow beyond its public API (MLflow >= 3.0, < 4).

Reading a sweep's trial runs from a database tracking store (SQLite, PostgreSQL, MySQL) with
four SQL queries instead of ``search_runs`` (which builds an ORM object and an MLflow entity per
tag, param and metric: ~800,000 of each at 10,000 trials; see docs/benchmarks.md) needs:

* the client's store: ``MlflowClient._tracking_client.store`` (no public accessor), recognized
  by MLflow's ``SqlAlchemyStore`` class, and its ``engine``;
* MLflow's table declarations in ``mlflow.store.tracking.dbmodels.models`` (``runs``, ``tags``,
  ``params``, ``latest_metrics``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd


def sql_engine(client: Any) -> Any | None:
    """The SQLAlchemy engine of ``client``'s tracking store when it is a database, else ``None``
    (an ``mlflow server``, a file store)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = client._tracking_client.store
    return store.engine if isinstance(store, SqlAlchemyStore) else None


def read_trial_tables(
    engine: Any, experiment_id: str, parent_run_id: str | None, *, role_tag: str, parent_tag: str, tags: Sequence[str]
) -> tuple[pd.DataFrame, ...]:
    """The active runs of ``experiment_id`` tagged ``role_tag = 'trial'`` (and ``parent_tag =
    parent_run_id`` when given), as four long frames: runs (``run_uuid``, ``end_time``), their
    ``tags`` among ``tags`` (``run_uuid``, ``key``, ``value``), params (same columns) and latest
    metrics (``run_uuid``, ``key``, ``value``, ``is_nan``)."""
    import sqlalchemy as sa
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag

    run, tag = SqlRun.__table__, SqlTag.__table__
    role = tag.alias("role")
    query = (
        sa.select(run.c.run_uuid)
        .join(role, sa.and_(role.c.run_uuid == run.c.run_uuid, role.c.key == role_tag, role.c.value == "trial"))
        .where(run.c.experiment_id == int(experiment_id), run.c.lifecycle_stage == "active")
    )
    if parent_run_id is not None:
        parent = tag.alias("parent")
        query = query.join(
            parent,
            sa.and_(parent.c.run_uuid == run.c.run_uuid, parent.c.key == parent_tag, parent.c.value == parent_run_id),
        )
    chosen = query.subquery()

    def read(query: Any) -> pd.DataFrame:
        with engine.connect() as connection:
            result = connection.execute(query)
            columns = list(result.keys())
            return pd.DataFrame([tuple(row) for row in result.fetchall()], columns=columns)  # plain tuples: fast

    runs = read(sa.select(run.c.run_uuid, run.c.end_time).join(chosen, chosen.c.run_uuid == run.c.run_uuid))
    tag_rows = read(
        sa.select(tag.c.run_uuid, tag.c.key, tag.c.value)
        .join(chosen, chosen.c.run_uuid == tag.c.run_uuid)
        .where(tag.c.key.in_(list(tags)))
    )
    param = SqlParam.__table__
    params = read(
        sa.select(param.c.run_uuid, param.c.key, param.c.value).join(chosen, chosen.c.run_uuid == param.c.run_uuid)
    )
    latest = SqlLatestMetric.__table__
    metrics = read(
        sa.select(latest.c.run_uuid, latest.c.key, latest.c.value, latest.c.is_nan).join(
            chosen, chosen.c.run_uuid == latest.c.run_uuid
        )
    )
    return runs, tag_rows, params, metrics


__all__ = ["read_trial_tables", "sql_engine"]
