"""The GPU benchmark scripts (``benchmarks/gpu_*.py``) stay runnable: each runs end to end on
CPU with ``--tiny`` (tiny config, 2-3 steps), in this process, and writes a sane JSON record;
the Qwen3-4B cost model behind their rooflines matches the known model facts."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


@pytest.fixture(autouse=True)
def _restore_attention_setting():
    """The scripts set the attention kernel (``--attention``) for the whole process."""
    from sfjax.models import attention

    before = attention.get_implementation()
    yield
    attention.set_implementation(before)


def _run(name: str, tmp_path, *extra: str) -> dict:
    mod = importlib.import_module(name)
    out = tmp_path / f"{name}.json"
    record = mod.main(["--tiny", "--out", str(out), *extra])
    on_disk = json.loads(out.read_text())
    assert on_disk["benchmark"] == name and on_disk["tiny"] is True
    assert on_disk["device"]["devices"]
    return record


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_cost_model_matches_qwen3_4b_facts():
    import gpu_common as gc

    from sfjax.models.qwen3 import Qwen3Config

    cfg = Qwen3Config.qwen3_4b()
    costs = gc.qwen3_costs(cfg)
    assert costs.total_params == 4_022_468_096  # Qwen/Qwen3-4B, tied embeddings
    assert costs.kv_bytes_per_token == 144 * 1024  # DESIGN.md: ≈144 KiB per token in bf16
    # Batch-1 decode moves every weight once (≈8 GB) + a little KV: ≈596 tok/s at 4.8 TB/s.
    step = gc.decode_step_bytes(cfg, 1, 128)
    assert 8.04e9 < step < 8.07e9
    assert 590 < 1 / gc.decode_floor_s(cfg, 1, 128, gc.SPEC_H200) < 600
    # Without attention the forward is 2 FLOPs per matmul weight per token (+ LM head).
    assert gc.forward_flops(cfg, 10, 0, 0) == 2 * costs.layer_matmul_params * 10
    assert gc.forward_flops(cfg, 0, 0, 1) == 2 * cfg.hidden_size * cfg.vocab_size
    # Large batches turn decode compute-bound.
    B = 4096
    flops = gc.forward_flops(cfg, B, B * 129, B)
    assert gc.decode_floor_s(cfg, B, 128, gc.SPEC_H200) == pytest.approx(flops / 989e12)


@pytest.mark.parametrize("kind, card", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),  # the lent nvidia-h100-x1
    ("NVIDIA H200", "NVIDIA H200 SXM"),            # the lent nvidia-h200
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB SXM"),
    ("TPU v5 lite", "TPU v5e"),
    ("TPU v5", "TPU v5p"),
    ("cpu", None),
    ("Some Future Card", None),
])  # fmt: skip
def test_spec_roofline_is_the_datasheet_of_the_card_the_run_is_on(kind, card):
    """Spec floors and MFU come from the card's own datasheet (an H100 is not an H200: its HBM
    moves 3.35, not 4.8 TB/s); an unknown device has no spec figures rather than a wrong one."""
    import gpu_common as gc

    roof = gc.spec_roofline(kind)
    if card is None:
        assert roof is None
        return
    assert roof.source == f"spec: {card} datasheet"
    assert _pos(roof.hbm_bytes_per_s) and _pos(roof.matmul_flops_per_s)
    if card == "NVIDIA H100 SXM":
        assert (roof.hbm_bytes_per_s, roof.matmul_flops_per_s) == (3.35e12, 989e12)


def test_roofline_record_has_no_spec_off_a_known_accelerator():
    import gpu_common as gc

    roof = gc.Roofline(1e11, 1e12, "measured")
    assert gc.roofline_record(roof) == {"measured": dataclasses.asdict(roof), "spec": None}
    assert gc.spec_floor(lambda x, spec: 1 / 0, 1) is None  # CPU: the floor is not computed


def test_time_call_counts_the_compiles_inside_its_timed_calls(capsys):
    """A timed call that compiles (a new shape) is counted and warned about; warm-up compiles
    and already compiled calls are not."""
    import gpu_common as gc
    import jax
    import jax.numpy as jnp
    import numpy as np

    f = jax.jit(lambda x: jnp.sin(x) * 2.0)
    shapes = iter([3, 3, 5, 5])  # warm-up at 3, then a new shape once
    t = gc.time_call(lambda: f(np.ones(next(shapes), np.float32)), iters=3, warmup=1,
                     label="probe")
    assert t["compiles"] == 1 and len(t["times_s"]) == 3
    assert "warning: probe: 1 XLA compile(s)" in capsys.readouterr().err
    t = gc.time_call(lambda: f(np.ones(3, np.float32)), iters=3, warmup=0)
    assert t["compiles"] == 0 and "warning" not in capsys.readouterr().err
    with gc.CompileCounter() as c:  # the listener is gone once closed
        pass
    jax.jit(lambda x: x + 1)(np.ones(7, np.float32))
    assert c.count == 0


def test_random_model_has_the_qwen3_structure():
    import gpu_common as gc
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sfjax.models.qwen3 import Qwen3, Qwen3Config

    cfg = Qwen3Config.tiny()
    model = gc.random_model(cfg, seed=1)
    ref = nnx.state(Qwen3(cfg, dtype=jnp.bfloat16))
    got = nnx.state(model)
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert a.shape == b.shape and a.dtype == jnp.bfloat16
    assert jnp.all(model.norm.weight[...] == 1)
    w = model.layers[0].mlp.up_proj.kernel[...].astype(jnp.float32)
    assert 0.01 < float(jnp.std(w)) < 0.03
    logits = model(jnp.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


def test_random_model_compiles_one_draw_per_distinct_shape():
    """Not one jit over every leaf (146 s on an H200 at 4B): one small draw per distinct
    (shape, dtype, kind), reused across layers; stacked layers (scan_layers) too."""
    import gpu_common as gc
    import jax
    import jax.numpy as jnp
    from flax import nnx

    gc._draw.cache_clear()
    cfg = gc.model_config(True, scan_layers=False)
    model = gc.random_model(cfg, seed=2)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    kinds = {(x.shape, "norm" in jax.tree_util.keystr(p)) for p, x in leaves}
    assert gc.draw_compiles() == len(kinds) < len(leaves) / 2
    a, b = (model.layers[i].self_attn.q_proj.kernel[...] for i in (0, 1))
    assert not bool(jnp.all(a == b))  # same program, different keys
    scanned = gc.random_model(gc.model_config(True, scan_layers=True), seed=2)
    q = scanned.layers.self_attn.q_proj.kernel[...]
    assert q.shape[0] == cfg.num_layers and not bool(jnp.all(q[0] == q[1]))
    assert bool(jnp.all(scanned.layers.input_layernorm.weight[...] == 1))


_BLOCKED_IMPORTS = """
import sys
import time
for name in ("tyro", "tensorboardX", "openai", "gymnax", "rejax", "trl", "zmq", "gymnasium"):
    sys.modules[name] = None  # absent on the device machine (GPU.md)
sys.path.insert(0, sys.argv[1])
import gpu_all, gpu_attention, gpu_common, gpu_decision_latency, gpu_decode, gpu_kto_step
import gpu_rfr_rollouts, bench_compile
import sfjax.agents.rfr, sfjax.models.qwen3, sfjax.sampling, sfjax.train.kto
print("OK")
"""


def test_gpu_scripts_import_without_the_packages_the_device_lacks():
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORTS, str(BENCH)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_device_check_prints_devices(capsys):
    mod = importlib.import_module("gpu_decode")
    assert mod.main(["--device-check"]) is None
    assert "jax.devices():" in capsys.readouterr().out


def test_gpu_decode_tiny_with_scan_decode(tmp_path):
    """``--scan-decode`` (a stacked KV cache, decode scanned) runs the same measurement."""
    rec = _run("gpu_decode", tmp_path, "--scan-decode", "--no-torch")
    (row,) = rec["rows"]
    assert _pos(row["sfjax_sampler"]["decode_tokens_per_s"]) and rec["complete"] is True
    assert rec["layers"] == "scan_decode"
    assert row["sfjax_sampler"]["compiles_while_timed"] == 0


def test_gpu_decode_tiny_with_torch_reference(tmp_path):
    rec = _run("gpu_decode", tmp_path)
    (row,) = rec["rows"]
    assert row["batch"] == 2 and rec["torch_device"] == "cpu"
    for part in ("sfjax_sampler", "sfjax_model_only", "floor_measured", "torch"):
        assert _pos(row[part]["decode_tokens_per_s"]), part
        assert _pos(row[part]["prefill_tokens_per_s"]), part
    assert row["sfjax_sampler"]["traces"] == 1  # N and N/2 + 1 new tokens share one program
    for part in ("sfjax_sampler", "sfjax_model_only"):  # the times are the programs' alone
        assert row[part]["compiles_while_timed"] == 0, part
    assert _pos(row["sfjax_over_torch_decode"])
    assert _pos(rec["roofline"]["measured"]["hbm_bytes_per_s"])
    assert rec["complete"] is True and rec["attention"]["requested"] == "auto"
    assert rec["layers"] == "scanned"  # the default: prefill scanned, decode unrolled
    if rec["device"]["backend"] == "cpu":  # auto = the plain path off GPU
        assert set(rec["attention"]["traced_calls"]) == {"auto->plain"}


def test_gpu_decision_latency_tiny(tmp_path):
    import gpu_decision_latency as lat

    rec = _run("gpu_decision_latency", tmp_path, "--no-torch")
    orders = [f["field_order"] for f in rec["formats"]]
    assert orders == ["action_first", "reflection_first"]
    for f in rec["formats"]:
        assert f["time_to_action"]["action_parsed"] and f["full_decision"]["action_parsed"]
        assert len(f["time_to_action"]["times_s"]) == 2
        # Consecutive prompts share the system prompt, not the sliding history window.
        assert 0 < f["shared_prefix_tokens"] < min(f["prompt_tokens"])
        assert _pos(f["prefix_reuse"]["prefill_suffix_on_prefix_s"])
        assert _pos(f["floor_time_to_action_s"])
        pc = f["time_to_action_prefix_cache"]  # the Actor's default: prompt-prefix KV reuse
        assert pc["action_parsed"] and len(pc["times_s"]) == 2
        assert 0 < pc["cached_prefix_tokens"] <= f["shared_prefix_tokens"]
        # the two steps' prompts fall in different buckets (509 and 532 tokens: 512, 1,024),
        # each its own program, compiled before the timed pass and never inside it
        assert len({lat.prompt_bucket(n, 32) for n in f["prompt_tokens"]}) == 2
        for name in ("time_to_action", "full_decision", "time_to_action_prefix_cache"):
            assert f[name]["compiles"] == 0, (f["field_order"], name, f[name]["times_s"])
    first, refl = rec["formats"]
    assert first["new_tokens_to_action"] < refl["new_tokens_to_action"]


def test_gpu_decision_latency_actor_only_tiny(tmp_path):
    """The harness's latency job: action-first, the prefix cache only (what the Actor runs)."""
    rec = _run("gpu_decision_latency", tmp_path, "--no-torch", "--formats", "action_first",
               "--actor-only")  # fmt: skip
    (f,) = rec["formats"]
    assert f["field_order"] == "action_first"
    assert "time_to_action" not in f and "full_decision" not in f and "prefix_reuse" not in f
    pc = f["time_to_action_prefix_cache"]
    assert pc["action_parsed"] and len(pc["times_s"]) == 2 and _pos(pc["median_s"])
    assert pc["compiles"] == 0
    assert _pos(f["floor_time_to_action_s"])


def test_gpu_rfr_rollouts_tiny(tmp_path):
    rec = _run("gpu_rfr_rollouts", tmp_path, "--no-torch")
    s = rec["sfjax"]
    assert s["rollouts"] == rec["prompts"] * rec["k"] == 8
    assert s["actions_parsed"] == s["rollouts"]  # the action constraint always yields one
    assert s["calls"] == 2 and [list(p) for p in s["plan"]] == [[0, 2], [2, 4]]
    # one program, plus at most one more when the Actor's prompt-prefix cache (on by default)
    # re-buckets its prefix to what the calls share
    assert 1 <= s["traces"] <= 2
    assert s["compiles"] == 0  # the untimed passes compiled every program the timed one ran
    assert s["failed_attempts"] == []
    assert _pos(s["tokens_per_s"]) and _pos(rec["floor_measured_s"])


def test_gpu_kto_step_tiny_with_torch_reference(tmp_path):
    """Also the fused XLA attention path end to end, through the backward pass."""
    rec = _run("gpu_kto_step", tmp_path, "--attention", "xla")
    assert set(rec["attention"]["traced_calls"]) == {"xla"}
    s = rec["sfjax"]
    assert _pos(s["step_s"]) and s["skipped_steps"] == 0 and s["traces"] == 1
    assert s["compiles_while_timed"] == 0
    assert math.isfinite(s["loss_last"]) and math.isfinite(rec["torch"]["loss_last"])
    assert rec["step_flops"] > 5 * rec["forward_flops_batch"]
    assert 0 < rec["mfu_measured_matmul"] < 5  # loose: tiny CPU timings are noisy
    assert s["device_memory"] is None  # XLA:CPU keeps no allocator statistics


def test_gpu_kto_preset_job_runs_the_presets_rows(tmp_path):
    """gpu_all's kto_preset job (not in the default call): the step at the paper preset's own
    prompt bucket with remat, reporting the device's peak memory (none on a CPU)."""
    import gpu_all

    (job,) = [j for j in gpu_all.JOBS if j.name == "kto_preset"]
    assert not job.default and job.args[:2] == ("--prompt-len", "2048")
    rec = _run("gpu_kto_step", tmp_path, *job.args, "--prompt-len", "64")  # CPU: shorter rows
    assert (rec["prompt_len"], rec["remat"], rec["torch_device"]) == (64, True, None)
    s = rec["sfjax"]
    assert _pos(s["step_s"]) and math.isfinite(s["loss_last"]) and s["traces"] == 1
    assert "device_memory" in s


def test_gpu_kto_step_repeats_a_failed_fused_step_on_the_plain_path(tmp_path, monkeypatch):
    """A step that fails with a fused kernel (e.g. cuDNN refusing a graph at compile time) is
    measured again on the plain path, the first error kept: one device call still gets its
    figure."""
    import gpu_common as gc
    import gpu_kto_step as mod

    from sfjax.models import attention

    real = mod.run_sfjax

    def fails_fused(config, examples, args, remat=None):
        if attention.get_implementation() != "plain":
            raise RuntimeError("cuDNN graph build failed")
        return real(config, examples, args, remat)

    def guarded(args, label, fn, *a, **kw):  # as at full size: record, do not re-raise
        try:
            return fn(*a, **kw)
        except RuntimeError as e:
            return {"error": repr(e), "oom": False}

    monkeypatch.setattr(mod, "run_sfjax", fails_fused)
    monkeypatch.setattr(gc, "guarded", guarded)
    rec = _run("gpu_kto_step", tmp_path, "--attention", "xla", "--no-torch")
    s = rec["sfjax"]
    assert s["plain_after_error"] and "cuDNN graph build failed" in s["error_with_attention"]
    assert _pos(s["step_s"]) and math.isfinite(s["loss_last"])
    assert attention.get_implementation() == "xla"  # the retry's setting does not leak


def test_gpu_attention_tiny(tmp_path):
    rec = _run("gpu_attention", tmp_path)
    assert [r["name"] for r in rec["rows"]] == ["decode_b2", "prefill_b1", "train_b2", "train_cont_b2"]
    for r in rec["rows"]:
        assert _pos(r["floor_measured_s"])
        for impl in ("plain", "xla"):
            assert _pos(r[impl]["median_s"]) and r[impl]["finite"], (r["name"], impl)
        if rec["device"]["backend"] != "gpu":
            assert "needs a GPU" in r["cudnn"]["error"]


# ------------------------------------------------------------------------------ the runner
_FAKE = """
import json, sys, time
out = sys.argv[sys.argv.index("--out") + 1]
print("progress line", flush=True)
json.dump({"partial": True, "argv": sys.argv[1:]}, open(out, "w"))
MODE
"""


def test_gpu_all_runs_jobs_in_order_within_the_budget(tmp_path, monkeypatch):
    """One ok job, one that fails out of memory, one stopped at its cap (its partial JSON is
    kept), one skipped for lack of budget; everything lands in one bundle and one log."""
    import gpu_all

    modes = {
        "ok": "",
        "oom": "print('RESOURCE_EXHAUSTED: Out of memory while allocating'); sys.exit(1)",
        "slow": "time.sleep(60)",
        "late": "",
    }
    jobs = []
    for name, mode in modes.items():
        script = tmp_path / f"{name}.py"
        script.write_text(_FAKE.replace("MODE", mode))
        # "slow" may take longer than the budget: it is cut to what is left, then stopped
        jobs.append(gpu_all.Job(name, str(script), ("--flag", name), 600 if name == "slow" else 5))
    monkeypatch.setattr(gpu_all, "JOBS", tuple(jobs))
    bundle_path, log = tmp_path / "all.json", tmp_path / "all.log"
    bundle = gpu_all.main(["--budget-s", "5", "--min-job-s", "1", "--out-dir",
                           str(tmp_path / "out"), "--bundle", str(bundle_path), "--log",
                           str(log), "--skip", "", "--allow-cpu"])
    on_disk = json.loads(bundle_path.read_text())
    assert on_disk["order"] == ["ok", "oom", "slow", "late"]
    st = {k: v["status"] for k, v in on_disk["jobs"].items()}
    assert st == {"ok": "ok", "oom": "failed", "slow": "timeout", "late": "skipped"}
    assert bundle["summary"] == {"ok": 1, "failed": 1, "timeout": 1, "skipped": 1}
    assert on_disk["preflight"]["ok"] and on_disk["preflight"]["devices"]
    assert on_disk["preflight"]["sfjax"]["version"]  # and its commit, in a checkout
    jobs_rec = on_disk["jobs"]
    assert jobs_rec["ok"]["record"]["argv"][:2] == ["--flag", "ok"]
    assert jobs_rec["oom"]["oom_in_output"] and jobs_rec["oom"]["returncode"] == 1
    assert jobs_rec["slow"]["record"]["partial"] is True  # what it wrote before the cap
    assert jobs_rec["slow"]["wall_s"] < 30
    text = log.read_text()
    assert "ok | progress line" in text and "slow: timeout" in text and "late: skipped" in text
    with pytest.raises(SystemExit, match="unknown job"):
        gpu_all.main(["--only", "nope"])


def test_gpu_all_stops_when_the_preflight_fails(tmp_path, monkeypatch):
    import gpu_all

    monkeypatch.setattr(gpu_all, "PREFLIGHT", "raise SystemExit('flax is too old')")
    bundle = gpu_all.main(["--budget-s", "5", "--bundle", str(tmp_path / "b.json")])
    assert not bundle["preflight"]["ok"] and "flax is too old" in bundle["preflight"]["error"]
    default = [j for j in gpu_all.JOBS if j.default]
    assert bundle["jobs"] == {} and bundle["summary"] == {"preflight_failed": len(default)}


def test_gpu_all_stops_at_once_without_an_accelerator(tmp_path):
    """Run without arguments on a CPU machine, the runner spent its whole 400 s budget on jobs
    that could only time out; it now stops after the preflight and says what to use."""
    import gpu_all

    t0 = time.monotonic()
    bundle = gpu_all.main(["--bundle", str(tmp_path / "b.json")])
    assert time.monotonic() - t0 < 120  # the preflight alone
    pre = bundle["preflight"]
    assert not pre["ok"] and pre["backend"] == "cpu" and "--tiny" in pre["error"]
    assert bundle["jobs"] == {}


def test_gpu_all_default_jobs_fit_one_seven_minute_call():
    import gpu_all

    default = [j for j in gpu_all.JOBS if j.default]
    # the issue's order, then the scanned decode on whatever time the three leave
    assert [j.name for j in default] == ["decode", "latency", "kto", "decode_scan"]
    assert [j.if_time for j in default] == [False, False, False, True]
    assert sum(j.cap_s for j in default[:3]) <= gpu_all.DEFAULT_BUDGET_S <= 420 - 20
    decode = default[0]
    assert decode.args == ("--batches", "1,8,64", "--torch-batches", "1,8")
    assert "--actor-only" in default[1].args and "action_first" in default[1].args
    assert default[3].args == ("--batches", "1,8,64", "--no-torch", "--scan-decode")


def test_gpu_all_jobs_are_well_formed():
    """Every job but the attention probe (kernels, no bench_compile program) names its programs
    for --dry-run and says plainly whether it waits for time (two non-default jobs once passed
    their programs as ``if_time``: the dry run predicted no compile for them and called them
    optional)."""
    import gpu_all

    for j in gpu_all.JOBS:
        assert isinstance(j.default, bool) and isinstance(j.if_time, bool), j.name
        assert bool(j.programs) == (j.name != "attention"), j.name
        assert all(isinstance(n, str) and isinstance(k, int) and k > 0
                   for n, k in j.programs), j.name  # fmt: skip
    assert [j.name for j in gpu_all.JOBS if j.if_time] == ["decode_scan"]


def test_gpu_all_compares_decode_layer_modes():
    """With the unrolled (default) and scanned decode both measured, the runner says per batch
    size which was faster; batch sizes only one mode measured, or other benchmarks, are left
    out; one mode alone gives no comparison."""
    import gpu_all

    def job(layers, rates, benchmark="gpu_decode"):
        rows = [{"batch": b, "sfjax_sampler": {"decode_tokens_per_s": r}} for b, r in rates]
        return {"status": "ok", "record": {"benchmark": benchmark, "layers": layers,
                                           "rows": rows}}

    jobs = {"decode": job("scanned", [(1, 300.0), (8, 2000.0), (64, 9000.0)]),
            "latency": job("scanned", [(1, 5.0)], benchmark="gpu_decision_latency"),
            "decode_scan": job("scan_decode", [(1, 320.0), (8, 1900.0)]),
            "kto": {"status": "timeout", "record": None}}
    assert gpu_all.compare_decode_layers(jobs) == {"batches": {
        1: {"scanned": 300.0, "scan_decode": 320.0, "faster": "scan_decode"},
        8: {"scanned": 2000.0, "scan_decode": 1900.0, "faster": "scanned"}}}
    assert gpu_all.compare_decode_layers({"decode": jobs["decode"]}) is None


def test_gpu_all_checks_the_issue_targets_from_the_records():
    """The runner ends with issue 18's targets: batch-1 decode of the faster layer mode against
    the measured HBM floor and torch generate, the Actor's time to action, the KTO step's MFU;
    a target no job measured says so instead of passing or failing."""
    import gpu_all

    decode = {"benchmark": "gpu_decode", "layers": "scanned", "rows": [
        {"batch": 1, "sfjax_sampler": {"decode_tokens_per_s": 300.0},
         "floor_measured": {"decode_tokens_per_s": 400.0},
         "torch": {"decode_tokens_per_s": 50.0}},
        {"batch": 8, "sfjax_sampler": {"decode_tokens_per_s": 2000.0}}]}
    scan = {"benchmark": "gpu_decode", "layers": "scan_decode", "rows": [
        {"batch": 1, "sfjax_sampler": {"decode_tokens_per_s": 340.0},
         "floor_measured": {"decode_tokens_per_s": 400.0}}]}
    latency = {"benchmark": "gpu_decision_latency", "formats": [
        {"field_order": "action_first", "time_to_action": {"median_s": 0.2},
         "time_to_action_prefix_cache": {"median_s": 0.08}}]}
    kto = {"benchmark": "gpu_kto_step", "mfu_spec": 0.3, "torch": {"mfu_spec": 0.24}}
    jobs = {n: {"status": "ok", "record": r} for n, r in
            [("decode", decode), ("decode_scan", scan), ("latency", latency), ("kto", kto)]}
    t = gpu_all.check_targets(jobs)
    assert t["decode_b1_fraction_of_hbm_floor"] == {
        "what": "decode at batch 1 / measured HBM roofline", "value": pytest.approx(0.85),
        "goal": ">= 0.8", "met": True, "layers": "scan_decode"}
    assert t["decode_b1_over_torch"]["value"] == pytest.approx(6.8)
    assert t["decode_b1_over_torch"]["met"] is True
    assert t["time_to_action_s"]["value"] == 0.08 and t["time_to_action_s"]["met"] is True
    assert t["kto_mfu_spec"]["met"] is False and t["kto_mfu_spec"]["torch_peft"] == 0.24
    assert not any("compiles_while_timed" in v for v in t.values())
    # a figure whose timed calls compiled says so (the value stays what was measured)
    latency["formats"][0]["time_to_action_prefix_cache"]["compiles"] = 2
    scan["rows"][0]["sfjax_sampler"]["compiles_while_timed"] = 1
    t = gpu_all.check_targets(jobs)
    assert t["time_to_action_s"]["compiles_while_timed"] == 2
    assert t["time_to_action_s"]["value"] == 0.08
    assert t["decode_b1_over_torch"]["compiles_while_timed"] == 1
    assert "compiles_while_timed" not in t["kto_mfu_spec"]
    none = gpu_all.check_targets({"decode": {"status": "timeout", "record": None},
                                  "kto": {"status": "ok", "record": kto | {"mfu_spec": None}}})
    assert all(v["value"] is None and v["met"] is None for v in none.values())


def test_gpu_all_dry_run_predicts_from_bench_compile(tmp_path, capsys):
    """--dry-run: compile = CPU AOT seconds of the job's programs x the GPU factor, run = the
    roofline floor; a job predicted over its cap is flagged; nothing is started."""
    import gpu_all

    record = {"programs": {"decode": {"scanned": {"total_s": 10.0}, "unrolled": {"total_s": 50.0},
                                      "scan_decode": {"total_s": 1.0}},
                           "prefill": {"scanned": {"total_s": 2.0}, "unrolled": {"total_s": 4.0}},
                           "kto_step": {"scanned": {"total_s": 100.0}}}}  # fmt: skip
    path = tmp_path / "compile.json"
    path.write_text(json.dumps(record))
    out = gpu_all.main(["--dry-run", "--compile-json", str(path), "--gpu-compile-factor", "2"])
    jobs = out["jobs"]
    assert list(jobs) == ["decode", "latency", "kto", "decode_scan"]
    assert jobs["decode"]["compile_s"] == pytest.approx(2 * (3 * 10.0 + 3 * 2.0))
    # the job's own --scan-decode: decode scanned (1.0), prefill has no such mode (scanned)
    assert jobs["decode_scan"]["compile_s"] == pytest.approx(2 * (3 * 1.0 + 3 * 2.0))
    assert jobs["latency"]["compile_s"] == pytest.approx(2 * (10.0 + 2.0))
    assert jobs["kto"]["compile_s"] == pytest.approx(200.0)
    assert not jobs["kto"]["fits_cap"]  # 200 s of compile alone exceed its 140 s cap
    assert all(_pos(j["run_floor_s"]) for j in jobs.values())
    # the KTO floor includes the 7 measured torch + PEFT steps
    assert jobs["kto"]["run_floor_s"] > 7 * gpu_all.TORCH_KTO_STEP_S
    assert out["total_s"] == pytest.approx(sum(j["compile_s"] + j["run_floor_s"]
                                               for j in jobs.values()), abs=0.5)  # fmt: skip
    text = capsys.readouterr().out
    assert "OVER CAP" in text and "total predicted" in text
    unrolled = gpu_all.main(["--dry-run", "--compile-json", str(path), "--extra=--unrolled",
                             "--only", "latency"])  # fmt: skip
    assert unrolled["jobs"]["latency"]["compile_s"] == pytest.approx(
        gpu_all.GPU_COMPILE_FACTOR * (50.0 + 4.0))  # the calibrated default factor
    scan = gpu_all.main(["--dry-run", "--compile-json", str(path), "--extra=--scan-decode",
                         "--only", "latency", "--gpu-compile-factor", "2"])  # fmt: skip
    assert scan["jobs"]["latency"]["compile_s"] == pytest.approx(2 * (1.0 + 2.0))  # prefill: scanned
    # run floors from the card asked for: the H100's HBM is slower, its decode floor longer
    h100, h200 = (gpu_all.main(["--dry-run", "--compile-json", str(path), "--only", "decode",
                                "--card", card]) for card in ("h100", "h200"))  # fmt: skip
    assert h100["card"] == "h100" and h200["card"] == "h200"
    assert h100["jobs"]["decode"]["run_floor_s"] > h200["jobs"]["decode"]["run_floor_s"]
    with pytest.raises(SystemExit, match="bench_compile"):
        gpu_all.main(["--dry-run", "--compile-json", str(tmp_path / "missing.json")])


def test_bench_compile_tiny_records_compile_time_and_memory(tmp_path):
    import bench_compile

    out = tmp_path / "c.json"
    rec = bench_compile.main(["--tiny", "--programs", "prefill,ref_logps", "--out", str(out)])
    assert json.loads(out.read_text()) == rec
    for name in ("prefill", "ref_logps"):
        for mode in ("unrolled", "scanned"):
            r = rec["programs"][name][mode]
            assert _pos(r["compile_s"]) and _pos(r["total_s"])
            assert r["memory"]["peak"] >= r["memory"]["argument"] > 0
        assert _pos(rec["programs"][name]["speedup"])
    # another KTO prompt bucket (the paper preset's prompts fill 2,048): longer rows, more memory
    longer = bench_compile.main(["--tiny", "--programs", "ref_logps", "--modes", "scanned",
                                 "--kto-prompt", "64"])  # fmt: skip
    assert (rec["kto_tokens"], longer["kto_tokens"]) == ([2, 16, 8], [2, 64, 8])
    assert longer["programs"]["ref_logps"]["scanned"]["memory"]["temp"] > \
        rec["programs"]["ref_logps"]["scanned"]["memory"]["temp"]  # fmt: skip
