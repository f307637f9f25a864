"""sfjax.runlock: one process per RUN_DIR. Another process's lock refuses the run with its pid,
host and command before anything is written; the lock goes with its process, ``kill -9``
included; a process may take its own lock again and hold several."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sfjax import runlock

HOLDER = textwrap.dedent("""
    import sys, time
    from sfjax import runlock
    runlock.hold(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def other_process(tmp_path):
    """A process that holds ``tmp_path / 'run'`` until killed: (run dir, the process)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE,
                         text=True, env=env)  # fmt: skip
    assert p.stdout.readline().strip() == "held"
    yield run_dir, p
    p.kill()
    p.wait()


def test_another_process_holds_it_until_it_is_killed(other_process):
    run_dir, p = other_process
    with pytest.raises(runlock.RunDirInUse) as e:
        runlock.hold(run_dir)
    assert f"pid {p.pid} on " in str(e.value) and "another --run-dir" in str(e.value)
    assert runlock.held() == []
    os.kill(p.pid, signal.SIGKILL)  # a crash: the kernel releases the lock
    p.wait()
    runlock.hold(run_dir)
    assert runlock.held() == [str(run_dir.resolve())]


def test_reentrant_several_and_released(tmp_path):
    a, b = tmp_path / "a", tmp_path / "a" / "sf"
    b.mkdir(parents=True)
    runlock.hold(a)
    runlock.hold(b)
    runlock.hold(a)  # again: no error
    assert runlock.held() == [str(a.resolve()), str(b.resolve())]
    runlock.release([str(b.resolve())])
    assert runlock.held() == [str(a.resolve())]
    runlock.release()
    assert runlock.held() == []


@pytest.mark.parametrize("script", ["sf_ranslicing", "rl_baselines", "reflexion_ranslicing"])
def test_experiment_in_a_run_dir_in_use_is_refused_before_writing(other_process, capsys,
                                                                  script):  # fmt: skip
    from experiment_scripts import experiment

    run_dir, p = other_process
    mod = experiment(script)
    import cli_common

    with pytest.raises(SystemExit) as e:
        entry = mod.run if script == "sf_ranslicing" else mod.main  # sf's main parses argv
        cli_common.run_cli(entry, cli_common.run_cli(
            cli_common.parse, mod.PRESETS, ["smoke", "--run-dir", str(run_dir)], mod.__doc__))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {run_dir} is in use by another "
                                                f"process (pid {p.pid} on "), err
    assert sorted(x.name for x in run_dir.iterdir()) == [runlock.LOCK_NAME]  # nothing written


def test_command_line_masks_options_named_for_secrets():
    argv = ["sf_ranslicing.py", "paper", "--reflector.api.api-key-env", "sk-123", "--run-dir",
            "r", "--reflector.api.auth-token=abc", "--kto.beta", "0.1"]
    assert runlock.command_line(argv) == (
        "sf_ranslicing.py paper --reflector.api.api-key-env *** --run-dir r "
        "--reflector.api.auth-token=*** --kto.beta 0.1")
