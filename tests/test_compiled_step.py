"""sweeps.trial.compiled_step: the compiled population step against the eager stack (float64, every
optimizer and schedule), the fallback to eager when compiling fails, members leaving without a
recompile per K, ``auto``, and ``resources.compile`` in the schema. Tiny models, few steps:
compiling is the cost here (a few seconds per program, less from inductor's on-disk cache)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_population import config, double, eight_members, flat

from sweeps.spec.config import load_config
from sweeps.trial import compiled_step
from sweeps.trial.data import load_dataset
from sweeps.trial.models import build_model
from sweeps.trial.train import train_population


@pytest.fixture(autouse=True)
def _one_thread(single_thread, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SWEEPS_CACHE", str(tmp_path_factory.getbasetemp() / "sweeps-cache"))


def _train(configs, data, compile, **kwargs):
    build = lambda c: build_model(c.model, data.input_shape, data.num_classes, seed=c.seed).double()  # noqa: E731
    models = [build(c) for c in configs]
    results = train_population(
        models, data, [c.train for c in configs], seeds=[c.seed for c in configs], compile=compile, **kwargs
    )
    return models, results


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_compiled_and_eager_agree_to_float64_round_off_after_50_steps(optimizer):
    # 8 members: momentum 0 / 0.9 / 0.5 (Nesterov), weight decay 0 / 1e-3 / 5e-2, all four schedules
    configs = eight_members(optimizer, {"name": "mlp", "width": 12})
    data = double(load_dataset(configs[0].dataset))
    eager, r_eager = _train(configs, data, False)
    compiled, r_compiled = _train(configs, data, True)
    for c, a, b, ra, rb in zip(configs, eager, compiled, r_eager, r_compiled):
        assert (rb.status, rb.steps) == (ra.status, ra.steps) == ("converged", 50)
        rel = float((flat(a) - flat(b)).norm() / flat(a).norm())
        assert rel < 1e-12, (c.train, rel)  # round-off: about 1e-15 per step, grown over 50 steps
        assert rb.final == pytest.approx(ra.final, rel=1e-10, abs=1e-12)


def test_a_model_that_fails_to_compile_trains_eagerly_with_one_log_line(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    configs = eight_members("sgd", {"name": "mlp", "width": 12})[:3]
    data = double(load_dataset(configs[0].dataset))
    eager, r_eager = _train(configs, data, False)
    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="sweeps.trial.compiled_step"):
        fallen, r_fallen = _train(configs, data, True)
    lines = [r for r in caplog.records if r.name == "sweeps.trial.compiled_step"]
    assert len(lines) == 1 and "eagerly" in lines[0].getMessage() and "no C++ compiler" in lines[0].getMessage()
    assert "second line" not in lines[0].getMessage()
    for a, b, ra, rb in zip(eager, fallen, r_eager, r_fallen):
        assert torch.equal(flat(a), flat(b)) and ra.final == rb.final  # the eager program itself


def test_a_step_that_fails_at_run_time_falls_back_from_the_same_state(monkeypatch, caplog):
    configs = eight_members("adam", {"name": "mlp", "width": 12})[:2]
    data = double(load_dataset(configs[0].dataset))
    eager, _ = _train(configs, data, False)
    calls = []
    real = compiled_step.CompiledStack.train_step

    def fails_at_the_tenth(self, x, y, lrs):
        calls.append(1)
        if len(calls) == 10:
            self._fail(RuntimeError("inductor: unsupported op"))
            return None
        return real(self, x, y, lrs)

    monkeypatch.setattr(compiled_step.CompiledStack, "train_step", fails_at_the_tenth)
    with caplog.at_level(logging.WARNING, logger="sweeps.trial.compiled_step"):
        fallen, results = _train(configs, data, True)
    assert len([r for r in caplog.records if r.name == "sweeps.trial.compiled_step"]) == 1
    assert all(r.steps == 50 for r in results)
    for a, b in zip(eager, fallen):
        assert float((flat(a) - flat(b)).norm() / flat(a).norm()) < 1e-12


def test_members_leaving_the_stack_do_not_recompile_for_each_new_k():
    from torch._dynamo.utils import counters

    exits = [{"max_epochs": e} for e in (1, 2, 3, 4, 5)]  # one member leaves after each epoch: K = 5, 4, 3, 2, 1
    configs = [config({"lr": 0.05, "batch_size": 25, "stop": {}, **e}, seed=i) for i, e in enumerate(exits)]
    data = double(load_dataset(configs[0].dataset))
    torch._dynamo.reset()
    counters.clear()
    _, results = _train(configs, data, True)
    assert [r.steps for r in results] == [10, 20, 30, 40, 50]
    # one program for the step and one for the evaluations, whatever K (K = 1 runs as two copies)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_auto_compiles_only_populations_that_train_long_enough():
    n = compiled_step.AUTO_MIN_STEPS
    assert compiled_step.should_compile("auto", n, mode_free=True, full_batch=False)
    assert not compiled_step.should_compile("auto", n - 1, mode_free=True, full_batch=False)
    assert compiled_step.should_compile(True, 1, mode_free=True, full_batch=False)
    assert not compiled_step.should_compile(True, n, mode_free=False, full_batch=False)  # dropout / batch norm
    assert not compiled_step.should_compile(True, n, mode_free=True, full_batch=True)
    assert not compiled_step.should_compile(False, 10 * n, mode_free=True, full_batch=False)


def test_resources_compile_in_the_schema():
    base = {"name": "c", "measure": []}
    assert load_config(base).resources.compile == "auto"
    assert load_config({**base, "resources": {"compile": True}}).resources.compile is True
    assert load_config({**base, "resources": {"compile": False}}).resources.compile is False
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=r"resources\.compile") as err:
            load_config({**base, "resources": {"compile": bad}})
        assert "auto, true or false" in str(err.value)


_TRAIN_AND_HASH = """
import hashlib, sys, torch
sys.path.insert(0, {tests!r})
from test_population import config, flat
from sweeps.trial.data import load_dataset
from sweeps.trial.models import build_model
from sweeps.trial.train import train_population
torch.set_num_threads(1)
configs = [config({{"lr": 0.05 * (1 + i), "momentum": 0.9, "batch_size": 25, "max_epochs": 6, "stop": {{}}}}, seed=i)
           for i in range(4)]
data = load_dataset(configs[0].dataset)  # float32, as a sweep trains
models = [build_model(c.model, data.input_shape, data.num_classes, seed=c.seed) for c in configs]
results = train_population(models, data, [c.train for c in configs], seeds=[c.seed for c in configs], compile=True)
digest = hashlib.sha256()
for model, result in zip(models, results):
    digest.update(flat(model).numpy().tobytes())
    digest.update(repr(sorted(result.final.items())).encode())
print(digest.hexdigest())
"""


def test_a_compiled_population_trained_twice_in_fresh_processes_is_bit_identical(tmp_path):
    """What makes two runs of a sweep with ``compile`` on give the same results: float32 training
    of one population in a fresh process, compiled cold into an empty inductor cache, then again
    in another process that loads the program from that cache (as the later tasks of a sweep
    do): parameters and final metrics are equal to the bit."""
    code = _TRAIN_AND_HASH.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "SWEEPS_CACHE": str(tmp_path / "c")}
    digests = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "eagerly" not in done.stderr, done.stderr[-3000:]  # no fallback to eager
        digests.append(done.stdout.strip().splitlines()[-1])
        assert any((tmp_path / "inductor").rglob("*.py")), "nothing was compiled"  # inductor wrote its kernels
    assert len(digests[0]) == 64 and digests[0] == digests[1]
