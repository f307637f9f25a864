"""Run a test file's worker as two ``jax.distributed`` processes on localhost (4 CPU devices
each) through ``python -m sfjax.parallel`` — shared by the multi-host tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(
    worker_file: str, args: list[str], mesh: tuple[str, ...], timeout_s: float = 180,
    devices: int = 4,
) -> tuple[list[int | None], list[str]]:
    """Both processes' exit codes and output (``devices`` CPU devices each). After
    ``timeout_s`` both are killed: the one waited for then has code None, the other a negative
    code."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")  # fmt: skip
    # the repo (sfjax) and tests/ (this module, imported by the worker file) on the path
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sfjax.parallel", "--coordinator-address",
             f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *mesh,
             "--", worker_file, *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    deadline = time.monotonic() + timeout_s
    logs, codes = [], []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            codes.append(p.returncode)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            codes.append(None)
        logs.append(out)
    return codes, logs


def format_logs(logs: list[str]) -> str:
    """The processes' output, the end of each, for an assertion message."""
    return "\n\n".join(f"--- process {i} ---\n{log[-4000:]}" for i, log in enumerate(logs))


def launch_two(
    worker_file: str, args: list[str], mesh: tuple[str, ...], timeout_s: float = 180
) -> list[str]:
    """Both processes' output; fails the test (with their logs) unless both exit 0."""
    codes, logs = run_two(worker_file, args, mesh, timeout_s)
    assert codes == [0, 0], format_logs(logs)
    return logs
