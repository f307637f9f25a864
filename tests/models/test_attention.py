"""Attention implementations (:mod:`sfjax.models.attention`) against a float64 numpy reference
and against each other, with left padding, GQA and a KV cache holding empty slots.

Tolerances: float32 inputs 1e-5 (max abs error, outputs are O(1)); bfloat16 inputs 2e-2 (the
plain path rounds probabilities to bf16 before ``p @ v``, the fused one does not).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfjax.models import attention as attn
from sfjax.models.qwen3 import Qwen3, Qwen3Config, init_cache

F32_TOL = 1e-5
BF16_TOL = 2e-2


def numpy_attention(q, k, v, visible):
    """Float64 loop: per (b, t, n) softmax over the visible slots; rows seeing nothing -> None.
    ``k``/``v`` are head-major ``[B, K, S, H]``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    G = N // k.shape[1]
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for t in range(T):
            vis = np.asarray(visible[b, t])
            for n in range(N):
                if not vis.any():
                    out[b, t, n] = np.nan
                    continue
                s = k[b, n // G, vis] @ q[b, t, n] / np.sqrt(H)
                p = np.exp(s - s.max())
                out[b, t, n] = (p / p.sum()) @ v[b, n // G, vis]
    return out


def random_qkv(B, T, S, N, K, H, seed=0, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, K, S, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, K, S, H), jnp.float32).astype(dtype)
    return q, k, v


def causal_left_padded(pads, T):
    """Un-cached visibility: causal and key is real; row b has ``pads[b]`` left pads."""
    mask = np.ones((len(pads), T), bool)
    for b, p in enumerate(pads):
        mask[b, :p] = False
    return jnp.asarray(np.tril(np.ones((T, T), bool))[None] & mask[:, None, :])


@pytest.mark.parametrize("N,K", [(4, 2), (8, 2), (4, 4)], ids=["gqa2", "gqa4", "mha"])
@pytest.mark.parametrize("impl", ["plain", "xla"])
def test_matches_numpy_reference_with_left_padding(impl, N, K):
    T = 7
    q, k, v = random_qkv(3, T, T, N, K, 16, seed=N + K)
    visible = causal_left_padded([0, 2, 5], T)
    got = np.asarray(attn.attention(q, k, v, visible, implementation=impl))
    ref = numpy_attention(q, k, v, np.asarray(visible))
    real = ~np.isnan(ref)
    assert real.sum() < real.size  # some query rows see nothing (left pads)
    np.testing.assert_allclose(got[real], ref[real], atol=F32_TOL, rtol=0)
    assert np.all(np.isfinite(got))


def test_rows_that_see_nothing_are_finite_and_zero_in_the_fused_path():
    q, k, v = random_qkv(2, 6, 6, 4, 2, 8, seed=3)
    visible = causal_left_padded([4, 0], 6)
    fused = np.asarray(attn.attention(q, k, v, visible, implementation="xla"))
    plain = np.asarray(attn.attention(q, k, v, visible, implementation="plain"))
    empty = ~np.asarray(visible).any(-1)
    assert empty.sum() == 4
    assert np.all(fused[empty] == 0)
    # the plain path averages every value there (uniform softmax over MASK_VALUE scores)
    np.testing.assert_allclose(plain[0, 0], np.asarray(v[0]).mean(1).repeat(2, 0), atol=1e-5)
    np.testing.assert_allclose(fused[~empty], plain[~empty], atol=F32_TOL, rtol=0)


def test_bf16_inputs_within_tolerance():
    q, k, v = random_qkv(2, 9, 9, 8, 2, 32, seed=5, dtype=jnp.bfloat16)
    visible = causal_left_padded([3, 0], 9)
    fused = attn.attention(q, k, v, visible, implementation="xla")
    plain = attn.attention(q, k, v, visible, implementation="plain")
    assert fused.dtype == plain.dtype == jnp.bfloat16
    ref = numpy_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                          v.astype(jnp.float32), np.asarray(visible))
    real = ~np.isnan(ref)
    for got in (fused, plain):
        np.testing.assert_allclose(np.asarray(got, np.float32)[real], ref[real],
                                   atol=BF16_TOL, rtol=0)


def test_cache_with_empty_slots_ignores_their_contents():
    """Decode-shaped call: 1 query per row over an 12-slot cache whose unfilled slots (and a
    left-padded prompt's pad slots) hold garbage; the result is that of the filled slots only."""
    B, S, N, K, H = 3, 12, 4, 2, 16
    q, k, v = random_qkv(B, 1, S, N, K, H, seed=7)
    slot = np.zeros((B, S), bool)
    slot[0, 2:9] = True  # 2 pad slots, 7 real, then empty
    slot[1, 0:9] = True
    slot[2, 8] = True  # a row whose only real token is the one being decoded
    visible = jnp.asarray(slot[:, None, :] & (np.arange(S) <= 8)[None, None, :])
    garbage = jnp.where(jnp.asarray(slot)[:, None, :, None], 0.0, 1e4)
    k_bad, v_bad = k + garbage, v - garbage
    ref = numpy_attention(q, k, v, np.asarray(visible))
    for impl in ("plain", "xla"):
        got = np.asarray(attn.attention(q, k_bad, v_bad, visible, implementation=impl))
        np.testing.assert_allclose(got, ref, atol=F32_TOL, rtol=0)


def test_gradients_finite_and_equal_on_real_rows():
    q, k, v = random_qkv(2, 6, 6, 4, 2, 8, seed=11)
    visible = causal_left_padded([3, 1], 6)
    real = jnp.any(visible, -1)[:, :, None, None]

    def loss(impl):
        def f(q, k, v):
            out = attn.attention(q, k, v, visible, implementation=impl)
            return jnp.sum(jnp.where(real, jnp.sin(out), 0.0))
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    for a, b in zip(loss("xla"), loss("plain")):
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def _model():
    return Qwen3(Qwen3Config.tiny(num_layers=1), dtype=jnp.float32)


def test_model_forward_and_cache_parity_under_the_setting():
    """The whole model, left-padded, un-cached and prefill + decode through the cache: the
    ``xla`` implementation gives the plain path's logits at every real position."""
    model = _model()
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 800, (2, 6)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)

    def run():  # a fresh jitted function per setting: the setting is read at trace time
        @nnx.jit
        def forward(model, ids, mask):
            full = model(ids, attention_mask=mask)
            cache = init_cache(model.config, 2, 9, jnp.float32)
            pre, cache = model(ids, attention_mask=mask, cache=cache)
            step, _ = model(jnp.asarray([[5], [6]], jnp.int32), cache=cache)
            return full, pre, step

        return tuple(np.asarray(x) for x in forward(model, ids, mask))

    attn.reset_choices()
    with attn.implementation("xla"):
        fused = run()
    assert attn.choices() == {"xla": 3}  # 1 layer x (forward, prefill, decode)
    with attn.implementation("plain"):
        plain = run()
    real = np.asarray(mask)
    for a, b in zip(fused[:2], plain[:2]):
        np.testing.assert_allclose(a[real], b[real], atol=1e-5, rtol=0)
        assert np.all(np.isfinite(a))
    np.testing.assert_allclose(fused[2], plain[2], atol=1e-5, rtol=0)


def test_auto_is_plain_off_gpu_and_cudnn_rules():
    q, k, v = random_qkv(1, 4, 4, 4, 2, 16)
    visible = causal_left_padded([0], 4)
    attn.reset_choices()
    with attn.implementation("auto"):
        out = attn.attention(q, k, v, visible)
    if jax.default_backend() != "gpu":
        assert attn.choices() == {"auto->plain": 1}
        np.testing.assert_array_equal(out, attn.plain_attention(q, k, v, visible))
    bf = jnp.zeros((2, 64, 32, 128), jnp.bfloat16)
    kv = jnp.zeros((2, 8, 64, 128), jnp.bfloat16)  # head-major [B, K, S, H]
    why = attn.cudnn_unsupported_reason
    assert why(bf, kv, backend="gpu") is None  # Qwen3-4B training shapes
    assert why(bf[:, :1], kv, backend="gpu", differentiable=False) is None  # a decode step
    assert "backend" in why(bf, kv, backend="cpu")
    assert "dtype" in why(bf.astype(jnp.float32), kv, backend="gpu")
    assert "head dim" in why(bf[..., :100], kv[..., :100], backend="gpu")
    # a call that may be differentiated needs even query and key lengths (cuDNN's backward
    # with a mask; JAX only checks while tracing the backward, too late for a fallback under
    # lax.scan / jax.checkpoint): the un-cached forward and the trainer's continuation
    assert "odd" in why(bf[:, :63], kv[:, :, :63], backend="gpu")
    assert "odd" in why(bf, kv[:, :, :63], backend="gpu")  # 64 queries over 63 keys
    assert "odd" in why(bf[:, :63], kv, backend="gpu")
    # a KV-cache write is never differentiated: odd lengths are fine
    assert why(bf[:, :63], kv, backend="gpu", differentiable=False) is None  # T - 1 columns
    assert why(bf[:, :63], kv[:, :, :63], backend="gpu", differentiable=False) is None


def test_auto_takes_the_plain_path_for_decode_steps():
    """One query per row (a decode step) reads the cache in place on every backend: "auto"
    never hands it to a fused kernel (which would want the cache copied into [B, S, K, H])."""
    q, k, v = random_qkv(2, 1, 12, 4, 2, 16, seed=4)
    visible = jnp.asarray(np.arange(12)[None, None, :] <= np.array([[[11]], [[7]]]))
    attn.reset_choices()
    with attn.implementation("auto"):
        out = attn.attention(q, k, v, visible)
    assert attn.choices() == {"auto->plain": 1}
    np.testing.assert_allclose(out, numpy_attention(q, k, v, np.asarray(visible)), atol=F32_TOL)


def test_switching_retraces_already_jitted_functions():
    """A jitted function traced under one setting uses the new kernel after a switch."""
    q, k, v = random_qkv(1, 3, 3, 4, 2, 8, seed=2)
    visible = causal_left_padded([1], 3)
    f = jax.jit(lambda q, k, v: attn.attention(q, k, v, visible))
    before = attn.set_implementation("plain")
    try:
        attn.reset_choices()
        f(q, k, v)
        f(q, k, v)  # cached: no new trace
        assert attn.choices() == {"plain": 1}
        attn.AttentionConfig("xla").apply()
        f(q, k, v)
        assert attn.choices() == {"plain": 1, "xla": 1}
    finally:
        attn.set_implementation(before)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attn.AttentionConfig("flashy")


def test_setting_validation_and_context_restores():
    before = attn.get_implementation()
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attn.set_implementation("flash")
    with attn.implementation("xla"):
        assert attn.get_implementation() == "xla"
    assert attn.get_implementation() == before
    if jax.default_backend() != "gpu":
        q, k, v = random_qkv(1, 2, 2, 2, 1, 8)
        with pytest.raises(ValueError, match="needs a GPU"):
            attn.attention(q, k, v, causal_left_padded([0], 2), implementation="cudnn")


def test_cache_and_own_attention_equals_attending_the_written_cache():
    """One query per row over a read-only cache plus its own key (the scanned decode step) is
    the float64 reference over the cache with that key written at its slot; a row whose own
    token is padding does not see it."""
    B, N, K, H, S, index = 3, 4, 2, 8, 9, 5
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, 1, N, H)).astype(np.float32)
    k, v = (rng.normal(size=(B, K, S, H)).astype(np.float32) for _ in range(2))
    k_own, v_own = (rng.normal(size=(B, K, 1, H)).astype(np.float32) for _ in range(2))
    slot_mask = np.broadcast_to(np.arange(S) < index, (B, S)).copy()
    slot_mask[1, :2] = False  # left padding
    own = np.array([True, True, False])  # row 2's token is padding
    k_w, v_w = k.copy(), v.copy()
    k_w[:, :, index], v_w[:, :, index] = k_own[:, :, 0], v_own[:, :, 0]
    visible_w = slot_mask.copy()
    visible_w[:, index] = own
    want = numpy_attention(q, k_w, v_w, visible_w[:, None, :])
    got = attn.cache_and_own_attention(q, k, v, slot_mask[:, None, :], k_own, v_own,
                                       own[:, None, None])  # fmt: skip
    np.testing.assert_allclose(got, want, atol=F32_TOL)
