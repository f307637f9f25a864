"""The jitted KV-cache sampler on a tiny random Qwen3, with Hugging Face transformers as reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfjax import testing
from sfjax.agents.prompts import PromptConfig, parse_output
from sfjax.models import lora, qwen3
from sfjax.sampling import ActionConstraint, Sampler, SamplingParams
from sfjax.tokenizer import load_tokenizer

PROMPTS = [
    "the network slice",
    "<|im_start|>user\nkeep the PRBs stable because the queue is low<|im_end|>\n",
    "increase the allocation of slice 0 when the delay budget of GBR users is violated and "
    "the spectral efficiency is high, otherwise keep it",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Tiny Qwen3 with larger random weights, so greedy text varies instead of repeating."""
    return testing.write_tiny_checkpoint(
        tmp_path_factory.mktemp("sampler_qwen3"), {"initializer_range": 0.2}, seed=3
    )


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def model(checkpoint):
    return qwen3.from_pretrained(checkpoint, dtype=jnp.float32)


@pytest.fixture(scope="module")
def sampler(model, tokenizer):
    return Sampler(model, tokenizer)


@pytest.fixture(scope="module")
def greedy(sampler):
    """Greedy reference completions of PROMPTS (24 tokens, EOS-only stops)."""
    return sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=24))


def hf_greedy(checkpoint, tokenizer, prompts, max_new_tokens, eos_ids):
    torch = pytest.importorskip("torch")
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False)
    with torch.no_grad():
        out = hf.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(eos_ids),
            pad_token_id=tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[:, enc["input_ids"].shape[1]:].numpy()
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).numpy()
    rows, lps = [], []
    for b in range(len(prompts)):
        toks = new[b].tolist()
        end = next((i + 1 for i, t in enumerate(toks) if t in eos_ids), len(toks))
        rows.append(toks[:end])
        lps.append([float(logp[b, i, t]) for i, t in enumerate(toks[:end])])
    return rows, lps


def test_greedy_matches_transformers_generate(checkpoint, tokenizer, sampler, greedy):
    """Left-padded batch of different prompt lengths, token for token, plus raw log-probs.

    An extra stop id (a token row 1 emits mid-way) makes that row stop while the others run on,
    with the same EOS set given to transformers.
    """
    extra = greedy.tokens[1][5]
    eos = set(sampler.eos_token_ids) | {extra}
    ref_tokens, ref_lps = hf_greedy(checkpoint, tokenizer, PROMPTS, 24, eos)
    out = sampler.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=(extra,))
    )
    assert out.tokens == ref_tokens
    for got, ref in zip(out.logprobs, ref_lps):
        np.testing.assert_allclose(got, ref, atol=2e-4)
    assert out.finish_reasons[1] == "stop" and len(out.tokens[1]) <= 6
    for r, toks in enumerate(out.tokens):
        assert out.finish_reasons[r] == ("stop" if toks[-1] in eos else "length")
    assert all(lp == 0.0 for row in out.sampling_logprobs for lp in row)


def test_stop_ids_and_strings_end_only_their_row(sampler, tokenizer, greedy):
    base = greedy
    # Row 0 meets EOS by itself: the EOS token is kept in tokens, not in the text.
    assert base.finish_reasons[0] == "stop" and base.tokens[0][-1] in sampler.eos_token_ids
    assert base.texts[0] == tokenizer.decode(base.tokens[0][:-1])
    assert base.finish_reasons[1:] == ["length", "length"]
    stop_id = base.tokens[1][6]
    k = base.tokens[1].index(stop_id)
    text2 = base.texts[2]
    start = next(i for i in range(6, len(text2) - 3) if "\ufffd" not in text2[i : i + 3])
    stop_str = text2[start : start + 3]
    params = [
        SamplingParams(temperature=0.0, max_new_tokens=24, stop=("never appears \x00",)),
        SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=(stop_id,)),
        SamplingParams(temperature=0.0, max_new_tokens=24, stop=(stop_str,)),
    ]
    out = sampler.generate(PROMPTS, params)
    assert out.tokens[0] == base.tokens[0] and out.finish_reasons[0] == "stop"
    # Row 1: ends at the stop token, which stays in tokens but not in the text.
    assert out.tokens[1] == base.tokens[1][: k + 1]
    assert out.finish_reasons[1] == "stop"
    assert out.texts[1] == tokenizer.decode(base.tokens[1][:k])
    assert out.logprobs[1] == base.logprobs[1][: k + 1]
    # Row 2: text cut right before the first occurrence of the stop string; tokens are the
    # longest prefix whose text stays before it.
    assert out.finish_reasons[2] == "stop"
    assert out.texts[2] == text2[: text2.find(stop_str)]
    n2 = len(out.tokens[2])
    assert out.tokens[2] == base.tokens[2][:n2]
    assert out.texts[2].startswith(tokenizer.decode(out.tokens[2]))
    assert not out.texts[2].startswith(tokenizer.decode(base.tokens[2][: n2 + 1]))
    assert len(out.logprobs[2]) == len(out.sampling_logprobs[2]) == n2


def test_per_row_max_new_tokens(sampler):
    params = [SamplingParams(temperature=0.0, max_new_tokens=m, ignore_eos=True) for m in (3, 24, 9)]
    out = sampler.generate(PROMPTS, params)
    assert [len(t) for t in out.tokens] == [3, 24, 9]
    assert out.finish_reasons == ["length"] * 3


def test_n_samples_share_prefill(sampler, model, greedy):
    out = sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=24), n=2)
    for i in range(3):
        assert out.tokens[2 * i] == greedy.tokens[i] == out.tokens[2 * i + 1]
    key = jax.random.key(7)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=24, ignore_eos=True)
    out = sampler.generate(PROMPTS, params, key, n=2)
    assert out.tokens[0] != out.tokens[1]
    assert out.tokens == sampler.generate(PROMPTS, params, key, n=2).tokens  # reproducible
    # Raw log-probs equal the uncached forward pass on prompt + completion (teacher forcing),
    # one left-padded batch.
    enc = sampler._encode(PROMPTS)
    seqs = [enc[r // 2] + out.tokens[r] for r in range(6)]
    T = max(len(q) for q in seqs)
    ids = np.zeros((6, T), np.int32)
    mask = np.zeros((6, T), bool)
    for r, q in enumerate(seqs):
        ids[r, T - len(q):], mask[r, T - len(q):] = q, True
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(ids), attention_mask=mask), -1))
    for r in range(6):
        first = T - len(out.tokens[r]) - 1
        ref = [logp[r, first + t, tok] for t, tok in enumerate(out.tokens[r])]
        np.testing.assert_allclose(out.logprobs[r], ref, atol=2e-4)
        assert all(s <= 1e-6 for s in out.sampling_logprobs[r])


def test_samples_depend_only_on_their_prompts_key(sampler):
    """Prompt i samples with fold_in(key, i) (or its own key): splitting a batch into calls, or
    reordering it, gives the same completions (what chunked RfR rollouts rely on)."""
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=24, ignore_eos=True)
    key = jax.random.key(7)
    together = sampler.generate(PROMPTS, params, key, n=2)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(3))
    alone = sampler.generate(PROMPTS[2:], params, keys[2:], n=2)
    assert alone.tokens == together.tokens[4:6]
    swapped = sampler.generate([PROMPTS[2], PROMPTS[0]], params, keys[jnp.array([2, 0])], n=2)
    assert swapped.tokens == together.tokens[4:6] + together.tokens[0:2]
    legacy = sampler.generate(PROMPTS, params, jax.random.PRNGKey(7), n=2)  # raw uint32 key
    assert legacy.tokens == together.tokens
    with pytest.raises(ValueError, match="one per prompt"):
        sampler.generate(PROMPTS, params, keys[:2])


@pytest.mark.parametrize("action_first", [False, True])
def test_constrained_action_always_valid(sampler, tokenizer, action_first):
    """>= 200 samples at temperature 1 from the random model: every output parses in range."""
    order = "action_first" if action_first else "reflection_first"
    prompts = [p for p in PROMPTS] + ["Action: "]
    key = jax.random.key(1 if action_first else 2)
    for lo, hi in [(0, 25), (3, 13), (1, 100)]:
        key, sub = jax.random.split(key)
        c = ActionConstraint(lo, hi, action_first=action_first, free_budget=None if lo else 12)
        params = SamplingParams(temperature=1.0, max_new_tokens=32, stop=("\n\n",))
        out = sampler.generate(prompts, params, sub, n=64, action_constraint=c)
        assert len(out.texts) == 256
        cfg = PromptConfig(action_lo=lo, action_hi=hi, field_order=order)
        for text, action in zip(out.texts, out.actions):
            parsed = parse_output(text, cfg)
            assert parsed.error is None, (parsed.error, text)
            assert parsed.action == action and lo <= action <= hi
            if action_first:
                assert text.startswith(f"Action: {action}\n")
        seen = {a for a in out.actions}
        assert len(seen) > 1  # sampled, not a constant


def test_no_retrace_within_bucket(checkpoint, tokenizer):
    """Varying prompts, batch, params, stops, constraint and weights within a bucket: 1 trace.

    The model carries LoRA adapters whose weights change between calls, as during KTO.
    """
    model = qwen3.from_pretrained(checkpoint, dtype=jnp.float32)
    lora.apply_lora(model, lora.LoRAConfig(rank=4, dropout=0.1), rngs=nnx.Rngs(1))
    model.train()  # the caller's mode must not leak dropout into sampling
    s = Sampler(model, tokenizer)
    key = jax.random.key(0)
    short = PROMPTS[:2] + ["a"]  # one prompt-length bucket (32)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=20)
    out1 = s.generate(short, greedy)
    s.generate(
        ["a", "b c", "the queue", PROMPTS[1]],
        SamplingParams(temperature=0.8, top_k=10, top_p=0.9, max_new_tokens=32, stop=("ab",)),
        key,
    )
    s.generate(
        [[1, 2, 3]] * 3,
        SamplingParams(temperature=1.3, max_new_tokens=17, stop_token_ids=(5, 6)),
        key,
        action_constraint=ActionConstraint(2, 40),
    )
    # A LoRA update (as between KTO steps) changes the output without recompiling.
    for _, module in lora.lora_modules(model):
        module.lora_b[...] = jnp.full(module.lora_b.shape, 0.5)
    out2 = s.generate(short, greedy)
    assert out2.tokens != out1.tokens
    assert s.num_traces == 1
    with lora.adapters_disabled(model):  # the KTO reference policy: the base model again
        assert s.generate(short, greedy).tokens == out1.tokens
    assert s.num_traces == 2  # the adapter switch is static structure
    s.generate(short * 2, greedy)  # batch 6 -> bucket 8
    assert s.num_traces == 3


def test_user_errors_are_explained(sampler):
    with pytest.raises(ValueError, match="needs a key"):
        sampler.generate(PROMPTS, SamplingParams(temperature=0.5))
    with pytest.raises(ValueError, match="no room for the action line"):
        sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=4),
                         action_constraint=ActionConstraint(0, 100))
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate(["", "x"], SamplingParams(temperature=0.0))
    with pytest.raises(ValueError, match="one per prompt"):
        sampler.generate(PROMPTS, [SamplingParams()], jax.random.key(0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10**6))


def test_prompt_buckets_step_by_512_above_512():
    from sfjax.sampling.sampler import _prompt_bucket

    assert [_prompt_bucket(n, 32) for n in (1, 33, 500, 512)] == [32, 64, 512, 512]
    assert [_prompt_bucket(n, 32) for n in (513, 1100, 2208, 4096)] == [1024, 1536, 2560, 4096]


def test_long_prompt_output_does_not_depend_on_its_bucket(model, tokenizer):
    """A 1100-token prompt in the 1536 bucket gives the same greedy tokens and log-probs as in
    the 2048 bucket (power-of-two padding): padding never leaks into the result."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 800, size=1100).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    stepped = Sampler(model, tokenizer).generate([ids], params, jax.random.key(0))
    padded = Sampler(model, tokenizer, min_prompt_bucket=2048).generate(
        [ids], params, jax.random.key(0)
    )
    assert stepped.tokens == padded.tokens
    np.testing.assert_allclose(stepped.logprobs[0], padded.logprobs[0], rtol=0, atol=1e-4)
