"""The trainer's forward (sfjax.train.forward) against the model's own forward: shared prompt
prefix, per-layer remat and the chunked LM head give the same log-probs and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_calls import record_attention_calls
from flax import nnx

from sfjax.losses.kto import completion_logps
from sfjax.models import lora, qwen3
from sfjax.train import forward as F
from sfjax.train.data import TokenizedExample, collate_step


def _model(ckpt):
    model = qwen3.from_pretrained(ckpt, dtype=jnp.float32)
    lora.apply_lora(model, lora.LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    for _, m in lora.lora_modules(model):  # non-zero B: the adapters change the forward
        m.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(2), m.lora_b[...].shape)
    return model


def _rows(prompt_bucket=12, completion_bucket=6):
    exs = [
        TokenizedExample((5, 6, 7), (8, 9), True),
        TokenizedExample((11,), (12, 13, 14, 15), False),
        TokenizedExample((), (16, 17, 18), True),  # empty prompt: first token unscored
        TokenizedExample(tuple(range(20, 29)), (30,), False),
    ]
    b = collate_step(exs, [np.arange(4)], micro_batch_size=4, grad_accum_steps=1,
                     prompt_buckets=(prompt_bucket,), completion_buckets=(completion_bucket,),
                     pad_token_id=0,
                     with_kl=True)  # fmt: skip
    return b, tuple(x[0] for x in (b.prompt_ids_ABP, b.prompt_mask_ABP, b.completion_ids_ABC,
                                   b.completion_mask_ABC))  # fmt: skip


def test_decoder_states_and_chunked_head_equal_the_model(tiny_checkpoint):
    model = _model(tiny_checkpoint)
    batch, rows = _rows()
    ids, mask, comp = (x[0].copy() for x in batch.full_rows())
    np.testing.assert_allclose(
        np.asarray(F.decoder_states(model, ids, mask)),
        np.asarray(model.hidden_states(ids, attention_mask=mask)), atol=1e-5,
    )  # fmt: skip
    comp[2, 12] = False  # the empty prompt's first completion token has no predecessor
    want = np.asarray(completion_logps(model(ids, attention_mask=mask), ids, comp))
    for chunk in (0, 5, 24):  # 24 rows: uneven and exact chunks; 0 = one chunk here
        got = F.sequence_logps(model, *rows, chunk=chunk)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4, err_msg=str(chunk))
    assert F.chunk_tokens(151936) == 110 and F.chunk_tokens(1024) == 16384
    assert F.chunk_tokens(151936, 32) == 32


def test_prefix_continuation_remat_and_chunks_match_in_value_and_gradient(tiny_checkpoint):
    model = _model(tiny_checkpoint)
    batch, rows = _rows()
    kl = (batch.kl_completion_ids_ABC[0], batch.kl_completion_mask_ABC[0])
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(params, *, shared, remat, chunk):
        m = nnx.merge(graphdef, params, rest)
        if shared:
            a, b = F.shared_prompt_logps(m, rows[0], rows[1], [rows[2:], kl], remat=remat,
                                         chunk=chunk)  # fmt: skip
        else:
            a = F.sequence_logps(m, *rows, remat=remat, chunk=chunk)
            b = F.sequence_logps(m, rows[0], rows[1], *kl, remat=remat, chunk=chunk)
        return jnp.sum(a * jnp.array([1.0, -2.0, 0.5, 3.0])) + 0.1 * jnp.sum(b), (a, b)

    results = {}
    for shared, remat, chunk in ((False, False, 0), (True, True, 3)):
        fn = jax.jit(jax.value_and_grad(
            lambda p, s=shared, r=remat, c=chunk: loss(p, shared=s, remat=r, chunk=c),
            has_aux=True))  # fmt: skip
        results[shared, remat, chunk] = fn(params)
    (_, (a0, b0)), g0 = results[False, False, 0]
    for key, ((_, (a, b)), g) in results.items():
        np.testing.assert_allclose(np.asarray(a), np.asarray(a0), rtol=1e-5, atol=1e-4, err_msg=str(key))
        np.testing.assert_allclose(np.asarray(b), np.asarray(b0), rtol=1e-5, atol=1e-4, err_msg=str(key))
        for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5,
                                       err_msg=str(key))  # fmt: skip
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) > 1e-3  # a real gradient

    # A no-gradient model for the later completions: same values, and no gradient through them.
    def kl_only(params):
        m = nnx.merge(graphdef, params, rest)
        ng = nnx.merge(graphdef, jax.lax.stop_gradient(params), rest)
        _, b = F.shared_prompt_logps(m, rows[0], rows[1], [rows[2:], kl], nograd_model=ng)
        return jnp.sum(b), b

    (_, b), g = jax.jit(jax.value_and_grad(kl_only, has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(b), np.asarray(b0), rtol=1e-5, atol=1e-4)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))


@pytest.mark.parametrize("buckets", [(12, 6), (11, 5)])
def test_shared_prompt_attention_lengths_are_even(tiny_checkpoint, monkeypatch, buckets):
    """Every attention call of the shared-prompt passes that may be differentiated has even
    query and key lengths (cuDNN's backward refuses odd ones, and under lax.scan / remat too
    late to fall back), whatever the buckets' parity; the padding changes no value or
    gradient (against the unshared forward)."""
    seen = record_attention_calls(monkeypatch)
    model = _model(tiny_checkpoint)
    batch, rows = _rows(*buckets)
    kl = (batch.kl_completion_ids_ABC[0], batch.kl_completion_mask_ABC[0])
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(params, shared):
        m = nnx.merge(graphdef, params, rest)
        if shared:
            a, b = F.shared_prompt_logps(m, rows[0], rows[1], [rows[2:], kl])
        else:
            a = F.sequence_logps(m, *rows)
            b = F.sequence_logps(m, rows[0], rows[1], *kl)
        return jnp.sum(a * jnp.array([1.0, -2.0, 0.5, 3.0])) + 0.1 * jnp.sum(b), (a, b)

    # jitted: the recording happens while tracing, and the run is seconds, not eager minutes
    unshared = jax.jit(jax.value_and_grad(lambda p: loss(p, False), has_aux=True))
    (_, (a0, b0)), g0 = unshared(params)
    seen.clear()
    (_, (a, b)), g = jax.jit(jax.value_and_grad(lambda p: loss(p, True), has_aux=True))(params)
    assert seen and all(d and T % 2 == 0 and S % 2 == 0 for T, S, d in seen), seen
    np.testing.assert_allclose(np.asarray(a), np.asarray(a0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(b), np.asarray(b0), rtol=1e-5, atol=1e-4)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_chunked_head_never_holds_the_full_logits(tiny_checkpoint):
    """Compiled memory (XLA's own analysis) of value_and_grad over the completion log-probs:
    8-token chunks save at least one whole [B, C, V] float32 logits array of temporaries."""
    model = _model(tiny_checkpoint)
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    B, P, C = 4, 8, 64
    rng = np.random.default_rng(0)
    rows = (rng.integers(0, 800, (B, P)), np.ones((B, P), bool), rng.integers(0, 800, (B, C)),
            np.ones((B, C), bool))  # fmt: skip
    logits_bytes = B * C * model.config.vocab_size * 4

    def temp_bytes(chunk):
        fn = jax.jit(jax.value_and_grad(
            lambda p: jnp.sum(F.sequence_logps(nnx.merge(graphdef, p, rest), *rows, chunk=chunk))))
        return fn.lower(params).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(0), temp_bytes(8)
    assert full > logits_bytes  # the plain path holds the logits (and their gradient)
    assert full - chunked >= logits_bytes, (chunked, full, logits_bytes)
