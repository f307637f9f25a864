"""Qwen3 forward and KV cache against transformers' torch Qwen3 (the independent reference).

Error metric everywhere: relative max error ``max|a - b| / max|b|`` over unmasked positions.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from attention_calls import record_attention_calls
from flax import nnx

from sfjax import testing
from sfjax.models import qwen3
from sfjax.models.qwen3 import KVCache, Qwen3, Qwen3Config, init_cache

F32_TOL = 1e-4
BF16_TOL = 2e-2  # bf16 params/activations vs the float32 reference on the same (bf16) weights


@nnx.jit
def forward(model, ids_BT, mask_BT):
    """Un-cached forward, jitted (one compile per shape beats op-by-op dispatch on CPU)."""
    return model(ids_BT, attention_mask=mask_BT)


@nnx.jit
def forward_cached(model, ids_BT, mask_BT, cache):
    return model(ids_BT, attention_mask=mask_BT, cache=cache)


def rel_err(a, b, mask=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[np.asarray(mask, bool)], b[np.asarray(mask, bool)]
    return float(np.abs(a - b).max() / np.abs(b).max())


def hf_model(path, dtype=torch.float32):
    return transformers.Qwen3ForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation="eager"
    ).eval()


def hf_logits(model, ids, mask, offset=0):
    """HF logits with positions from the mask (HF does not derive them itself)."""
    mask = np.asarray(mask, bool)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None) + offset
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(pos, dtype=torch.long),
        )
    return out.logits.float().numpy()


def left_padded(batch, length, pads, seed=0, vocab=1000):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length))
    mask = np.ones((batch, length), bool)
    for b, p in enumerate(pads):
        mask[b, :p] = False
        ids[b, :p] = 820  # <|endoftext|>, the pad id
    return ids, mask


@pytest.mark.parametrize(
    "overrides",
    [
        None,  # tied head, GQA 2 (session fixture)
        {"tie_word_embeddings": False, "num_key_value_heads": 4},  # untied, GQA 1 (MHA)
        {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8},  # GQA 4
    ],
    ids=["tied-gqa2", "untied-gqa1", "tied-gqa4"],
)
def test_logits_match_transformers_left_padded(overrides, tiny_checkpoint, tmp_path):
    path = (
        tiny_checkpoint
        if overrides is None
        else testing.write_tiny_checkpoint(tmp_path / "ckpt", overrides, seed=3)
    )
    model = qwen3.from_pretrained(path, dtype=jnp.float32)
    ids, mask = left_padded(4, 12, pads=[0, 3, 7, 11])
    logits = forward(model, ids, mask)
    assert logits.shape == (4, 12, model.config.vocab_size) and logits.dtype == jnp.float32
    ref = hf_logits(hf_model(path), ids, mask)
    assert rel_err(logits, ref, mask) <= F32_TOL
    # The norm weights really are random (the test exercises them).
    assert float(jnp.std(model.layers[0].self_attn.q_norm.weight[...])) > 0.05


def test_positions_beyond_2048(tiny_checkpoint):
    """RoPE with theta 1e6 at positions up to ~2200, with left padding in the row."""
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    assert model.config.rope_theta == 1e6
    ids, mask = left_padded(1, 2200, pads=[5], seed=1)
    ref = hf_logits(hf_model(tiny_checkpoint), ids, mask)
    assert rel_err(forward(model, ids, mask), ref, mask) <= F32_TOL


def test_cache_positions_offset_matches_transformers(tiny_checkpoint):
    """A cache whose rows start at position 3000 equals HF with shifted position_ids."""
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    ids, mask = left_padded(2, 8, pads=[0, 2], seed=2)
    cache = init_cache(model.config, 2, 8, jnp.float32)
    cache = cache.replace(positions=jnp.full((2,), 3000, jnp.int32))
    logits, _ = forward_cached(model, ids, mask, cache)
    ref = hf_logits(hf_model(tiny_checkpoint), ids, mask, offset=3000)
    assert rel_err(logits, ref, mask) <= F32_TOL


def test_bfloat16_within_tolerance(tmp_path):
    path = testing.write_tiny_checkpoint(tmp_path / "bf16", seed=4, dtype="bfloat16")
    model = qwen3.from_pretrained(path, dtype=jnp.bfloat16)
    assert model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    ids, mask = left_padded(3, 10, pads=[0, 4, 8], seed=5)
    logits = forward(model, ids, mask)
    assert logits.dtype == jnp.float32
    ref32 = hf_logits(hf_model(path, torch.float32), ids, mask)
    ref16 = hf_logits(hf_model(path, torch.bfloat16), ids, mask)
    assert rel_err(logits, ref32, mask) <= BF16_TOL
    assert rel_err(logits, ref16, mask) <= BF16_TOL
    # ... and clearly not float32 exact (the params really are bf16).
    assert rel_err(logits, ref32, mask) > 1e-5


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)


def test_prefill_then_decode_equals_full_forward(tiny_model):
    """Left-padded prefill + T=1 decode steps (one with a padded row) == un-cached forward."""
    prompt_len, steps = 7, 5
    ids, mask = left_padded(3, prompt_len + steps, pads=[0, 2, 6], seed=6)
    mask[1, prompt_len + 2] = False  # a row that skips a decode step (e.g. finished)
    full = np.asarray(forward(tiny_model, ids, mask))

    traces = []

    @nnx.jit
    def step(model, ids_BT, mask_BT, cache):
        traces.append(1)
        return model(ids_BT, attention_mask=mask_BT, cache=cache)

    cache = init_cache(tiny_model.config, 3, prompt_len + steps + 3, jnp.float32)
    logits, cache = forward_cached(tiny_model, ids[:, :prompt_len], mask[:, :prompt_len], cache)
    assert rel_err(logits, full[:, :prompt_len], mask[:, :prompt_len]) <= F32_TOL
    for t in range(prompt_len, prompt_len + steps):
        logits, cache = step(tiny_model, ids[:, t : t + 1], mask[:, t : t + 1], cache)
        assert rel_err(logits[:, 0], full[:, t], mask[:, t]) <= F32_TOL
    assert len(traces) == 1  # decode steps do not recompile
    assert int(cache.index) == prompt_len + steps
    np.testing.assert_array_equal(cache.positions, mask.sum(1))
    np.testing.assert_array_equal(cache.slot_mask[:, : prompt_len + steps], mask)
    assert not cache.slot_mask[:, prompt_len + steps :].any()


def test_fully_padded_row_has_no_nan(tiny_model):
    ids, mask = left_padded(2, 5, pads=[0, 5], seed=7)
    assert np.isfinite(np.asarray(forward(tiny_model, ids, mask))).all()
    cache = init_cache(tiny_model.config, 2, 8, jnp.float32)
    logits, cache = forward_cached(tiny_model, ids, mask, cache)
    assert np.isfinite(np.asarray(logits)).all()
    logits, cache = forward_cached(tiny_model, ids[:, :1], np.ones((2, 1), bool), cache)
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_array_equal(cache.positions, [6, 1])


def test_cache_repeat_matches_repeated_prefill(tiny_model):
    ids, mask = left_padded(2, 6, pads=[0, 3], seed=8)
    cache = init_cache(tiny_model.config, 2, 8, jnp.float32)
    _, cache = forward_cached(tiny_model, ids, mask, cache)
    rep = cache.repeat(3)
    assert isinstance(rep, KVCache) and rep.batch_size == 6 and rep.slot_mask.shape == (6, 8)
    ref_cache = init_cache(tiny_model.config, 6, 8, jnp.float32)
    _, ref_cache = forward_cached(
        tiny_model, np.repeat(ids, 3, 0), np.repeat(mask, 3, 0), ref_cache
    )
    nxt = np.arange(6)[:, None] + 100
    one = np.ones((6, 1), bool)
    a, _ = forward_cached(tiny_model, nxt, one, rep)
    b, _ = forward_cached(tiny_model, nxt, one, ref_cache)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rep.positions, np.repeat(cache.positions, 3))


def test_qwen3_4b_preset_shapes_without_memory():
    cfg = Qwen3Config.qwen3_4b()
    model = nnx.eval_shape(lambda: Qwen3(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    n = qwen3.count_params(model)
    per_layer = 2560 * 4096 * 2 + 2560 * 1024 * 2 + 3 * 2560 * 9728 + 2 * 2560 + 2 * 128
    assert n == 151936 * 2560 + 36 * per_layer + 2560
    assert abs(n / 1e9 - 4.02) < 0.01
    layer = model.layers[35]
    assert layer.self_attn.q_proj.kernel.shape == (2560, 4096)
    assert layer.self_attn.o_proj.kernel.shape == (4096, 2560)
    assert layer.self_attn.k_proj.kernel.shape == (2560, 1024)
    assert layer.mlp.down_proj.kernel.shape == (9728, 2560)
    assert layer.self_attn.q_norm.weight.shape == (128,)
    assert model.embed_tokens.embedding.shape == (151936, 2560)
    assert model.lm_head is None and len(model.layers) == 36
    # KV cache per token in bf16: 2 (k, v) * 36 layers * 8 heads * 128 * 2 bytes = 144 KiB.
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, 1, jnp.bfloat16))
    assert len(cache.k) == 36 and sum(x.size for x in cache.k) * 2 * 2 == 144 * 1024


def test_tiny_presets_match_the_test_checkpoints(tiny_checkpoint, tiny_checkpoint_untied):
    assert Qwen3Config.from_hf(tiny_checkpoint) == Qwen3Config.tiny()
    assert Qwen3Config.from_hf(tiny_checkpoint_untied) == Qwen3Config.tiny(
        tie_word_embeddings=False
    )


def test_config_round_trips_through_transformers():
    cfg = Qwen3Config.tiny(tie_word_embeddings=False, rope_theta=5e6)
    hf = transformers.Qwen3Config(**cfg.to_hf())
    assert Qwen3Config.from_hf(hf.to_dict()) == cfg
    assert Qwen3Config.from_hf(cfg.to_hf()) == cfg
    assert Qwen3Config.qwen3_4b().num_groups == 4
    # Fields absent from config.json take transformers' Qwen3Config defaults.
    minimal = dict(
        model_type="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    assert Qwen3Config.from_hf(minimal) == Qwen3Config.from_hf(
        transformers.Qwen3Config(**minimal).to_dict()
    )
    with pytest.raises(ValueError, match="lacks required Qwen3 fields"):
        Qwen3Config.from_hf({"model_type": "qwen3", "vocab_size": 10})
    assert Qwen3Config.from_hf(Qwen3Config.qwen3_4b().to_hf()) == Qwen3Config.qwen3_4b()


def test_config_errors(tmp_path):
    base = Qwen3Config.tiny().to_hf()
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        Qwen3Config.from_hf({**base, "model_type": "llama"})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        Qwen3Config.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        dataclasses.replace(Qwen3Config.tiny(), num_kv_heads=3)
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen3Config.from_hf(tmp_path)


def _without_kv_heads(path, overrides, value):
    """A tiny checkpoint whose config.json lacks ``num_key_value_heads`` (``value`` None: the
    key removed; "null": the key set to JSON null)."""
    ckpt = testing.write_tiny_checkpoint(path, overrides, seed=6)
    cfg = json.loads((ckpt / "config.json").read_text())
    if value is None:
        del cfg["num_key_value_heads"]
    else:
        cfg["num_key_value_heads"] = None
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


@pytest.mark.parametrize(
    "overrides, value",
    [
        # absent: transformers 5.25 takes its Qwen3Config class default, 32 (not the number
        # of query heads), so a 64-head checkpoint with 32 kv heads (GQA 2) loads there
        ({"num_attention_heads": 64, "num_key_value_heads": 32, "head_dim": 4}, None),
        # null: transformers' __post_init__ uses num_attention_heads (MHA)
        ({"num_key_value_heads": 4}, "null"),
    ],
    ids=["absent-default-32", "null-means-mha"],
)
def test_config_without_num_key_value_heads_matches_transformers(overrides, value, tmp_path):
    ckpt = _without_kv_heads(tmp_path / "ckpt", overrides, value)
    hf = hf_model(ckpt)
    model = qwen3.from_pretrained(ckpt, dtype=jnp.float32)
    assert model.config.num_kv_heads == hf.config.num_key_value_heads
    ids, mask = left_padded(2, 9, pads=[0, 4], seed=7)
    assert rel_err(forward(model, ids, mask), hf_logits(hf, ids, mask), mask) <= F32_TOL


def test_config_without_num_key_value_heads_refused_like_transformers(tmp_path):
    """4 query heads and no num_key_value_heads: transformers takes 32 kv heads and refuses
    the checkpoint (size mismatch); sfjax says which key to add instead of guessing MHA."""
    ckpt = _without_kv_heads(tmp_path / "ckpt", {"num_key_value_heads": 4}, None)
    with pytest.raises(RuntimeError, match="mismatch"):
        hf_model(ckpt)
    with pytest.raises(ValueError, match=r"no num_key_value_heads.*default 32.*add"):
        qwen3.from_pretrained(ckpt, dtype=jnp.float32)
    with pytest.raises(ValueError, match="num_kv_heads must be positive"):
        Qwen3Config.from_hf({**Qwen3Config.tiny().to_hf(), "num_key_value_heads": 0})


def test_rope_scaling_added_to_a_transformers5_config_is_refused():
    """transformers 5 writes rope_parameters; the Qwen3 model card's YaRN recipe adds
    rope_scaling to config.json, and transformers then runs YaRN (rope_scaling wins)."""
    hf5 = transformers.Qwen3Config(**Qwen3Config.tiny(rope_theta=5e6).to_hf()).to_dict()
    assert hf5["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e6}
    assert Qwen3Config.from_hf(hf5).rope_theta == 5e6
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    edited = {**hf5, "rope_scaling": yarn}
    assert transformers.Qwen3Config.from_dict(edited).rope_parameters["rope_type"] == "yarn"
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        Qwen3Config.from_hf(edited)


def test_linear_modules_are_plain_and_replaceable(tiny_model):
    model = nnx.clone(tiny_model)
    attn = model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert type(getattr(attn, name)) is qwen3.Linear
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert type(getattr(model.layers[1].mlp, name)) is qwen3.Linear
    ids, mask = left_padded(2, 5, pads=[0, 5], seed=7)  # shapes compiled by an earlier test
    before = forward(model, ids, mask)
    # Replacing a projection by attribute assignment changes the forward (LoRA relies on it).
    attn.o_proj = qwen3.Linear(attn.o_proj.in_features, attn.o_proj.out_features, rngs=nnx.Rngs(9))
    assert not np.allclose(before, forward(model, ids, mask))
    assert type(tiny_model.layers[0].self_attn.o_proj) is qwen3.Linear  # the original is intact


def test_hidden_states_match_transformers_and_compose_to_logits(tiny_model, tiny_checkpoint):
    ids, mask = left_padded(2, 9, pads=[0, 4], seed=9)
    h_BTD = nnx.jit(lambda m, i, a: m.hidden_states(i, attention_mask=a))(tiny_model, ids, mask)
    hf = hf_model(tiny_checkpoint)
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    with torch.no_grad():
        ref = hf.model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(pos),
        ).last_hidden_state.numpy()
    assert rel_err(h_BTD, ref, mask) <= F32_TOL
    np.testing.assert_allclose(
        tiny_model.lm_logits(h_BTD), forward(tiny_model, ids, mask), rtol=1e-5, atol=1e-5
    )


def test_remat_gives_the_same_gradients(tiny_model):
    ids, mask = left_padded(2, 5, pads=[0, 2], seed=10)

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(ids, attention_mask=mask))[..., 7])

    plain = nnx.clone(tiny_model)
    remat = nnx.clone(tiny_model)
    remat.remat = True
    grad = lambda m: nnx.jit(nnx.grad(loss))(m)  # noqa: E731
    g0, g1 = nnx.to_flat_state(grad(plain)), nnx.to_flat_state(grad(remat))
    for (path, a), (_, b) in zip(g0, g1):
        np.testing.assert_allclose(
            a.get_value(), b.get_value(), rtol=1e-5, atol=1e-7, err_msg=str(path)
        )
    # Rematerialisation shows up as optimisation barriers in the lowered backward pass.
    assert "optimization_barrier" in nnx.jit(nnx.grad(loss)).lower(remat).as_text()
    assert "optimization_barrier" not in nnx.jit(nnx.grad(loss)).lower(plain).as_text()

    # A model merged inside an outer trace (how the KTO step and the sampler use it): the
    # remat path must work there too (nnx.remat refuses it with a TraceContextError).
    graphdef, state = nnx.split(remat)

    @jax.jit
    def pure_grad(state):
        return jax.grad(lambda s: loss(nnx.merge(graphdef, s)))(state)

    g2 = nnx.to_flat_state(pure_grad(state))
    for (path, a), (_, b) in zip(g0, g2):
        np.testing.assert_allclose(
            a.get_value(), b.get_value(), rtol=1e-5, atol=1e-7, err_msg=str(path)
        )


@pytest.mark.parametrize(
    "preset, total_b, non_embedding_b",
    [("qwen3_0_6b", 0.596, 0.440), ("qwen3_1_7b", 1.720, 1.409)],
)
def test_smaller_presets_match_published_sizes(preset, total_b, non_embedding_b):
    cfg = getattr(Qwen3Config, preset)()
    model = nnx.eval_shape(lambda: Qwen3(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    n = qwen3.count_params(model)
    assert abs(n / 1e9 - total_b) < 0.005
    assert abs((n - cfg.vocab_size * cfg.hidden_size) / 1e9 - non_embedding_b) < 0.005


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2.0**-8)])
def test_silu_mul_values_and_gradients(dtype, tol):
    """The MLP gate's custom VJP against float64 formulas on the same (rounded) inputs; float32
    also equals autodiff of ``silu(g) * u``. Tolerance: relative to each output's scale; bf16
    one rounding of the result (2^-8)."""
    kg, ku, kd = jax.random.split(jax.random.key(0), 3)
    g, u, d = (4 * jax.random.normal(k, (3, 7, 64)).astype(dtype) for k in (kg, ku, kd))
    out, vjp = jax.vjp(jax.jit(qwen3.silu_mul), g, u)
    dg, du = vjp(d)
    G, U, D = (np.asarray(a.astype(jnp.float32), np.float64) for a in (g, u, d))
    S = 1 / (1 + np.exp(-G))
    for got, want in ((out, G * S * U), (dg, D * U * S * (1 + G * (1 - S))), (du, D * G * S)):
        assert got.dtype == dtype
        assert rel_err(got.astype(jnp.float32), want) <= tol
    if dtype == jnp.float32:
        ref_out, ref_vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, g, u)
        for got, want in zip((out, dg, du), (ref_out, *ref_vjp(d))):
            assert rel_err(got, want) <= tol


def test_only_kv_cache_writes_are_marked_never_differentiated(tiny_model, monkeypatch):
    """The layer tells the attention dispatcher which calls may be differentiated: the
    un-cached forward may, a KV-cache write (prefill, decode) never (then "auto" may give
    cuDNN odd lengths: sfjax.models.attention.cudnn_unsupported_reason)."""
    seen = record_attention_calls(monkeypatch)
    ids, mask = left_padded(2, 7, pads=[0, 2], seed=3)
    forward(tiny_model, ids, mask)
    L = tiny_model.config.num_layers
    assert [c.differentiable for c in seen] == [True] * L
    seen.clear()
    forward_cached(tiny_model, ids, mask, init_cache(tiny_model.config, 2, 9, jnp.float32))
    assert [c.differentiable for c in seen] == [False] * L
