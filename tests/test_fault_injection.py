"""Fault injection (issue 21): Algorithm 1 in subprocesses (tests/fault_driver.py) against a fake
OpenAI-compatible server on 127.0.0.1 that injects faults into 30 % of requests -- 429, 500,
503, hangs past the deadline, connection resets, trickled replies, HTML / truncated / empty /
non-object 200 bodies, malformed and partial replies (not cut-off ones: the Reflector fails on a
second cut-off, see tests/fake_openai.py RANDOM_FAULTS) -- while each process is killed
with SIGKILL at a phase boundary, inside an atomic file write or inside an orbax save, and the
next resumes. The final artefacts must equal a fault-free, kill-free run's byte for byte
(trajectories, reflections, datasets), the summary and the fine-tuned arrays exactly, and the
TensorBoard scalars with no point lost or duplicated. The counts are printed for RESULTS.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fake_openai import FakeOpenAI
from run_dirs import json_artefacts  # tests/run_dirs.py

DRIVER = Path(__file__).with_name("fault_driver.py")
# Each process is killed at the next point, counted within that process: phase:K after the
# checkpoint of the K-th phase it runs, write:K inside its K-th file write (trajectories,
# reflector cache entries, reflections, datasets, summary.json), ckpt:K inside its K-th orbax
# save (after the TensorBoard flush, before orbax's finalising rename). Every point is reached
# (the run has 5 phases: collect, reflect, kto_0, kto_1, collect); the last process finishes.
CHAIN = ["write:1", "phase:1", "ckpt:1", "write:3", "phase:1", "ckpt:1", "write:2", "phase:1",
         "write:2", "ckpt:1", "phase:1", "none"]  # fmt: skip


def _run(run_dir: Path, url: str, kill: str) -> int:
    env = {**os.environ, "SFJAX_FAULT_KEY": "sk-fault-test", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, str(DRIVER), str(run_dir), url, kill], env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    if p.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{kill}: exit {p.returncode}\n{p.stderr[-3000:]}")
    return p.returncode


def _scalars(tb: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the event files (TFRecord framing), sorted."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in Path(tb).glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            out += [(v.tag, ev.step, v.simple_value) for v in ev.summary.value]
    return sorted(out)


def _artefacts(run_dir: Path) -> dict:
    out = json_artefacts(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("timings_s")
    summary.pop("reflector_calls")
    for r in summary["iterations"]:
        r.pop("wall_s", None)
        r.pop("reflector_calls", None)
    out["summary"] = summary
    arrays = np.load(run_dir / "final_arrays.npz")
    out["arrays"] = {k: arrays[k].tolist() for k in arrays.files}
    out["tb"] = _scalars(run_dir / "tb")
    return out


@pytest.mark.timeout(600)
def test_kills_and_api_faults_leave_the_fault_free_result(tmp_path, capsys):
    counts = Counter()
    with FakeOpenAI(fault_rate=0.0, seed=11, hang_s=1.0) as server:
        assert _run(tmp_path / "reference", server.url, "none") == 0
        reference = _artefacts(tmp_path / "reference")
        assert len(reference["tb"]) == len(set(reference["tb"])) > 0
        server.counts.clear()
        server.fault_rate = 0.3
        run_dir = tmp_path / "killed"
        for kill in CHAIN:
            rc = _run(run_dir, server.url, kill)
            counts["processes"] += 1
            counts["kills (SIGKILL)"] += rc == -signal.SIGKILL
        assert rc == 0, "the last process was killed too"
        got = _artefacts(run_dir)
        calls = json.loads((run_dir / "summary.json").read_text())["reflector_calls"]
        counts["retries in summary.json"] = calls.get("transport_retries", 0) + calls.get(
            "format_retries", 0
        )
        for key in reference:
            assert got[key] == reference[key], f"{key} differs"
        counts["resumes"] = counts["processes"] - 1
        counts["requests"] = sum(server.counts.values())
        counts["faults injected"] = server.faults_injected
        kinds = {k: v for k, v in sorted(server.counts.items()) if not k.startswith("ok:")}
    assert counts["kills (SIGKILL)"] == len(CHAIN) - 1
    assert counts["faults injected"] > 0
    with capsys.disabled():
        print(f"\nfault injection: {dict(counts)}; fault kinds {kinds}")


def test_api_fault_mix_at_30_percent_leaves_the_fault_free_result(tmp_path, capsys, monkeypatch):
    """The same loop in this process with many more Reflector requests (short windows)."""
    import fault_driver
    from fake_openai import ALL_FAULTS, NON_COMPLETION_200

    monkeypatch.setenv("SFJAX_FAULT_KEY", "sk-fault-test")
    size = {"envs": 4, "steps": 16, "context": 1250}
    with FakeOpenAI(fault_rate=0.0, seed=5, hang_s=0.7) as server:
        fault_driver.main(str(tmp_path / "clean"), server.url, "none", **size)
        server.counts.clear()
        server.fault_rate = 0.3
        fault_driver.main(str(tmp_path / "faulty"), server.url, "none", **size)
        counts = dict(server.counts)
    reference, got = _artefacts(tmp_path / "clean"), _artefacts(tmp_path / "faulty")
    for key in reference:
        assert got[key] == reference[key], f"{key} differs"
    calls = json.loads((tmp_path / "faulty" / "summary.json").read_text())["reflector_calls"]
    faults = {k: v for k, v in sorted(counts.items()) if not k.startswith("ok:")}
    assert sum(faults.values()) >= 0.15 * sum(counts.values()) > 0
    assert set(faults) <= set(ALL_FAULTS) and set(faults) & set(NON_COMPLETION_200)
    retries = calls.get("transport_retries", 0) + calls.get("format_retries", 0)
    assert retries >= sum(faults.values())  # each fault retried once
    with capsys.disabled():
        print(
            f"\nAPI fault mix: {sum(counts.values())} requests, {sum(faults.values())} faults "
            f"{faults}; summary.json reflector_calls {calls}"
        )
