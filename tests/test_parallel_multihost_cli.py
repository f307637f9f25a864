"""The self-finetuning CLI as a multi-host user runs it: ``python -m sfjax.parallel
--coordinator-address ... --num-processes 2 --process-id I --data 2 --
experiments/sf_ranslicing.py smoke ...`` on two ``jax.distributed`` processes (one CPU device
each, to keep it short), shortened to a tiny random Actor.

``tests/test_parallel_multihost_loop.py`` checks the loop's results on two processes against
one; this test checks the command itself, which broke unseen: process 0 decided the run dir's
config and sent it to the others as JSON, but it was a dataclass (and the tiny Actor's path a
``Path``), so process 0 raised ``TypeError`` while process 1 waited in the broadcast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from multihost_launch import format_logs, run_two  # tests/multihost_launch.py

SCRIPT = str(Path(__file__).resolve().parents[1] / "experiments" / "sf_ranslicing.py")
MESH = ("--data", "2")  # one CPU device per process: the mesh's own tests are elsewhere
SHORT = ["--model.no-prior", "--model.tiny", "--heldout.seeds", "0", "--heldout.num-steps", "4",
         "--loop.sf-iterations", "1", "--loop.num-envs", "2", "--loop.trajectory-steps", "3",
         "--rfr.kto-iterations", "1", "--rfr.num-rollouts", "2",
         "--kto.micro-batch-size", "4"]  # fmt: skip


@pytest.mark.slow
def test_sf_cli_on_two_processes_runs_and_refuses_a_changed_config(tmp_path):
    run = tmp_path / "run"
    codes, logs = run_two(SCRIPT, ["smoke", "--run-dir", str(run), *SHORT], MESH, 480, devices=1)
    assert codes == [0, 0], format_logs(logs)
    summary = json.loads((run / "summary.json").read_text())
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1]
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert "tensorboard --logdir" in logs[0]  # the closing summary, on process 0
    # process 0 logs the run's progress; process 1 only what warns or fails
    assert " INFO sfjax.agents.loop: phase iter0/kto_0 done" in logs[0]
    assert " INFO " not in logs[1], logs[1]

    # the same run dir with another config: refused on both, at once, with the one line (a
    # process prints it as its own, status 2, or as the other's that stopped it, status 1)
    codes, logs = run_two(SCRIPT, ["smoke", "--run-dir", str(run), *SHORT,
                                   "--loop.seed", "7"], MESH, 120, devices=1)  # fmt: skip
    line = "holds a run with another config: loop.seed (0 in the run, 7 now)"
    assert 2 in codes and set(codes) <= {1, 2}, format_logs(logs)
    assert all(line in log and "Traceback" not in log for log in logs), format_logs(logs)
    assert json.loads((run / "config.json").read_text())["loop"]["seed"] == 0
