"""Run every GPU benchmark in one device call: a time budget, one output bundle, progress.

A lent H200 gives a session 30 minutes of device time and 10 minutes per command, the machine's
start included; this runner spends it in priority order and never loses what already ran:

* a preflight (seconds) records versions and devices and imports the project; if that fails
  the runner stops at once (every job would fail the same way);
* each job is one ``benchmarks/gpu_*.py`` run in its own process (a crash or an out-of-memory
  error ends that job only and frees the GPU for the next), with its own time cap, cut to what
  the budget has left; a job that would not get ``--min-job-s`` seconds is skipped, not started;
* progress goes to stdout line by line (``[  73.1s] decode ...``) with every child's output
  prefixed, and everything is also written to ``--log``;
* every job writes its JSON under ``--out-dir`` — the scripts write partial records as they go
  (after each batch size / format), so a job stopped at its cap still leaves its finished
  rows — and ``--bundle`` gathers all records and each job's status (ok / failed / timeout /
  skipped, wall time, return code, the tail of its output) into ONE JSON file;
* XLA's persistent compilation cache is shared by the jobs (``SFJAX_JAX_CACHE``), so programs
  that two jobs share compile once.

Jobs, in the default order (a < 1 min attention-kernel probe, the issue's four measurements
with ``--attention auto`` = cuDNN on GPU where it applies, then the plain-attention baselines
for the ratio)::

    attention         gpu_attention.py         kernels alone; which shapes cuDNN accepts
    decode            gpu_decode.py            batches 1, 8, 64, 256
    latency           gpu_decision_latency.py  both field orders
    kto               gpu_kto_step.py          batch 8 x 1024 (retries with --remat on OOM)
    rfr               gpu_rfr_rollouts.py      64 prompts x K = 8, RfR's memory-bounded calls
    decode_plain      gpu_decode.py --attention plain --no-torch
    latency_plain     gpu_decision_latency.py --attention plain --no-torch
    kto_plain         gpu_kto_step.py --attention plain --no-torch
    rfr_plain         gpu_rfr_rollouts.py --attention plain --no-torch

Usage (on the device machine; ``$OUT`` returns at most 8 files, so per-job files stay in
``--out-dir`` and only the bundle and the log go to ``$OUT``)::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_all.py --budget-s 500 \\
        --bundle $OUT/gpu_all.json --log $OUT/gpu_all.log
    python3 benchmarks/gpu_all.py --only decode_plain,latency_plain --budget-s 500 ...
    python3 benchmarks/gpu_all.py --tiny --budget-s 120      # CPU smoke run of the runner
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@dataclass(frozen=True)
class Job:
    """One benchmark process."""

    name: str
    """Short name (``--only`` / ``--skip`` and the bundle's keys)."""
    script: str
    """``benchmarks/<script>``."""
    args: tuple[str, ...]
    """Extra command-line arguments."""
    cap_s: float
    """Most seconds this job may take at full size (cut to the remaining budget)."""


JOBS = (
    Job("attention", "gpu_attention.py", (), 90),
    Job("decode", "gpu_decode.py", ("--attention", "auto"), 240),
    Job("latency", "gpu_decision_latency.py", ("--attention", "auto"), 180),
    Job("kto", "gpu_kto_step.py", ("--attention", "auto"), 180),
    Job("rfr", "gpu_rfr_rollouts.py", ("--attention", "auto"), 200),
    Job("decode_plain", "gpu_decode.py", ("--attention", "plain", "--no-torch"), 200),
    Job("latency_plain", "gpu_decision_latency.py", ("--attention", "plain", "--no-torch"), 150),
    Job("kto_plain", "gpu_kto_step.py", ("--attention", "plain", "--no-torch"), 150),
    Job("rfr_plain", "gpu_rfr_rollouts.py", ("--attention", "plain", "--no-torch"), 150),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=500.0,
                   help="wall-clock budget for the jobs, after the preflight (a few seconds); "
                        "one device command may run 600 s")
    p.add_argument("--min-job-s", type=float, default=45.0,
                   help="do not start a job with less than this left")
    p.add_argument("--only", default=None, help="comma-separated job names to run, in order")
    p.add_argument("--skip", default="", help="comma-separated job names to leave out")
    p.add_argument("--out-dir", default=None, help="per-job JSON files (default: a temp dir)")
    p.add_argument("--bundle", default=None, help="one JSON with every record and job status")
    p.add_argument("--log", default=None, help="also write all output here")
    p.add_argument("--tiny", action="store_true", help="pass --tiny to every job (CPU smoke)")
    p.add_argument("--extra", default="", help="extra arguments for every job, e.g. '--iters 2'")
    p.add_argument("--python", default=sys.executable, help="interpreter for the jobs")
    p.add_argument("--list", action="store_true", help="print the jobs and exit")
    return p.parse_args(argv)


def select(args) -> list[Job]:
    by_name = {j.name: j for j in JOBS}
    names = [n for n in (args.only.split(",") if args.only else by_name) if n]
    unknown = [n for n in names + [s for s in args.skip.split(",") if s] if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown job(s) {unknown}; choose from {list(by_name)}")
    skip = set(args.skip.split(","))
    return [by_name[n] for n in names if n not in skip]


class Tee:
    """stdout + an optional log file, line-buffered, with the elapsed time."""

    def __init__(self, path: str | None, t0: float):
        self.file = open(path, "a") if path else None  # noqa: SIM115
        self.t0 = t0
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        stamped = f"[{time.monotonic() - self.t0:7.1f}s] {text}"
        with self.lock:
            print(stamped, flush=True)
            if self.file:
                self.file.write(stamped + "\n")
                self.file.flush()


PREFLIGHT = """
import importlib, json, sys
info = {"python": sys.version.split()[0]}
for name in ("jax", "jaxlib", "flax", "optax", "transformers", "tokenizers", "torch", "peft"):
    try:
        info[name] = importlib.import_module(name).__version__
    except Exception as e:  # noqa: BLE001
        info[name] = f"MISSING: {e!r}"
import jax
info["backend"], info["devices"] = jax.default_backend(), [str(d) for d in jax.devices()]
import sfjax.models.qwen3, sfjax.sampling, sfjax.train, sfjax.agents.rfr  # noqa: F401
from sfjax.models import attention
info["attention_default"] = attention.get_implementation()
print(json.dumps(info))
"""


def preflight(args, tee: Tee) -> dict:
    """Versions, devices and the project's imports, in a child process (seconds): when this
    fails every job would, so the runner stops instead of spending the budget on failures."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run([args.python, "-c", PREFLIGHT], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=180)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "preflight timed out (180 s)"}
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        tee.line(f"preflight FAILED:\n{tail}")
        return {"ok": False, "error": tail}
    info = json.loads(done.stdout.strip().splitlines()[-1])
    tee.line(f"preflight: {info}")
    return {"ok": True, **info}


def run_job(job: Job, out_json: str, timeout_s: float, args, tee: Tee) -> dict:
    cmd = [args.python, "-u", os.path.join(HERE, job.script), *job.args, "--out", out_json]
    if args.tiny:
        cmd.append("--tiny")
    cmd += args.extra.split()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    tee.line(f"{job.name}: start (cap {timeout_s:.0f} s): {' '.join(cmd[1:])}")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tail: list[str] = []

    def pump():
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            del tail[:-60]
            tee.line(f"  {job.name} | {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = "ok"
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        status = "timeout"
        os.killpg(proc.pid, signal.SIGTERM)  # the job's own process group only
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    reader.join(timeout=10)
    if status == "ok" and rc != 0:
        status = "failed"
    text = "\n".join(tail)
    oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemory"))
    wall = time.monotonic() - t0
    tee.line(f"{job.name}: {status} (rc {rc}) in {wall:.1f} s" + (" — out of memory" if oom
                                                                   else ""))
    record = None
    if os.path.exists(out_json):
        with open(out_json) as f:
            record = json.load(f)
    return {"status": status, "returncode": rc, "wall_s": wall, "oom_in_output": oom,
            "command": cmd[1:], "output_tail": tail[-25:], "record": record}


def main(argv=None) -> dict:
    args = parse_args(argv)
    jobs = select(args)
    if args.list:
        for j in jobs:
            print(f"{j.name:15s} {j.script} {' '.join(j.args)} (cap {j.cap_s:.0f} s)")
        return {}
    t0 = time.monotonic()
    tee = Tee(args.log, t0)
    out_dir = args.out_dir or os.path.join("/tmp", f"sfjax_gpu_{os.getpid()}")
    os.makedirs(out_dir, exist_ok=True)
    os.environ.setdefault("SFJAX_JAX_CACHE", os.path.join("/tmp", "sfjax_jax_cache"))
    bundle = {"budget_s": args.budget_s, "tiny": args.tiny, "out_dir": out_dir,
              "order": [j.name for j in jobs], "jobs": {}}

    def save():
        if args.bundle:
            os.makedirs(os.path.dirname(os.path.abspath(args.bundle)), exist_ok=True)
            with open(args.bundle, "w") as f:
                json.dump(bundle, f, indent=1, default=str)

    tee.line(f"{len(jobs)} job(s), budget {args.budget_s:.0f} s, JSON under {out_dir}")
    bundle["preflight"] = preflight(args, tee)
    save()
    if not bundle["preflight"]["ok"]:
        bundle["summary"] = {"preflight_failed": len(jobs)}
        save()
        return bundle
    t0 = time.monotonic()  # the budget is the jobs'
    for job in jobs:
        left = args.budget_s - (time.monotonic() - t0)
        if left < args.min_job_s:
            tee.line(f"{job.name}: skipped ({left:.0f} s left < --min-job-s {args.min_job_s:.0f})")
            bundle["jobs"][job.name] = {"status": "skipped", "left_s": left}
            save()
            continue
        cap = min(job.cap_s if not args.tiny else 300.0, left)
        bundle["jobs"][job.name] = run_job(job, os.path.join(out_dir, f"{job.name}.json"), cap,
                                           args, tee)
        save()
    bundle["total_s"] = time.monotonic() - t0
    counts: dict[str, int] = {}
    for r in bundle["jobs"].values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    bundle["summary"] = counts
    save()
    tee.line(f"done in {bundle['total_s']:.1f} s: {counts}")
    return bundle


if __name__ == "__main__":
    main()
