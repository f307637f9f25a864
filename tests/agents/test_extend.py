"""A run extended with more SF iterations (sfjax/agents/extend.py) with the light fakes of
test_loop: it restores the shorter run's phases and runs only the new ones, and ends where a
fresh run of that many iterations ends; a checkpoint that is no phase of the plan (fewer SF
iterations, other KTO iterations) is refused; what the experiment checks before extending.
The whole experiment extended: tests/agents/test_sf_experiment.py."""

from __future__ import annotations

import numpy as np
import pytest
from run_dirs import json_artefacts as _files  # tests/run_dirs.py
from test_loop import _loop, _strip

from sfjax.agents.checkpoint import CheckpointMismatch
from sfjax.agents.extend import extension_refusal, last_phase, phase_steps
from sfjax.agents.loop import phase_plan


def test_plan_is_prefix_stable_and_last_phase_is_the_final_collect():
    for kto in (1, 3):
        for n in (1, 2, 3):
            short, long = phase_plan(n, kto), phase_plan(n + 2, kto)
            assert long[: len(short)] == short  # same phases, same indices (same keys)
            assert short[last_phase(n, kto)].name == f"iter{n}/collect"
            assert last_phase(n, kto) == len(short) - 1 == n * (kto + 2)


def test_extended_run_equals_a_fresh_one_and_reruns_nothing(tmp_path):
    fresh = _loop(tmp_path / "fresh", sf_iterations=2)
    want = fresh.run()

    _loop(tmp_path / "ext", sf_iterations=1).run()
    done = _files(tmp_path / "ext")
    ran = []
    longer = _loop(tmp_path / "ext", on_phase_end=ran.append, sf_iterations=2)
    got = longer.run(resume=True)

    # only the new phases ran: iteration 1's reflect and KTO iterations, the final collect
    assert [p.name for p in ran] == [p.name for p in phase_plan(2, 2)[last_phase(1, 2) + 1:]]
    assert _strip(got) == _strip(want)
    np.testing.assert_array_equal(np.asarray(longer.finetuner.w), np.asarray(fresh.finetuner.w))
    assert int(longer.finetuner.opt_count) == int(fresh.finetuner.opt_count) == 4
    files = _files(tmp_path / "ext")
    assert files == _files(tmp_path / "fresh") and len(files) == 3 + 2 + 4
    assert {k: files[k] for k in done} == done  # the shorter run's files, as it wrote them
    assert phase_steps(tmp_path / "ext" / "checkpoints")[-1] == last_phase(2, 2)


def test_an_unfinished_run_is_extended_too(tmp_path):
    class Killed(Exception):
        pass

    def kill(phase):
        if phase.name == "iter0/kto_0":
            raise Killed

    with pytest.raises(Killed):
        _loop(tmp_path / "ext", on_phase_end=kill, sf_iterations=1).run()
    got = _loop(tmp_path / "ext", sf_iterations=3).run(resume=True)
    assert _strip(got) == _strip(_loop(tmp_path / "fresh", sf_iterations=3).run())


@pytest.mark.parametrize("kw, what", [
    ({"sf_iterations": 1}, r"checkpoint 8 .* is of phase iter2/collect, not of this run \(1 SF "
                           r"iteration\(s\) of 2 KTO iteration\(s\): its last phase is 4\)"),
    # more SF iterations, but the KTO iterations per SF iteration changed: the phases shift
    ({"sf_iterations": 3, "kto_iterations": 1},
     r"checkpoint 8 .* is of phase iter2/collect, not of this run \(3 SF iteration\(s\) of 1 "
     r"KTO iteration\(s\): its phase 8 is iter2/kto_0\)"),
])  # fmt: skip
def test_a_checkpoint_that_is_no_phase_of_the_plan_is_refused(tmp_path, kw, what):
    _loop(tmp_path / "run", sf_iterations=2).run()
    files = _files(tmp_path / "run")
    with pytest.raises(CheckpointMismatch, match=what):
        _loop(tmp_path / "run", **kw).run(resume=True)
    assert _files(tmp_path / "run") == files  # nothing rerun, nothing overwritten


def test_extension_needs_the_shorter_runs_checkpoints(tmp_path):
    run = tmp_path / "run"
    _loop(run, sf_iterations=1).run()
    assert extension_refusal(run, 1, 2) is None
    last = run / "checkpoints" / str(last_phase(1, 2))
    last.rename(tmp_path / "moved")  # the final collect's checkpoint, gone
    why = extension_refusal(run, 1, 2)
    assert "reached its final collect (iter_1.json) but the checkpoint of that last phase " \
           "(step 4) is not in" in why and "--loop.sf-iterations 1 to finish it" in why  # fmt: skip
    for p in (run / "checkpoints").iterdir():
        p.rename(tmp_path / f"moved_{p.name}")
    why = extension_refusal(run, 1, 2)
    assert "no phase checkpoint" in why and "starting over would overwrite its files" in why
