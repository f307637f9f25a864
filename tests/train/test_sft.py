"""Supervised fine-tuning: the loss against a plain full-logits reference, and training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sfjax.models import qwen3
from sfjax.tokenizer import load_tokenizer
from sfjax.train.data import KTOExample, tokenize_examples
from sfjax.train.sft import SFTConfig, _batch, sft_loss, train_sft

PAIRS = [
    ("State: arrivals 1.20 Mb/s. Decide.", "Reflection: load high, increase.\nAction: 7"),
    ("State: arrivals 0.10 Mb/s. Decide now please.", "Reflection: load low, decrease.\nAction: 2"),
    ("No previous steps yet.", "Reflection: load stable, keep.\nAction: 4"),
]


def _reference_nll(model, tokenized) -> float:
    """Mean completion-token NLL from the model's full logits, one unpadded row at a time."""
    total, count = 0.0, 0
    for t in tokenized:
        ids = np.asarray(t.prompt_ids + t.completion_ids)[None]
        logits = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.ones_like(ids, bool)))[0]
        logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
        P = len(t.prompt_ids)
        for j, tok in enumerate(t.completion_ids):
            total -= float(logp[P + j - 1, tok])
            count += 1
    return total / count


def test_sft_loss_matches_full_logits_reference(tiny_checkpoint):
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    tok = load_tokenizer(tiny_checkpoint)
    cfg = SFTConfig(batch_size=4, prompt_buckets=(64,), completion_buckets=(32,))
    tokenized = tokenize_examples([KTOExample(p, c, True) for p, c in PAIRS], tok,
                                  max_prompt_length=64, max_completion_length=32)
    batch = _batch(tokenized, np.arange(len(PAIRS)), cfg, int(tok.pad_token_id))
    loss, n = sft_loss(model, batch)
    assert int(n) == sum(len(t.completion_ids) for t in tokenized)
    np.testing.assert_allclose(float(loss), _reference_nll(model, tokenized), rtol=2e-5)


def test_train_sft_fits_and_compiles_once(tiny_checkpoint):
    from flax import nnx

    from sfjax.train.sft import make_sft_step

    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    tok = load_tokenizer(tiny_checkpoint)
    cfg = SFTConfig(steps=40, batch_size=3, learning_rate=1e-2, warmup_steps=2,
                    prompt_buckets=(64,), completion_buckets=(32,))
    losses = train_sft(model, tok, PAIRS, cfg)
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.3 * losses[0], losses
    step = make_sft_step(nnx.graphdef(model), cfg)
    assert len(step.trace_count) == 1  # one bucket pair: one compilation for 40 steps
