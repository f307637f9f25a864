"""Run the GPU benchmarks in one device call of <= 7 minutes, compile included.

A lent GPU (an H100 on a session's first call, or an H200) gives a session 15 minutes of device
time, its 1-2 minute start included, and at most 10 minutes per command (GPU.md); the first run
(on an H200) finished none of its jobs (compile times). This runner spends one call in priority
order and never loses what already ran:

* a preflight (seconds) records versions and devices and imports the project; if that fails
  the runner stops at once (every job would fail the same way);
* each job is one ``benchmarks/gpu_*.py`` run in its own process (a crash or an out-of-memory
  error ends that job only and frees the GPU for the next), with its own time cap, cut to what
  the budget has left; a job that would not get ``--min-job-s`` seconds is skipped, not started;
* the model is ``scan_layers`` (one compiled layer for prefill and training; decode unrolled,
  or scanned too over a stacked KV cache with ``--extra=--scan-decode``)
  with random weights drawn by one small jitted draw per distinct shape
  (:func:`gpu_common.random_model`), and XLA's persistent compilation cache is shared by the
  jobs (``SFJAX_JAX_CACHE``), so programs that two jobs share compile once;
* progress goes to stdout line by line (``[  73.1s] decode | ...``), each figure printed by the
  job the moment it is measured, and everything is also written to ``--log``;
* every job writes its JSON under ``--out-dir`` (default ``$OUT/gpu_jobs`` when ``$OUT`` is
  set) — the scripts rewrite partial records as they go (after each batch size / format), so a
  job stopped at its cap still leaves its finished rows — and ``--bundle`` (default
  ``$OUT/gpu_all.json``) gathers all records and each job's status (ok / failed / timeout /
  skipped, wall time, return code, the tail of its output) into ONE JSON file.

Default jobs, in order (the issue's: decode first, then the Actor, then training)::

    decode       gpu_decode.py            batches 1, 8, 64; torch generate at 1 and 8
    latency      gpu_decision_latency.py  action-first SF prompt, prefix cache (the Actor's path)
    kto          gpu_kto_step.py          batch 8 x 1024 next to torch + PEFT
    decode_scan  gpu_decode.py            decode scanned over a stacked KV cache, batches 1, 8,
                                          64, no torch: only if the jobs above left the time

The caps of the first three fill the default budget; ``decode_scan`` runs on what they leave
(they usually finish well inside their caps) and the runner then prints, per batch size, which
layer mode decoded faster (the bundle's ``decode_layers``).

More on request (``--only``): attention, rfr, decode_full (batch 256, reflection-first, model-
level prefix probe), and the ``*_plain`` attention baselines.

``--dry-run`` (any machine) prints each job's predicted compile and run time: compile = the
ahead-of-time CPU compile seconds of its programs from bench_compile's JSON
(``--compile-json``) times ``--gpu-compile-factor`` (:data:`GPU_COMPILE_FACTOR`, calibrated on
the one program timed on both machines); run = the roofline floor of what it computes at the
HBM bandwidth and matmul rate read on the lent card (``--card``, default h100; a lower bound),
the torch references at their measured figures where known.

Usage (on the device machine)::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_all.py --budget-s 400
    python3 benchmarks/gpu_all.py --dry-run                 # predictions, no device needed
    python3 benchmarks/gpu_all.py --only rfr,attention --budget-s 300
    python3 benchmarks/gpu_all.py --tiny --budget-s 120     # CPU smoke run of the runner
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
if HERE not in sys.path:  # gpu_common for --dry-run
    sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)

from sfjax.device_memory import text_is_out_of_memory  # noqa: E402 -- no JAX: the jobs import it


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
    default: bool = True
    """Part of the default run (else only with ``--only``)."""
    if_time: bool = False
    """Runs only on the budget the other jobs leave: not counted in the default call's caps."""
    programs: tuple[tuple[str, int], ...] = ()
    """(bench_compile program, how many distinct compiles of it) — for ``--dry-run``."""


JOBS = (
    Job("decode", "gpu_decode.py", ("--batches", "1,8,64", "--torch-batches", "1,8"), 170,
        programs=(("decode", 3), ("prefill", 3))),
    Job("latency", "gpu_decision_latency.py", ("--formats", "action_first", "--actor-only"), 90,
        programs=(("decode", 1), ("prefill", 1))),
    Job("kto", "gpu_kto_step.py", (), 140, programs=(("kto_step", 1),)),
    # decode scanned over a stacked cache vs the unrolled "decode" above: which one is faster on
    # XLA:GPU decides Qwen3Config.scan_decode's default there (issue 18)
    Job("decode_scan", "gpu_decode.py", ("--batches", "1,8,64", "--no-torch", "--scan-decode"),
        120, if_time=True, programs=(("decode", 3), ("prefill", 3))),
    Job("attention", "gpu_attention.py", (), 90, default=False),
    Job("rfr", "gpu_rfr_rollouts.py", (), 200, default=False, programs=(("rfr", 2),)),
    Job("decode_full", "gpu_decode.py", ("--batches", "256"), 200, default=False,
        programs=(("decode", 1), ("prefill", 1))),
    Job("latency_full", "gpu_decision_latency.py", (), 180, default=False,
        programs=(("decode", 2), ("prefill", 2))),
    Job("decode_plain", "gpu_decode.py", ("--attention", "plain", "--no-torch"), 200,
        default=False, programs=(("decode", 3), ("prefill", 3))),
    Job("kto_plain", "gpu_kto_step.py", ("--attention", "plain", "--no-torch"), 150,
        default=False, programs=(("kto_step", 1),)),
    # the step at the paper preset's own rows (prompts cut to 2,048, completions 256, remat):
    # 53 GB of one device by XLA:CPU's buffer assignment; the GPU's peak decides what fits
    Job("kto_preset", "gpu_kto_step.py", ("--prompt-len", "2048", "--remat", "--no-torch",
                                          "--steps", "2"), 150,
        default=False, programs=(("kto_step", 1),)),
)
DEFAULT_BUDGET_S = 400.0
"""The jobs' wall-clock budget: with the preflight and the interpreter starts, one call of
<= 7 minutes (GPU.md: 15 device minutes per session, 1-2 of them to start the machine)."""
COMPILE_JSON = os.path.join(HERE, "bench_compile_cpu.json")
"""bench_compile's measured CPU compile times (``--dry-run``'s source)."""
CARDS = {
    "h200": (3.27e12, 640e12, "measured on the lent H200 (GPU.md: JAX, 2 GiB bf16 elementwise "
                              "read + write; 8192^3 bf16 matmul)"),
    "h100": (3.0e12, 798e12, "read on the lent H100 (the device notes: PyTorch device-to-device "
                             "copy, read + write; 8192^3 bf16 matmul)"),
}
"""``--card``: the HBM bytes/s and bf16 matmul FLOP/s ``--dry-run`` predicts run time from, for
each kind of machine the device tool lends (its first call gets the H100)."""
GPU_COMPILE_FACTOR = 0.15
"""H200 compile seconds per second of bench_compile's CPU figure, from the one model program
measured on both: the unrolled sampler program at batch 1 compiled *and ran* in 37 s on the
H200 (GPU.md), 250 s ahead of time on the shared CPU (bench_compile_cpu.json, load 5-10): <=
0.15. (The random init's ratio was 2: XLA:GPU compiles many small RNG ops slowly; that init is
now one small program per shape.) An upper-bound guess until a GPU run measures more pairs."""
TORCH_KTO_STEP_S = 1.34
"""torch + PEFT KTO step, Qwen3-4B, 8 x 1024, measured on the H200 (GPU.md); used for the H100
too (compute-bound, and the two cards' bf16 matmul rates read the same: 798 vs 788 TFLOP/s)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="print each job's predicted compile and run time, run nothing")
    p.add_argument("--compile-json", default=COMPILE_JSON,
                   help="bench_compile.py's JSON record (--dry-run)")
    p.add_argument("--gpu-compile-factor", type=float, default=GPU_COMPILE_FACTOR,
                   help="GPU compile time / this CPU's AOT compile time (--dry-run)")
    p.add_argument("--card", default="h100", choices=sorted(CARDS),
                   help="the lent card --dry-run predicts for (default h100: a first call's)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="wall-clock budget for the jobs, after the preflight (a few seconds); "
                        "default: one device call of <= 7 minutes")
    p.add_argument("--min-job-s", type=float, default=45.0,
                   help="do not start a job with less than this left")
    p.add_argument("--only", default=None, help="comma-separated job names to run, in order")
    p.add_argument("--skip", default="", help="comma-separated job names to leave out")
    p.add_argument("--out-dir", default=None, help="per-job JSON files (default: a temp dir)")
    p.add_argument("--bundle", default=None, help="one JSON with every record and job status")
    p.add_argument("--log", default=None, help="also write all output here")
    p.add_argument("--tiny", action="store_true", help="pass --tiny to every job (CPU smoke)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run the full-size jobs even when JAX finds no accelerator")
    p.add_argument("--extra", default="", help="extra arguments for every job, e.g. '--iters 2'")
    p.add_argument("--python", default=sys.executable, help="interpreter for the jobs")
    p.add_argument("--list", action="store_true", help="print the jobs and exit")
    return p.parse_args(argv)


def select(args) -> list[Job]:
    by_name = {j.name: j for j in JOBS}
    defaults = [j.name for j in JOBS if j.default]
    names = [n for n in (args.only.split(",") if args.only else defaults) if n]
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

    def close(self) -> None:
        if self.file:
            self.file.close()


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
from sfjax import provenance  # the commit the figures come from, and the flags they ran under
info["sfjax"], info["env"] = provenance.source(), provenance.environment_variables()
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
    if info.get("backend") == "cpu" and not (args.tiny or args.allow_cpu):
        msg = ("no accelerator: JAX's backend is cpu, where the full-size Qwen3-4B jobs would "
               "only run out their caps; use --tiny (a CPU smoke run of the runner), --dry-run "
               "(the predictions) or --allow-cpu")
        tee.line(f"preflight: {msg}")
        return {"ok": False, "error": msg, **info}
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
    if not reader.is_alive():
        proc.stdout.close()
    if status == "ok" and rc != 0:
        status = "failed"
    text = "\n".join(tail)
    oom = text_is_out_of_memory(text)  # XLA's and torch's out-of-memory errors
    wall = time.monotonic() - t0
    tee.line(f"{job.name}: {status} (rc {rc}) in {wall:.1f} s" + (" — out of memory" if oom
                                                                   else ""))
    record = None
    if os.path.exists(out_json):
        with open(out_json) as f:
            record = json.load(f)
    return {"status": status, "returncode": rc, "wall_s": wall, "oom_in_output": oom,
            "command": cmd[1:], "output_tail": tail[-25:], "record": record}


def _records(jobs: dict, benchmark: str) -> list[dict]:
    """The records of ``benchmark`` among the jobs' results, in job order."""
    out = []
    for r in jobs.values():
        record = (r or {}).get("record") or {}
        if record.get("benchmark") == benchmark:
            out.append(record)
    return out


def _first(values):
    return next((v for v in values if v is not None), None)


TARGETS = (
    # (key, what, comparison, goal) -- issue 18's targets for the paper-scale path
    ("decode_b1_fraction_of_hbm_floor", "decode at batch 1 / measured HBM roofline", ">=", 0.80),
    ("decode_b1_over_torch", "decode at batch 1 / transformers generate", ">=", 5.0),
    ("time_to_action_s", "Actor time to action (SF prompt, prefix cache)", "<", 0.100),
    ("kto_mfu_spec", "KTO LoRA step MFU (datasheet bf16 peak)", ">=", 0.35),
)
"""The issue's targets, checked by :func:`check_targets` from the jobs' records."""


def check_targets(jobs: dict) -> dict[str, dict]:
    """Each of :data:`TARGETS` with the value the jobs measured (None where no job did) and
    whether it is met. Decode is the faster layer mode's at batch 1 (its ``layers`` noted);
    the torch + PEFT step's MFU rides along with the KTO row."""
    decode_b1 = [(rec.get("layers"), row) for rec in _records(jobs, "gpu_decode")
                 for row in rec.get("rows", []) if int(row.get("batch", 0)) == 1]
    rates = [((row.get("sfjax_sampler") or {}).get("decode_tokens_per_s"), layers, row)
             for layers, row in decode_b1]
    rates = [r for r in rates if isinstance(r[0], (int, float)) and r[0] == r[0]]
    best = max(rates, key=lambda r: r[0], default=None)  # the faster layer mode's decode
    torch_rate = _first((row.get("torch") or {}).get("decode_tokens_per_s")
                        for _, row in decode_b1)
    floor_rate = _first((row.get("floor_measured") or {}).get("decode_tokens_per_s")
                        for _, row in decode_b1)
    actor = [f for rec in _records(jobs, "gpu_decision_latency")
             for f in rec.get("formats", []) if f.get("field_order") == "action_first"]
    kto = _records(jobs, "gpu_kto_step")
    to_action = _first(f.get("time_to_action_prefix_cache") or f.get("time_to_action")
                       for f in actor) or {}
    values = {
        "decode_b1_fraction_of_hbm_floor": best[0] / floor_rate if best and floor_rate else None,
        "decode_b1_over_torch": best[0] / torch_rate if best and torch_rate else None,
        "time_to_action_s": to_action.get("median_s"),
        "kto_mfu_spec": _first(r.get("mfu_spec") for r in kto),
    }
    # XLA compiles inside a figure's timed calls (the scripts count them; 0 expected): a
    # figure that includes one measures the compiler too
    compiles = {
        "decode_b1_fraction_of_hbm_floor": (best[2].get("sfjax_sampler") or {}).get(
            "compiles_while_timed") if best else None,
        "time_to_action_s": to_action.get("compiles"),
        "kto_mfu_spec": _first((r.get("sfjax") or {}).get("compiles_while_timed") for r in kto),
    }
    compiles["decode_b1_over_torch"] = compiles["decode_b1_fraction_of_hbm_floor"]
    out = {}
    for key, what, op, goal in TARGETS:
        v = values[key]
        if isinstance(v, float) and v != v:  # NaN: a failed measurement
            v = None
        met = None if v is None else (v >= goal if op == ">=" else v < goal)
        out[key] = {"what": what, "value": v, "goal": f"{op} {goal:g}", "met": met}
        if v is not None and compiles[key]:
            out[key]["compiles_while_timed"] = compiles[key]
    if best:
        for key in ("decode_b1_fraction_of_hbm_floor", "decode_b1_over_torch"):
            if out[key]["value"] is not None:
                out[key]["layers"] = best[1]
    torch_mfu = _first((r.get("torch") or {}).get("mfu_spec") for r in kto)
    if torch_mfu is not None:
        out["kto_mfu_spec"]["torch_peft"] = torch_mfu
    return out


def compare_decode_layers(jobs: dict) -> dict | None:
    """The sampler's decode rate per batch size for each layer mode the jobs measured (the
    default ``decode`` job: decode unrolled; ``decode_scan``: scanned over a stacked cache), and
    which is faster; None unless two modes have a common batch size."""
    rates: dict[str, dict[int, float]] = {}
    for record in _records(jobs, "gpu_decode"):
        if "layers" not in record:
            continue
        for row in record.get("rows", []):
            rate = (row.get("sfjax_sampler") or {}).get("decode_tokens_per_s")
            if rate:
                rates.setdefault(record["layers"], {})[int(row["batch"])] = float(rate)
    batches: dict[int, dict] = {}
    for b in sorted({b for by in rates.values() for b in by}):
        at = {m: by[b] for m, by in rates.items() if b in by}
        if len(at) >= 2:
            batches[b] = {**at, "faster": max(at, key=at.get)}
    return {"batches": batches} if batches else None


# ------------------------------------------------------------------------------ dry run
def predicted_run_s(job: Job, tiny: bool = False, card: str = "h200") -> float:
    """Roofline floor (seconds) of what ``job`` computes at its default sizes, at the HBM
    bandwidth and matmul rate read on ``card`` (:data:`CARDS`), plus the torch references it
    runs (their measured time where known, else their floor). A lower bound: overheads are not
    in it."""
    import gpu_common as gc

    config = gc.model_config(tiny)
    roof = gc.Roofline(*CARDS[card])

    def prefill_s(B, T):
        flops = gc.forward_flops(config, B * T, B * gc.prefill_attended_keys(1, T), B)
        return flops / roof.matmul_flops_per_s

    def decode_s(B, prompt, new):
        return sum(gc.decode_floor_s(config, B, prompt + t, roof) for t in range(new))

    script = job.script
    if script == "gpu_decode.py":
        batches = [int(b) for b in job.args[job.args.index("--batches") + 1].split(",")] if (
            "--batches" in job.args) else [1, 8, 64, 256]
        torch_b = [int(b) for b in job.args[job.args.index("--torch-batches") + 1].split(",")] if (
            "--torch-batches" in job.args) else ([] if "--no-torch" in job.args else batches)
        total = 0.0
        for B in batches:  # sampler: (new + h tokens) x (iters + warm-up), model-only steps
            one = prefill_s(B, 128) + decode_s(B, 128, 256) + decode_s(B, 128, 129)
            total += 4 * one + 20 * gc.decode_floor_s(config, B, 256, roof)
            if B in torch_b:
                total += 4 * one
        return total
    if script == "gpu_decision_latency.py":  # ~2,500-token prompts; per timed figure 31
        formats = 1 if "--formats" in job.args else 2  # decisions: 2 x 10 untimed, 10 timed, 1
        to_action = prefill_s(1, 2560) + decode_s(1, 2560, 8)
        full = prefill_s(1, 2560) + decode_s(1, 2560, 128)
        per = to_action if "--actor-only" in job.args else 2 * to_action + full
        return formats * 31 * per
    if script == "gpu_kto_step.py":  # 1 + 1 + steps (5) steps each side
        import gpu_kto_step

        a = gpu_kto_step.parse_args(list(job.args))
        flops = gpu_kto_step.step_flops(config, a.batch, a.prompt_len, a.completion_len)
        ours = (2 + a.steps) * flops["step_flops"] / roof.matmul_flops_per_s
        return ours + (0.0 if a.no_torch else 7 * TORCH_KTO_STEP_S)
    if script == "gpu_rfr_rollouts.py":
        return 8 * (prefill_s(8, 2560) + decode_s(64, 2560, 192))
    return 30.0  # the attention probe: kernels alone


def dry_run(jobs: list[Job], args) -> dict:
    """Each job's predicted compile (CPU AOT x factor) and run time (floor), against its cap and
    the budget; printed as a table, returned as a dict."""
    try:
        with open(args.compile_json) as f:
            programs = json.load(f)["programs"]
    except FileNotFoundError:
        raise SystemExit(f"{args.compile_json} not found: run benchmarks/bench_compile.py "
                         f"--out {args.compile_json} first (or pass --compile-json)") from None
    import gpu_common as gc

    extra = args.extra.split()
    mode = gc.layer_mode("--unrolled" in extra, "--scan-decode" in extra)
    out, total = {}, 0.0
    print(f"{'job':13s} {'compile s':>10s} {'run s (floor)':>14s} {'sum':>8s} {'cap':>6s}")
    for job in jobs:
        argv = extra + list(job.args)
        job_mode = gc.layer_mode("--unrolled" in argv, "--scan-decode" in argv)
        cpu = 0.0
        for name, count in job.programs:
            recs = programs.get(name, {})  # programs without a decode step: their scanned time
            rec = recs.get(job_mode) or recs.get(
                "scanned" if job_mode == "scan_decode" else "unrolled")
            rec = rec or recs.get("unrolled")
            cpu += count * (rec["total_s"] if rec else 0.0)
        compile_s = cpu * args.gpu_compile_factor
        run_s = predicted_run_s(job, args.tiny, args.card)
        total += compile_s + run_s
        out[job.name] = {"compile_s": round(compile_s, 1), "run_floor_s": round(run_s, 1),
                         "cap_s": job.cap_s, "fits_cap": compile_s + run_s <= job.cap_s}
        flag = ("" if compile_s + run_s <= job.cap_s else "  OVER CAP") + (
            "  (if time is left)" if job.if_time else "")
        print(f"{job.name:13s} {compile_s:10.1f} {run_s:14.1f} {compile_s + run_s:8.1f} "
              f"{job.cap_s:6.0f}{flag}", flush=True)
    fits = total <= args.budget_s
    print(f"total predicted {total:.0f} s of a {args.budget_s:.0f} s budget"
          f"{'' if fits else ' -- OVER BUDGET'} ({mode} layers unless a job says "
          f"otherwise; compile = CPU AOT x {args.gpu_compile_factor}; run floors on the "
          f"{args.card.upper()})", flush=True)
    return {"jobs": out, "total_s": round(total, 1), "fits_budget": fits, "mode": mode,
            "card": args.card}


def main(argv=None) -> dict:
    args = parse_args(argv)
    jobs = select(args)
    if args.list:
        for j in jobs:
            print(f"{j.name:15s} {j.script} {' '.join(j.args)} (cap {j.cap_s:.0f} s"
                  f"{', on the time the others leave' if j.if_time else ''})")
        return {}
    if args.dry_run:
        return dry_run(jobs, args)
    env_out = os.environ.get("OUT")  # the device machine's folder that comes back
    if env_out and args.bundle is None:
        args.bundle = os.path.join(env_out, "gpu_all.json")
    if env_out and args.log is None:
        args.log = os.path.join(env_out, "gpu_all.log")
    t0 = time.monotonic()
    tee = Tee(args.log, t0)
    out_dir = args.out_dir or (os.path.join(env_out, "gpu_jobs") if env_out else
                               os.path.join("/tmp", f"sfjax_gpu_{os.getpid()}"))
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
    try:
        return _run_jobs(jobs, args, tee, bundle, save, out_dir)
    finally:
        tee.close()


def _run_jobs(jobs, args, tee: Tee, bundle: dict, save, out_dir: str) -> dict:
    """The preflight, then each job in order under the budget left; the bundle saved after
    each."""
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
    layers = compare_decode_layers(bundle["jobs"])
    if layers:
        bundle["decode_layers"] = layers
        for b, r in layers["batches"].items():
            tee.line(f"decode layers, batch {b}: " + ", ".join(
                f"{m} {v:,.0f} tok/s" for m, v in r.items() if m != "faster") +
                f" -> faster: {r['faster']}")
    bundle["targets"] = check_targets(bundle["jobs"])
    if args.tiny:
        tee.line("targets below: --tiny shapes, not the paper's (a smoke check of the runner)")
    for key, t in bundle["targets"].items():
        value = "no figure" if t["value"] is None else f"{t['value']:.3g}"
        extra = (f" (torch + PEFT {t['torch_peft']:.3g})" if "torch_peft" in t else "") + (
            f" [{t['layers']} layers]" if "layers" in t else "") + (
            f" [WARNING: {t['compiles_while_timed']} XLA compile(s) in the timed calls]"
            if t.get("compiles_while_timed") else "")
        verdict = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        tee.line(f"target {key}: {value} ({t['goal']}) {verdict}{extra}")
    counts: dict[str, int] = {}
    for r in bundle["jobs"].values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    bundle["summary"] = counts
    save()
    tee.line(f"done in {bundle['total_s']:.1f} s: {counts}")
    return bundle


if __name__ == "__main__":
    main()
