"""``Qwen3Config.scan_layers``: stacked layer parameters run as one ``lax.scan`` give the
unrolled model's logits (and transformers'), cache, gradients with remat, PEFT adapters and
sharding; HF checkpoints load into the stack and save back per layer."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec
from safetensors.numpy import load_file

from sfjax import parallel
from sfjax.models import lora, qwen3
from sfjax.models.kv_cache import init_cache
from tests.models.test_qwen3 import F32_TOL, hf_logits, hf_model, left_padded, rel_err


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    """(unrolled, scanned) copies of the same checkpoint."""
    plain = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    scanned = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32, scan_layers=True)
    return plain, scanned


def test_stacked_layout_and_logits_match_unrolled_and_transformers(pair, tiny_checkpoint):
    plain, scanned = pair
    L = plain.config.num_layers
    assert scanned.config.scan_layers and not plain.config.scan_layers
    q = scanned.layers.self_attn.q_proj.kernel[...]
    assert q.shape == (L, 64, 64)
    np.testing.assert_array_equal(q[1], plain.layers[1].self_attn.q_proj.kernel[...])
    ids, mask = left_padded(3, 11, pads=[0, 4, 9], seed=4)
    fwd = nnx.jit(lambda m, i, k: m(i, attention_mask=k))
    got, want = fwd(scanned, ids, mask), fwd(plain, ids, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert rel_err(got, hf_logits(hf_model(tiny_checkpoint), ids, mask), mask) <= F32_TOL
    # one layer compiled: the scanned program holds a while loop, the unrolled one none
    assert "while" in fwd.lower(scanned, ids, mask).as_text()
    assert "while" not in fwd.lower(plain, ids, mask).as_text()


@pytest.mark.parametrize("scan_decode", [False, True])
def test_prefill_then_decode_matches_unrolled(pair, scan_decode):
    plain, scanned = pair
    scanned = nnx.clone(scanned)
    scanned.config = dataclasses.replace(scanned.config, scan_decode=scan_decode)
    ids, mask = left_padded(2, 7, pads=[0, 3], seed=5)

    @nnx.jit
    def run(model):
        cache = init_cache(model.config, 2, 16, jnp.float32)
        first, cache = model(ids, attention_mask=mask, cache=cache)
        out = [first]
        for t in range(3):  # decode: one token per step
            logits, cache = model(ids[:, t : t + 1], attention_mask=np.ones((2, 1), bool),
                                  cache=cache)  # fmt: skip
            out.append(logits)
        return out, cache

    (a, ca), (b, cb) = run(plain), run(scanned)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert len(cb.k) == plain.config.num_layers and int(cb.index) == 10
    assert cb.stacked == scan_decode and not ca.stacked  # scan_decode: one [L, ...] array
    for x, y in zip((*ca.k, *ca.v), (*cb.k, *cb.v)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_scan_decode_step_is_one_scan_over_a_stacked_cache(pair):
    """With ``scan_decode`` a decode step compiles one layer (a while loop) over the stacked
    cache and writes it with one update; without, it runs unrolled over the per-layer cache."""
    _, scanned = pair
    lowered = {}
    for scan_decode in (False, True):
        m = nnx.clone(scanned)
        m.config = dataclasses.replace(m.config, scan_decode=scan_decode)
        cache = init_cache(m.config, 2, 8, jnp.float32)
        step = nnx.jit(lambda m, c: m(np.ones((2, 1), np.int32), cache=c))
        lowered[scan_decode] = step.lower(m, cache).as_text()
    assert "while" in lowered[True] and "while" not in lowered[False]
    cache_writes = [line for line in lowered[True].splitlines()
                    if "dynamic_update_slice" in line and "-> tensor<2x2x2x8x16xf32>" in line]  # fmt: skip
    assert len(cache_writes) == 2  # [L, B, K, S, H] keys and values, each written once


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_gradients_match_unrolled(pair, policy):
    plain, scanned = pair
    scanned = nnx.clone(scanned)
    scanned.config = dataclasses.replace(scanned.config, remat_policy=policy)
    ids, mask = left_padded(2, 6, pads=[0, 2], seed=6)

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(ids, attention_mask=mask))[..., 7])

    def grads(model, remat):
        model = nnx.clone(model)
        model.remat = remat
        return dict(nnx.to_flat_state(nnx.jit(nnx.grad(loss))(model)))

    g0, g1 = grads(plain, False), grads(scanned, True)
    assert len(g1) < len(g0)  # stacked leaves
    # rtol 1e-4: XLA:CPU orders the float32 sums of the scanned and unrolled gradients
    # differently, and how depends on the CPU (on an AVX-512 machine 1 of the 65,536 embedding
    # gradients differed by 6.3e-5 relative, 1.2e-7 absolute; elsewhere all within 1e-5)
    for path, a in g0.items():
        b = g1[("layers", *path[2:])].get_value()[path[1]] if path[0] == "layers" else g1[path].get_value()
        np.testing.assert_allclose(a.get_value(), b, rtol=1e-4, atol=1e-7, err_msg=str(path))

    def traced(remat):  # the scanned layer is a checkpointed function only with remat
        m = nnx.clone(scanned)
        m.remat = remat
        graphdef, state = nnx.split(m)
        return str(jax.make_jaxpr(lambda s: loss(nnx.merge(graphdef, s)))(state))

    assert "remat" in traced(True)  # jax.checkpoint = remat2
    assert "remat" not in traced(False)


def test_bad_remat_policy_is_refused():
    with pytest.raises(ValueError, match="jax.checkpoint_policies"):
        qwen3.Qwen3Config.tiny(remat_policy="save_everything_please")


def test_save_pretrained_writes_per_layer_tensors(pair, tiny_checkpoint, tmp_path):
    _, scanned = pair
    out = qwen3.save_pretrained(scanned, tmp_path / "saved")
    got, orig = load_file(str(out / "model.safetensors")), load_file(str(tiny_checkpoint / "model.safetensors"))
    assert set(got) == set(orig)
    for name in orig:
        np.testing.assert_array_equal(got[name], orig[name], err_msg=name)


def test_peft_adapters_round_trip_with_per_layer_names(pair, tmp_path):
    plain, scanned = (nnx.clone(m) for m in pair)
    cfg = lora.LoRAConfig(rank=2, target_modules=("q_proj", "down_proj"))
    lora.apply_lora(plain, cfg, rngs=nnx.Rngs(1))
    lora.apply_lora(scanned, cfg, rngs=nnx.Rngs(1))
    assert scanned.layers.mlp.down_proj.lora_a[...].shape == (2, 128, 2)
    for i, (_, m) in enumerate(lora.lora_modules(plain)):
        m.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), m.lora_b[...].shape)
    lora.save_adapter(plain, tmp_path / "a", cfg)
    lora.load_adapter(scanned, tmp_path / "a")
    lora.save_adapter(scanned, tmp_path / "b", cfg)
    a = load_file(str(tmp_path / "a" / lora.ADAPTER_WEIGHTS))
    b = load_file(str(tmp_path / "b" / lora.ADAPTER_WEIGHTS))
    assert set(a) == set(b) and "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in b
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ids, mask = left_padded(2, 6, pads=[0, 1], seed=7)
    fwd = nnx.jit(lambda m, i, k: m(i, attention_mask=k))
    np.testing.assert_allclose(fwd(scanned, ids, mask), fwd(plain, ids, mask), rtol=1e-5, atol=1e-5)
    with lora.adapters_disabled(scanned):
        np.testing.assert_allclose(fwd(scanned, ids, mask), fwd(pair[0], ids, mask), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="some layers"):
        lora.apply_lora(nnx.clone(pair[1]), lora.LoRAConfig(target_modules=r".*layers\.0\.mlp\.up_proj"))


def test_sharding_rules_give_stacked_params_a_layers_axis(pair):
    _, scanned = pair
    mesh = AbstractMesh((2, 2), ("fsdp", "tp"))
    specs = dict(nnx.to_flat_state(parallel.state_shardings(nnx.state(scanned), mesh)))
    assert specs[("layers", "self_attn", "q_proj", "kernel")].spec == PartitionSpec(None, "fsdp", "tp")
    assert specs[("layers", "mlp", "down_proj", "kernel")].spec == PartitionSpec(None, "tp", "fsdp")
    assert specs[("layers", "input_layernorm", "weight")].spec == PartitionSpec(None, None)
    assert parallel.param_logical_axes(("layers", "mlp", "up_proj", "lora_a"), (2, 64, 4)) == (
        "layers", "embed", "lora_rank")
    config = dataclasses.replace(scanned.config, scan_decode=True)  # a stacked cache
    cache = jax.eval_shape(lambda: init_cache(config, 4, 16, jnp.bfloat16))
    sh = parallel.cache_shardings(cache, AbstractMesh((2, 2, 2), parallel.AXES))
    assert sh.k.spec == sh.v.spec == PartitionSpec(None, ("data", "fsdp"), "tp", None, None)
