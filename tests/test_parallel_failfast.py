"""One failing process of a ``jax.distributed`` run stops every process within seconds, each
naming it (:mod:`sfjax.parallel.failfast`).

Each test starts this file twice through the launcher (as ``tests/test_parallel_multihost.py``
does); one process fails while the other waits for it in a collective, or in JAX's shutdown
barrier after finishing. Without the fail-fast both waited for the barrier's 300 s timeout and
then aborted with SIGABRT (measured, 305 s), so a test that passes in well under a minute shows
that nobody waited for it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from multihost_launch import format_logs, run_two  # tests/multihost_launch.py

LIMIT_S = 120  # well above a normal start and stop of two processes, well below JAX's 300 s
EVERY = 2  # as the failing process: both fail


def _run(scenario: str, failing: int) -> tuple[list[int | None], list[str], float]:
    start = time.monotonic()
    codes, logs = run_two(__file__, [scenario, str(failing)], ("--data", "8"), LIMIT_S)
    return codes, logs, time.monotonic() - start


@pytest.mark.parametrize("failing", [0, 1])
def test_an_exception_on_one_process_stops_both_at_once(failing):
    """Process ``failing`` raises while the other is in an all-gather waiting for it. The
    coordinator's process (0) failing is the harder case: its exit takes the key-value store
    down, so it must leave after the other has read the error and said it is leaving."""
    codes, logs, took = _run("raise", failing)
    other = 1 - failing
    assert codes == [1, 1], format_logs(logs)
    assert took < 60, f"took {took:.0f} s\n{format_logs(logs)}"
    assert f"RuntimeError: boom from process {failing}" in logs[failing]  # its traceback
    assert (f"error: process {failing} of 2 failed: RuntimeError: boom from process {failing};"
            f" stopping process {other} too") in logs[other]  # fmt: skip
    for log in logs:  # no abort and no C++ stack trace
        assert "Check failure" not in log and "Shutdown barrier" not in log, format_logs(logs)


def test_a_cli_error_on_one_process_is_the_line_every_process_prints():
    """An experiment CLI's error (``run_cli``: one line, status 2) on process 1: process 1 exits
    with its own status, and process 0 prints the same line, naming process 1."""
    codes, logs, took = _run("cli", 1)
    assert codes == [1, 2], format_logs(logs)
    assert took < 60, f"took {took:.0f} s\n{format_logs(logs)}"
    line = "warmup.steps must be >= 0, got -1"
    assert f"error: {line}" in logs[1] and "Traceback" not in logs[1], logs[1]
    assert f"error: process 1 of 2 failed: {line}; stopping process 0 too" in logs[0], logs[0]


def test_the_same_error_on_every_process_stops_each_with_that_error():
    """A mistake every process meets (a bad option). Each exits with its own line and status 2,
    or, when the other got there first, with that process's line and status 1; none aborts
    (process 0, which hosts the coordination service, leaves last)."""
    codes, logs, took = _run("cli", EVERY)
    assert took < 60, f"took {took:.0f} s\n{format_logs(logs)}"
    line = "warmup.steps must be >= 0, got -1"
    for i, (code, log) in enumerate(zip(codes, logs)):
        other = 1 - i
        assert (code == 2 and f"error: {line}" in log) or (
            code == 1 and f"error: process {other} of 2 failed: {line};" in log
        ), format_logs(logs)
    assert 2 in codes, format_logs(logs)


def test_a_process_that_finished_is_stopped_by_a_later_failure():
    """Process 0 finishes its script and waits in JAX's shutdown barrier; process 1 fails
    after it. Process 0 leaves the barrier at once with status 1 (its work was done, the
    run's was not)."""
    codes, logs, took = _run("late", 1)
    assert codes == [1, 1], format_logs(logs)
    assert took < 60, f"took {took:.0f} s\n{format_logs(logs)}"
    assert "process 0 finished its script" in logs[0]
    assert "error: process 1 of 2 failed: RuntimeError: boom from process 1;" in logs[0]


def test_a_normal_end_exits_zero_on_both_many_times():
    """The watcher is joined before the interpreter finalises: five clean runs, no abort."""
    for _ in range(5):
        codes, logs, _ = _run("ok", -1)
        assert codes == [0, 0], format_logs(logs)
        assert all("done" in log and "terminate" not in log for log in logs), format_logs(logs)


# ------------------------------------------------------------------ worker (runs in each process)
def _worker(scenario: str, failing: int) -> None:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from sfjax.parallel import multihost

    me = jax.process_index()
    multihost.sync("started")
    if scenario == "ok":
        multihost_utils.process_allgather(np.asarray(me))
        print(f"process {me} done", flush=True)
        return
    if scenario == "late":
        if me != failing:
            print(f"process {me} finished its script", flush=True)
            return
        time.sleep(3)  # the other is in the shutdown barrier by now
        raise RuntimeError(f"boom from process {me}")
    if failing in (me, EVERY):
        if scenario == "raise":
            raise RuntimeError(f"boom from process {me}")
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
        import cli_common

        from sfjax.configcheck import ConfigError

        def bad():
            raise ConfigError("warmup.steps must be >= 0, got -1")

        cli_common.run_cli(bad)
    multihost_utils.process_allgather(np.asarray(me))  # waits for the failed process
    raise AssertionError("the all-gather returned without the failed process")


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
