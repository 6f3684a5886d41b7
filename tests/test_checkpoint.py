"""sweeps.trial.checkpoint: a trial interrupted anywhere and continued from its checkpoint ends bit for bit
(float32, CPU) as the same trial never interrupted: parameters, history (epochs and tracking),
final metrics and landscape measures. The interruption is an exception raised from the training
log (what the worker sees of a kill: the process stops between two records)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sweeps.spec.config import load_config
from sweeps.trial import checkpoint
from sweeps.trial.run import measure_trained, run_population

TEACHER = {"name": "teacher", "train_size": 96, "options": {"input_dim": 6, "num_classes": 3, "test_size": 200}}
MEASURES = ["hessian_top_eig", "dist_from_init"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SWEEPS_CACHE", str(tmp_path_factory.getbasetemp() / "sweeps-cache"))


class Crash(Exception):
    """The worker stops here."""


def config(train, *, model=None, dataset=None, seed=0):
    base = {"batch_size": 32, "max_epochs": 6, "stop": {}, "checkpoint": {"every_epochs": 1, "every_seconds": 0}}
    return load_config(
        {
            "name": "ckpt",
            "seed": seed,
            "dataset": dataset or TEACHER,
            "model": model or {"name": "mlp", "width": 16},
            "train": {**base, **train},
            "measure": MEASURES,
        }
    )


def train(configs, checkpoint_dir=None, crash=None):
    """Train and measure ``configs`` as one population; ``crash(i, record)`` True stops it there.
    Returns ``{i: (state_dict, history, metrics, resumes)}`` of the members that finished, and
    every record each member logged."""
    done, logged = {}, {i: [] for i in range(len(configs))}

    def log(i, record):
        if crash is not None and crash(i, record):
            raise Crash
        logged[i].append((record.kind, record.step, record.values))

    def trained(i, member):
        result = measure_trained(member, device="cpu")
        done[i] = (member.state, member.trained.history, result.metrics, member.trained.resumes)

    try:
        run_population(
            configs,
            on_result=lambda i, r: None,
            on_trained=trained,
            log=log,
            device="cpu",
            checkpoint_dir=checkpoint_dir,
        )
    except Crash:
        pass
    return done, logged


def timeless(records):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


def assert_same(resumed, reference):
    state, history, metrics, resumes = resumed
    ref_state, ref_history, ref_metrics, _ = reference
    assert resumes >= 1
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state), "parameters differ"
    assert timeless(history) == timeless(ref_history), "training curves differ"
    numbers = {k: v for k, v in metrics.items() if not k.endswith("seconds") and k != "resumes"}
    assert numbers == {k: v for k, v in ref_metrics.items() if not k.endswith("seconds")}
    assert metrics["resumes"] == resumes


CASES = {
    "sgd_momentum_tracked": dict(
        train={
            "optimizer": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "nesterov": True,
            "track": {"every_steps": 5, "metrics": ["hessian_top_eig"], "subset": 64},
        }
    ),
    "adam_schedule_dropout_label_noise": dict(
        train={"optimizer": "adam", "lr": 0.01, "schedule": "warmup_cosine", "warmup_epochs": 2, "weight_decay": 1e-3},
        model={"name": "mlp", "width": 16, "dropout": 0.2},
        dataset={**TEACHER, "label_noise": 0.2},
    ),
    "full_batch_adamw_step": dict(
        train={
            "optimizer": "adamw",
            "lr": 0.02,
            "batch_size": "full",
            "max_epochs": 8,
            "schedule": "step",
            "weight_decay": 0.01,
        }
    ),
    "batch_norm": dict(
        train={"optimizer": "sgd", "lr": 0.05, "momentum": 0.5}, model={"name": "mlp", "width": 16, "batch_norm": True}
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_trial_interrupted_after_any_epoch_ends_as_the_uninterrupted_one(case, tmp_path):
    cfg = config(**CASES[case])
    reference, _ = train([cfg])
    epochs = cfg.train.max_epochs
    for stop_after in (1, epochs // 2, epochs - 1):  # the checkpoint of epoch `stop_after` is the latest
        folder = tmp_path / f"e{stop_after}"
        crashed, _ = train(
            [cfg], folder, crash=lambda i, r, e=stop_after + 1: r.kind == "epoch" and r.values["epoch"] == e
        )
        assert not crashed
        saved = checkpoint.load(checkpoint.checkpoint_path(folder, cfg))
        assert (saved["epoch"], saved["batch"]) == (stop_after, None)
        resumed, logged = train([cfg], folder)
        assert_same(resumed[0], reference[0])
        # the resumed run logs its whole curve again: epochs 0..N, each once
        assert [v["epoch"] for kind, _, v in logged[0] if kind == "epoch"] == list(range(epochs + 1))


def test_an_interruption_inside_an_epoch_with_tracking_continues_from_the_step_checkpoint(tmp_path):
    """every_seconds ~ 0: a checkpoint after every step; the crash comes at a tracking record in
    the middle of an epoch (3 steps per epoch, tracking every 2 steps)."""
    cfg = config(
        {
            "optimizer": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "checkpoint": {"every_epochs": 0, "every_seconds": 1e-9},
            "track": {"every_steps": 2, "metrics": ["hessian_top_eig"], "subset": 64},
        }
    )
    reference, _ = train([cfg])
    # the crash at the tracking of step s leaves the checkpoint after step s - 1: step 3 ends
    # epoch 1 (then saved after its evaluation); steps 7 and 13 are inside epochs 3 and 5
    for crash_step, (epoch, batch) in ((4, (1, None)), (8, (3, 1)), (14, (5, 1))):
        folder = tmp_path / f"s{crash_step}"
        train([cfg], folder, crash=lambda i, r, s=crash_step: r.kind == "track" and r.step == s)
        saved = checkpoint.load(checkpoint.checkpoint_path(folder, cfg))
        assert (saved["step"], saved["epoch"], saved["batch"]) == (crash_step - 1, epoch, batch)
        resumed, _ = train([cfg], folder)
        assert_same(resumed[0], reference[0])


def test_population_members_continue_each_from_its_own_checkpoint(tmp_path, compiled):
    """Three members with their own lr, momentum and seed; interrupted after epoch 2; then a member
    that finished (recorded) is left out, as the driver re-launches only the unrecorded ones."""
    cfgs = [
        config({"optimizer": "sgd", "lr": lr, "momentum": m, "max_epochs": e}, seed=s)
        for lr, m, e, s in ((0.05, 0.9, 6, 0), (0.1, 0.0, 3, 1), (0.2, 0.5, 6, 2))
    ]
    reference, _ = train(cfgs)
    crashed, _ = train(cfgs, tmp_path, crash=lambda i, r: r.kind == "epoch" and r.values["epoch"] == 3 and i == 0)
    assert not crashed  # member 1 left at epoch 3, just after member 0's record: its measures never ran
    assert len({checkpoint.trial_key(c) for c in cfgs}) == 3
    again, _ = train(cfgs, tmp_path)
    for i in range(3):
        assert_same(again[i], reference[i])
    # only the unrecorded members 0 and 2, now from their own (later) checkpoints
    crashed, _ = train(cfgs, tmp_path / "b", crash=lambda i, r: r.kind == "epoch" and r.values["epoch"] == 5)
    rest, _ = train([cfgs[0], cfgs[2]], tmp_path / "b")
    assert_same(rest[0], reference[0]) and assert_same(rest[1], reference[2])


def test_members_at_different_positions_train_as_successive_populations(tmp_path, compiled):
    """Re-grouped after `sweeps resume`: one member checkpointed at epoch 4, one at epoch 2, one
    never; each ends as alone."""
    cfgs = [config({"optimizer": "adam", "lr": 0.01}, seed=s) for s in range(3)]
    reference, _ = train(cfgs)
    for i, stop in ((0, 4), (1, 2)):
        train([cfgs[i]], tmp_path, crash=lambda j, r, stop=stop: r.kind == "epoch" and r.values["epoch"] == stop + 1)
    again, _ = train(cfgs, tmp_path)
    assert [again[i][3] for i in range(3)] == [1, 1, 0]
    for i in (0, 1):
        assert_same(again[i], reference[i])
    assert all(torch.equal(again[2][0][k], reference[2][0][k]) for k in reference[2][0])


def test_checkpoints_are_replaced_atomically_and_a_damaged_one_is_ignored(tmp_path):
    cfg = config({"optimizer": "sgd", "lr": 0.1})
    path = checkpoint.checkpoint_path(tmp_path, cfg)
    checkpoint.save(path, {"key": path.stem, "x": 1})
    assert checkpoint.load(path, key=path.stem)["x"] == 1
    assert checkpoint.load(path, key="another trial") is None
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left

    class Boom(Exception):
        pass

    real = os.replace
    try:  # a crash between the write and the rename leaves the previous checkpoint whole
        os.replace = lambda *a: (_ for _ in ()).throw(Boom())
        with pytest.raises(Boom):
            checkpoint.save(path, {"key": path.stem, "x": 2})
    finally:
        os.replace = real
    assert checkpoint.load(path, key=path.stem)["x"] == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    path.write_bytes(path.read_bytes()[:20])  # a torn file (not written by save) is not trusted
    assert checkpoint.load(path) is None
    reference, _ = train([cfg])
    fresh, _ = train([cfg], tmp_path)  # starts over, and is the same trial
    assert fresh[0][3] == 0 and all(torch.equal(fresh[0][0][k], reference[0][0][k]) for k in reference[0][0])


def test_the_key_ignores_resources_search_and_cadence_but_not_the_point():
    cfg = config({"optimizer": "sgd", "lr": 0.1})
    same = cfg.with_point({"resources.cpus_per_trial": 2, "train.checkpoint.every_seconds": 5})
    assert checkpoint.trial_key(same) == checkpoint.trial_key(cfg)
    assert checkpoint.trial_key(cfg.with_point({"train.lr": 0.2})) != checkpoint.trial_key(cfg)
    assert checkpoint.trial_key(cfg.with_point({"seed": 1})) != checkpoint.trial_key(cfg)


def test_no_checkpoint_when_both_intervals_are_zero(tmp_path):
    cfg = config({"optimizer": "sgd", "lr": 0.1, "checkpoint": {"every_epochs": 0, "every_seconds": 0}})
    train([cfg], tmp_path)
    assert not any(Path(tmp_path).rglob("*.pt"))


def test_the_drivers_cleaner_removes_a_recorded_trials_checkpoint_found_by_its_point(tmp_path):
    sweep = config({"optimizer": "sgd", "lr": 0.1})
    trial = sweep.with_point({"train.lr": 0.2, "seed": 3})
    other = sweep.with_point({"train.lr": 0.2, "seed": 4})
    for cfg in (trial, other):
        path = checkpoint.checkpoint_path(tmp_path, cfg)
        checkpoint.save(path, {"key": path.stem})
    cleaner = checkpoint.Cleaner(tmp_path, sweep)
    cleaner.add(7, "converged", {"train.lr": 0.2, "seed": 3}, {})
    assert not checkpoint.checkpoint_path(tmp_path, trial).exists()
    assert checkpoint.checkpoint_path(tmp_path, other).exists()
    checkpoint.discard_sweep(tmp_path, sweep.name)
    assert not checkpoint.sweep_folder(tmp_path, sweep.name).exists()
