"""sweeps.adapters: the only modules that use Optuna, MLflow or Ray internals, and contract tests
pinning the behaviour each relies on, so that a release that changes it fails here first.

CI also runs these against the lowest versions pyproject.toml allows (.ci/lowest)."""

from __future__ import annotations

import ast
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweeps.adapters import mlflow_adapter, optuna_adapter, ray_adapter

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
ADAPTERS = SWEEPS / "adapters"
LIBRARIES = ("optuna", "mlflow", "ray")
# Modules of the libraries that are internal though not underscored.
INTERNAL_MODULES = ("mlflow.store",)

pytestmark = pytest.mark.lowest


def _uses_a_library(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in LIBRARIES for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in LIBRARIES:
            return True
    return False


def _internal_uses(path: Path) -> list[str]:
    """In one module: imports or names of the libraries' internal modules, and, where the module
    uses one of the libraries, private attributes of objects other than self/cls."""
    found = []
    tree = ast.parse(path.read_text())
    check_attributes = _uses_a_library(tree)
    for node in ast.walk(tree):
        where = f"{path.relative_to(SWEEPS.parent)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and check_attributes:
            owner = ast.unparse(node.value)
            if node.attr.startswith("_") and not node.attr.startswith("__") and owner not in ("self", "cls"):
                found.append(f"{where} {owner}.{node.attr}")
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if node.value.split(".")[0] in LIBRARIES else []
        for name in names:
            parts = name.split(".")
            if parts[0] in LIBRARIES and (
                any(p.startswith("_") and not p.startswith("__") for p in parts) or name.startswith(INTERNAL_MODULES)
            ):
                found.append(f"{where} {name}")
    return found


def test_no_module_but_the_adapters_uses_library_internals():
    found = [
        use for path in sorted(SWEEPS.rglob("*.py")) if ADAPTERS not in path.parents for use in _internal_uses(path)
    ]
    assert found == []


def test_the_guard_sees_internals():
    uses = [u for path in sorted(ADAPTERS.glob("*.py")) for u in _internal_uses(path)]
    assert any("study._storage" in u for u in uses)
    assert any("client._tracking_client" in u for u in uses)
    assert any("mlflow.store.tracking.dbmodels.models" in u for u in uses)
    assert any("ray._private" in u for u in uses)


# --------------------------------------------------------------------------- Optuna
@pytest.fixture
def grid_study(tmp_path):
    space = {"a": [1, 2, 3], "b": [0.1, 0.2]}
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(
        study_name="g", storage=storage, sampler=optuna_adapter.AskTellGridSampler(space, seed=0)
    )
    return study, space


def test_study_and_trial_ids_address_the_trial_a_number_names(grid_study):
    study, _ = grid_study
    trials = [study.ask() for _ in range(3)]
    storage, study_id = optuna_adapter.study_storage(study)
    assert study_id == storage.get_study_id_from_name("g")
    for trial in trials:
        _, trial_id = optuna_adapter.trial_storage(study, trial.number)
        storage.set_trial_user_attr(trial_id, "status", f"s{trial.number}")
    assert [t.user_attrs["status"] for t in study.get_trials()] == ["s0", "s1", "s2"]


def test_a_created_running_trial_is_an_enqueued_asked_trial(grid_study):
    study, _ = grid_study
    point = {"a": 2, "b": 0.2}
    distributions = {k: optuna.distributions.CategoricalDistribution(v) for k, v in grid_study[1].items()}
    trial = optuna_adapter.create_running_trial(study, point, distributions)
    frozen = study.get_trials()[-1]
    assert frozen.state == TrialState.RUNNING and frozen.params == point
    assert frozen.system_attrs["fixed_params"] == point
    assert trial.suggest_categorical("a", [1, 2, 3]) == 2  # the Trial object answers with its point
    study.tell(trial.number, 1.0)
    assert study.best_trial.params == point


def test_the_point_of_a_grid_trial_cut_off_mid_ask_is_recovered_whole(grid_study):
    study, space = grid_study
    trial = study.ask()
    trial.suggest_categorical("a", space["a"])  # the driver died before suggesting b
    frozen = study.get_trials()[-1]
    point = optuna_adapter.assigned_point(study, frozen)
    assert set(point) == {"a", "b"} and point["b"] in space["b"]
    assert frozen.system_attrs["grid_id"] is not None and "search_space" in frozen.system_attrs


def test_the_ask_tell_grid_sampler_does_not_stop_the_study_after_the_last_point(grid_study):
    study, space = grid_study
    for _ in range(6):  # the whole grid
        trial = study.ask()
        study.tell(trial, trial.suggest_categorical("a", space["a"]) + trial.suggest_categorical("b", space["b"]))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6


# --------------------------------------------------------------------------- MLflow
def test_the_sql_engine_is_found_for_a_database_store_only(tmp_path):
    assert mlflow_adapter.sql_engine(MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")) is not None
    assert mlflow_adapter.sql_engine(MlflowClient("http://127.0.0.1:9")) is None


def test_the_trial_tables_hold_what_search_runs_returns(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "a"))
    parent = client.create_run(experiment).info.run_id
    made = {}
    for number in range(3):
        run = client.create_run(experiment, tags={"role": "trial", "parent": parent, "trial": str(number)}).info.run_id
        client.log_param(run, "lr", str(0.1 * (number + 1)))
        client.log_metric(run, "acc", 0.5, step=0)
        client.log_metric(run, "acc", float("nan") if number == 2 else 0.6 + number, step=1)
        made[run] = number
    other = client.create_run(experiment, tags={"role": "trial", "parent": "someone-else", "trial": "9"}).info.run_id
    client.delete_run(client.create_run(experiment, tags={"role": "trial", "parent": parent}).info.run_id)

    runs, tags, params, metrics = mlflow_adapter.read_trial_tables(
        mlflow_adapter.sql_engine(client), experiment, parent, role_tag="role", parent_tag="parent", tags=("trial",)
    )
    assert set(runs["run_uuid"]) == set(made) and other not in set(runs["run_uuid"])
    assert {(r.run_uuid, r.value) for r in tags.itertuples()} == {(run, str(n)) for run, n in made.items()}
    assert {(r.run_uuid, r.key, r.value) for r in params.itertuples()} == {
        (run, "lr", str(0.1 * (n + 1))) for run, n in made.items()
    }
    latest = {r.run_uuid: (r.value, bool(r.is_nan)) for r in metrics.itertuples()}
    for run, number in made.items():
        data = client.get_run(run).data.metrics["acc"]
        if number == 2:
            assert latest[run][1] and data != data  # NaN both ways
        else:
            assert latest[run] == (pytest.approx(data), False) and data == 0.6 + number


# --------------------------------------------------------------------------- Ray
def test_a_queue_put_does_not_wait_and_arrives():
    import ray
    from ray.util.queue import Queue

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    try:
        queue = Queue(maxsize=1)
        ref = ray_adapter.put_nowait_async(queue, ("trial", [1, 2]))
        assert isinstance(ref, ray.ObjectRef)
        ray.get(ref)
        with pytest.raises(Exception, match="Full"):  # a full queue raises where the put is waited for
            ray.get(ray_adapter.put_nowait_async(queue, "more"))
        assert queue.get_nowait_batch(1) == [("trial", [1, 2])]
        queue.shutdown()
    finally:
        if started:
            ray.shutdown()


def test_the_token_notice_logger_is_a_ray_module():
    """The notice and its module came with token authentication (Ray 2.59); older Rays have neither."""
    import importlib.util

    import ray
    from packaging.version import Version

    try:
        found = importlib.util.find_spec(ray_adapter.TOKEN_NOTICE_LOGGER) is not None
    except ModuleNotFoundError:  # its package is missing too
        found = False
    assert found or Version(ray.__version__) < Version("2.59")


def test_a_grid_trial_finished_in_one_write_equals_one_told(grid_study):
    study, space = grid_study
    told, written = study.ask(), study.ask()
    for trial in (told, written):
        trial.suggest_categorical("a", space["a"])
        trial.suggest_categorical("b", space["b"])
    study.tell(told, 2.0)
    _, trial_id = optuna_adapter.trial_storage(study, written.number)
    assert optuna_adapter.finish_grid_trial(study, trial_id, TrialState.COMPLETE, [1.0])
    a, b = study.get_trials()
    assert (a.state, b.state) == (TrialState.COMPLETE, TrialState.COMPLETE)
    assert b.values == [1.0] and b.datetime_complete is not None
    assert study.best_trial.number == written.number
    with pytest.raises(optuna_adapter.UpdateFinishedTrialError):
        optuna_adapter.finish_grid_trial(study, trial_id, TrialState.FAIL, None)
    other = optuna.create_study(storage=study._storage)  # another sampler: left to Study.tell
    assert not optuna_adapter.finish_grid_trial(other, trial_id, TrialState.COMPLETE, [1.0])
