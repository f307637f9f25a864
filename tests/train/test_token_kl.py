"""KTOConfig.token_kl_coef: the per-token KL anchor to the reference (not in the paper or TRL).

Checked against a direct computation over the full logits of the model with its adapters on
(policy) and off (reference), float32, rtol 1e-4 / atol 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfjax.models import lora, qwen3
from sfjax.tokenizer import load_tokenizer
from sfjax.train import KTOConfig, KTOExample, KTOTrainer
from sfjax.train.data import TokenizedExample, collate_step
from sfjax.train.forward import (
    completion_states,
    scored_mask,
    shared_prompt_states,
    token_logps,
    token_logps_and_kl,
)


def _perturb(model, seed: int = 0, scale: float = 0.3):
    """Nonzero adapters (LoRA B starts at 0, where policy = reference)."""
    state = lora.lora_state(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def _direct_kl(model, ids, mask, comp, ref=None):
    """Summed per-token KL(model ‖ reference) at the positions predicting ``comp``; the
    reference is ``ref``, or ``model`` with its adapters off."""
    logp = jax.nn.log_softmax(model(ids, attention_mask=mask).astype(jnp.float32), axis=-1)
    if ref is None:
        with lora.adapters_disabled(model):
            logr = jax.nn.log_softmax(model(ids, attention_mask=mask).astype(jnp.float32), axis=-1)
    else:
        logr = jax.nn.log_softmax(ref(ids, attention_mask=mask).astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logr), axis=-1)[:, :-1]  # position t predicts t + 1
    return np.asarray(jnp.sum(jnp.where(comp[:, 1:], kl, 0.0), axis=-1))


def _batch():
    exs = [
        TokenizedExample((5, 6, 7), (8, 9), True),
        TokenizedExample((11,), (12, 13, 14, 15), False),
        TokenizedExample((), (16, 17, 18), True),  # empty prompt: first token unscored
        TokenizedExample(tuple(range(20, 29)), (30,), False),
    ]
    return collate_step(exs, [np.arange(4)], micro_batch_size=4, grad_accum_steps=1,
                        prompt_buckets=(16,), completion_buckets=(8,), pad_token_id=0,
                        with_kl=False)  # fmt: skip


@pytest.mark.parametrize("chunk", [0, 3])
def test_token_kl_equals_the_direct_computation(tiny_checkpoint_untied, chunk):
    """Summed token KL and log-probs, chunked or not, shared prompt pass or not; the LM head
    carries an adapter too, so the reference's must be switched off."""
    model = qwen3.from_pretrained(tiny_checkpoint_untied, dtype=jnp.float32)
    targets = ("q_proj", "v_proj", "down_proj", "lm_head")
    lora.apply_lora(model, lora.LoRAConfig(rank=4, target_modules=targets))
    _perturb(model)
    b = _batch()
    prompt = (b.prompt_ids_ABP[0], b.prompt_mask_ABP[0])
    comp = (b.completion_ids_ABC[0], b.completion_mask_ABC[0])
    ids, mask, comp_full = (x[0].copy() for x in b.full_rows())
    comp_full[2, 16] = False  # the empty prompt's first completion token has no predecessor
    want = _direct_kl(model, ids, mask, comp_full)
    assert want.min() > 1e-3  # the adapters moved every row
    scored = scored_mask(comp[1], prompt[1])
    ref = nnx.merge(*nnx.split(model))  # the same weights, another module object
    with lora.adapters_disabled(ref):
        ref_h = completion_states(ref, *prompt, *comp)
    for h in (completion_states(model, *prompt, *comp), shared_prompt_states(model, *prompt, [comp])[0]):
        logps, kl = token_logps_and_kl(model, h, ref, ref_h, comp[0], scored, chunk=chunk)
        np.testing.assert_allclose(np.asarray(kl), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(logps), np.asarray(token_logps(model, h, comp[0], scored)),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    with lora.adapters_disabled(model):  # the reference against itself
        _, zero = token_logps_and_kl(model, ref_h, ref, ref_h, comp[0], scored, chunk=chunk)
    np.testing.assert_allclose(np.asarray(zero), 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="another module object"):
        token_logps_and_kl(model, ref_h, model, ref_h, comp[0], scored, chunk=chunk)


def _dataset():
    return [KTOExample(f"state {i}: queue {7 * i % 50} Action:", " 12 PRBs" if i % 3 else " 3 PRBs",
                       i % 3 != 0) for i in range(16)]  # fmt: skip


def _trainer(tiny_checkpoint, **overrides):
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    cfg = dict(beta=0.5, epochs=1, micro_batch_size=4, learning_rate=1e-2, warmup_ratio=0.0,
               max_prompt_length=32, max_completion_length=8, progress=False, shuffle=False)  # fmt: skip
    cfg.update(overrides)
    trainer = KTOTrainer(model, load_tokenizer(tiny_checkpoint), KTOConfig(**cfg),
                         lora_config=lora.LoRAConfig(rank=8, alpha=16))  # fmt: skip
    return model, trainer


def _dataset_kl(model, trainer, exs, ref=None):
    """The direct summed token KL of each example's (tokenized, EOS-appended) completion."""
    tok = trainer.tokenize(exs)
    b = collate_step(tok, [np.arange(len(tok))], micro_batch_size=len(tok), grad_accum_steps=1,
                     prompt_buckets=(32,), completion_buckets=(16,), pad_token_id=0,
                     with_kl=False)  # fmt: skip
    ids, mask, comp = (x[0] for x in b.full_rows())
    return _direct_kl(model, ids, mask, comp, ref)


@pytest.mark.parametrize("share", [True, False])
def test_step_logs_the_token_kl_it_adds_and_the_anchor_holds(tiny_checkpoint, share):
    """The step's ``token_kl`` metric is the direct KL at the adapters it starts from; at LoRA's
    zero start it is 0 and the step equals the plain one; with the anchor the trained policy
    stays closer to the reference than without it."""
    exs = _dataset()
    plain_model, plain = _trainer(tiny_checkpoint, share_prompt_forward=share)
    model, anchored = _trainer(tiny_checkpoint, share_prompt_forward=share, token_kl_coef=10.0)
    h_plain = plain.train(exs, jax.random.key(0))
    h = anchored.train(exs, jax.random.key(0))
    assert "token_kl" not in h_plain[0] and h[0]["token_kl"] == pytest.approx(0.0, abs=1e-6)
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(h[0][name], h_plain[0][name], rtol=1e-5, atol=1e-7)
    # 0 at the zero start: differences of summed completion log-probs (tens of nats) whose
    # reference side comes from another forward in the anchored step, so float32 rounding
    # (~1e-6, seen on an AVX-512 CPU) is the tolerance, not a relative one
    for name in ("kl", "rewards/chosen"):
        np.testing.assert_allclose(h[0][name], h_plain[0][name], rtol=0, atol=1e-5)
    assert h[-1]["token_kl"] > 1e-4
    # the metric at the adapters a step starts from: the next call's first step (examples 0-3)
    start = _dataset_kl(model, anchored, exs[:4])
    again = anchored.train(exs, jax.random.key(1))
    np.testing.assert_allclose(again[0]["token_kl"], start.mean(), rtol=1e-4, atol=1e-6)
    kl_anchored = _dataset_kl(model, anchored, exs).mean()
    plain.train(exs, jax.random.key(1))
    kl_plain = _dataset_kl(plain_model, plain, exs).mean()
    assert kl_anchored < 0.5 * kl_plain, (kl_anchored, kl_plain)


def test_token_kl_coef_is_checked():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="token_kl_coef"):
            KTOConfig(token_kl_coef=bad)
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        KTOConfig(token_kl_coef=0.1, precompute_ref_log_probs=True)
    assert KTOConfig(token_kl_coef=0.1).token_kl_coef == 0.1


def test_anchor_to_a_reference_with_its_own_adapters(tiny_checkpoint):
    """With reference_lora in the step, the anchor measures the KL to that reference: zero at
    the start when the reference is the policy's own adapters, the direct KL when it is not."""
    exs = _dataset()
    model, trainer = _trainer(tiny_checkpoint, token_kl_coef=0.1)
    trainer.train(exs, jax.random.key(0))  # an iterate with nonzero adapters
    # a copy: nnx.state shares its Variables with the model, which trains on
    iterate = jax.tree.map(jnp.copy, nnx.state(model, nnx.LoRAParam))
    trainer.reference_lora = iterate
    h = trainer.train(exs, jax.random.key(1))
    assert h[0]["token_kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference at the start
    np.testing.assert_allclose(h[0]["rewards/chosen"], 0.0, atol=1e-5)
    assert h[-1]["token_kl"] > 1e-5
    # against a direct computation: KL(policy now ‖ the iterate) at the next call's first step
    ref = nnx.merge(*nnx.split(model))
    nnx.update(ref, iterate)
    want = _dataset_kl(model, trainer, exs[:4], ref).mean()
    again = trainer.train(exs, jax.random.key(2))
    np.testing.assert_allclose(again[0]["token_kl"], want, rtol=1e-4, atol=1e-6)
