"""LoopConfig.final_actor: the run ends with the last iterate or the best-collecting one, loaded
from its collect phase's checkpoint (kept past keep_checkpoints); choosing never changes
training, a finished run may be rerun with the other rule, and a kept iterate whose checkpoint
is gone or damaged is one clear error. With the light fakes of test_loop."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from test_loop import _loop, _strip

from sfjax.agents import loop as loop_mod
from sfjax.agents.checkpoint import CheckpointMissing
from sfjax.agents.loop import collect_step, phase_plan
from sfjax.agents.loop_config import LoopConfig
from sfjax.agents.loop_records import best_iteration
from sfjax.atomic import DamagedFile
from sfjax.configcheck import ConfigError, check_config


def _its(*utilities):
    return [{"iteration": i, "utility": u} for i, u in enumerate(utilities)]


def test_best_iteration_is_the_highest_utility_earlier_on_ties_never_nan():
    assert best_iteration(_its(-5.0, 3.0, 1.0)) == 1
    assert best_iteration(_its(2.0, 2.0, 1.0)) == 0  # tie: the earlier
    assert best_iteration(_its(-1.0, 4.0, 4.0)) == 1
    assert best_iteration(_its(math.nan, -9.0, -3.0)) == 2
    assert best_iteration(_its(math.nan, math.nan)) == 0
    assert best_iteration(_its(-7.0)) == 0


def _collect_steps(sf_iterations, kto_iterations=2):
    """{checkpoint step: iteration} of the collect phases."""
    plan = phase_plan(sf_iterations, kto_iterations)
    return {collect_step(plan, i): i for i in range(sf_iterations + 1)}


def _run(run_dir, **kw):
    """A finished run; returns (loop, summary, {iteration: w of its Actor})."""
    ws = {}
    holder = {}

    def record(phase):
        if phase.kind == "collect":
            ws[phase.iteration] = np.asarray(holder["loop"].finetuner.w)

    loop = holder["loop"] = _loop(run_dir, on_phase_end=record, **kw)
    return loop, loop.run(), ws


def test_best_keeps_the_best_collecting_iterate_and_trains_as_last(tmp_path):
    last, want, ws = _run(tmp_path / "last", sf_iterations=3, keep_checkpoints=2)
    best, got, _ = _run(tmp_path / "best", sf_iterations=3, keep_checkpoints=2,
                        final_actor="best")  # fmt: skip
    assert want["final_actor"] == {"rule": "last", "iteration": 3}
    k = best_iteration(got["iterations"])
    assert got["final_actor"] == {"rule": "best", "iteration": k}
    assert {**_strip(got), "final_actor": None} == {**_strip(want), "final_actor": None}
    np.testing.assert_array_equal(np.asarray(best.finetuner.w), ws[k])
    np.testing.assert_array_equal(np.asarray(last.finetuner.w), ws[3])
    # every iterate's checkpoint is kept besides the latest keep_checkpoints
    steps = last.ckpt.all_steps()
    assert set(_collect_steps(3)) <= set(steps) and len(steps) == 4 + 1


def test_an_earlier_iterate_is_loaded_and_a_finished_run_may_switch_rules(tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    _, _, ws = _run(run_dir, sf_iterations=2)
    monkeypatch.setattr(loop_mod, "best_iteration", lambda its: 1)
    ran = []
    again = _loop(run_dir, on_phase_end=ran.append, sf_iterations=2, final_actor="best")
    summary = again.run(resume=True)
    assert ran == [] and summary["final_actor"] == {"rule": "best", "iteration": 1}
    np.testing.assert_array_equal(np.asarray(again.finetuner.w), ws[1])
    monkeypatch.setattr(loop_mod, "best_iteration", lambda its: 0)  # the untrained Actor
    prior = _loop(run_dir, sf_iterations=2, final_actor="best")
    prior.run(resume=True)
    np.testing.assert_array_equal(np.asarray(prior.finetuner.w), np.zeros(8))
    back = _loop(run_dir, sf_iterations=2)
    assert back.run(resume=True)["final_actor"] == {"rule": "last", "iteration": 2}
    np.testing.assert_array_equal(np.asarray(back.finetuner.w), ws[2])

    # extended after keeping an earlier iterate: training continues from the last one
    ext = _loop(run_dir, sf_iterations=3)
    fresh = _loop(tmp_path / "fresh", sf_iterations=3)
    assert _strip(ext.run(resume=True)) == _strip(fresh.run())
    np.testing.assert_array_equal(np.asarray(ext.finetuner.w), np.asarray(fresh.finetuner.w))


def test_a_kept_iterate_without_its_checkpoint_is_one_clear_error(tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    _run(run_dir, sf_iterations=2)
    monkeypatch.setattr(loop_mod, "best_iteration", lambda its: 1)
    step = next(s for s, it in _collect_steps(2).items() if it == 1)
    ckpt = run_dir / "checkpoints" / str(step)
    for f in (ckpt / "arrays").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.raises(DamagedFile, match=r"keeps the Actor after 1 SF iteration\(s\).*damaged"
                                          r".*--loop\.final-actor last"):  # fmt: skip
        _loop(run_dir, sf_iterations=2, final_actor="best").run(resume=True)
    shutil.rmtree(ckpt)  # as in a run written before collect checkpoints were kept
    with pytest.raises(CheckpointMissing, match=rf"step {step}, phase iter1/collect\) is not in"
                                                r".*--loop\.final-actor last"):  # fmt: skip
        _loop(run_dir, sf_iterations=2, final_actor="best").run(resume=True)
    assert _loop(run_dir, sf_iterations=2).run(resume=True)["final_actor"]["iteration"] == 2


def test_final_actor_is_last_or_best():
    with pytest.raises(ConfigError, match=r"--loop\.final-actor 'worst'.*'last' or 'best'"):
        check_config(LoopConfig(final_actor="worst"), "loop.")
