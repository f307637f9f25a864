"""The GPU benchmark scripts (``benchmarks/gpu_*.py``) stay runnable: each runs end to end on
CPU with ``--tiny`` (tiny config, 2-3 steps), in this process, and writes a sane JSON record;
the Qwen3-4B cost model behind their rooflines matches the known model facts."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


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


def test_device_check_prints_devices(capsys):
    mod = importlib.import_module("gpu_decode")
    assert mod.main(["--device-check"]) is None
    assert "jax.devices():" in capsys.readouterr().out


def test_gpu_decode_tiny_with_torch_reference(tmp_path):
    rec = _run("gpu_decode", tmp_path)
    (row,) = rec["rows"]
    assert row["batch"] == 2 and rec["torch_device"] == "cpu"
    for part in ("sfjax_sampler", "sfjax_model_only", "floor_measured", "torch"):
        assert _pos(row[part]["decode_tokens_per_s"]), part
        assert _pos(row[part]["prefill_tokens_per_s"]), part
    assert row["sfjax_sampler"]["traces"] == 1  # 1 and N new tokens share one program
    assert _pos(row["sfjax_over_torch_decode"])
    assert _pos(rec["roofline"]["measured"]["hbm_bytes_per_s"])


def test_gpu_decision_latency_tiny(tmp_path):
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
    first, refl = rec["formats"]
    assert first["new_tokens_to_action"] < refl["new_tokens_to_action"]


def test_gpu_rfr_rollouts_tiny(tmp_path):
    rec = _run("gpu_rfr_rollouts", tmp_path, "--no-torch")
    s = rec["sfjax"]
    assert s["rollouts"] == rec["prompts"] * rec["k"] == 8
    assert s["actions_parsed"] == s["rollouts"]  # the action constraint always yields one
    assert s["calls"] == 2 and s["traces"] == 1
    assert _pos(s["tokens_per_s"]) and _pos(rec["floor_measured_s"])


def test_gpu_kto_step_tiny_with_torch_reference(tmp_path):
    rec = _run("gpu_kto_step", tmp_path)
    s = rec["sfjax"]
    assert _pos(s["step_s"]) and s["skipped_steps"] == 0 and s["traces"] == 1
    assert math.isfinite(s["loss_last"]) and math.isfinite(rec["torch"]["loss_last"])
    assert rec["step_flops"] > 5 * rec["forward_flops_batch"]
    assert 0 < rec["mfu_measured_matmul"] < 5  # loose: tiny CPU timings are noisy
