"""Prompt-prefix KV-cache reuse: same completions as prefilling the whole prompt, fewer tokens."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfjax import testing
from sfjax.models import qwen3
from sfjax.sampling import ActionConstraint, Sampler, SamplingParams
from sfjax.sampling.prefix import (
    MAX_EXTRA_SLOTS,
    PrefixCache,
    common_prefix_len,
    shared_prefix_len,
)
from sfjax.sampling.sampler import cache_slots
from sfjax.tokenizer import load_tokenizer

rng = np.random.default_rng(0)
SYSTEM = rng.integers(0, 800, 150).tolist()  # shared by every prompt ("system prompt")
HISTORIES = [rng.integers(0, 800, k).tolist() for k in (40, 7, 65, 23)]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return testing.write_tiny_checkpoint(
        tmp_path_factory.mktemp("prefix_qwen3"), {"initializer_range": 0.2}, seed=5
    )


@pytest.fixture(scope="module")
def model(checkpoint):
    return qwen3.from_pretrained(checkpoint, dtype=jnp.float32)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def plain(model, tokenizer):
    return Sampler(model, tokenizer)


def cached_sampler(model, tokenizer):
    return Sampler(model, tokenizer, prefix_cache=True, prefix_min_tokens=32)


def assert_same(a, b):
    assert a.tokens == b.tokens
    for x, y in zip(a.logprobs, b.logprobs):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=0)


def test_prefix_helpers():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0
    assert shared_prefix_len([[1, 2, 3], [1, 2, 9], [1, 7]]) == 1


def test_batch_shares_one_prefix_and_matches_full_prefill(model, tokenizer, plain):
    cached = cached_sampler(model, tokenizer)
    prompts = [SYSTEM + h for h in HISTORIES]
    ref = plain.generate(prompts, GREEDY)
    out = cached.generate(prompts, GREEDY)
    assert_same(ref, out)
    entry = cached.prefix_cache.entry
    assert entry.tokens == tuple(SYSTEM)  # the 4 histories differ from their first token
    assert cached.prefix_cache.num_builds == 1
    # Next decision: new histories, same system prompt -> no new prefix, same results.
    prompts2 = [SYSTEM + h[::-1] + [5] for h in HISTORIES]
    assert_same(plain.generate(prompts2, GREEDY), cached.generate(prompts2, GREEDY))
    assert cached.prefix_cache.num_builds == 1


def test_n_samples_and_constraint_with_prefix(model, tokenizer, plain):
    cached = cached_sampler(model, tokenizer)
    prompts = [SYSTEM + h for h in HISTORIES]
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    c = ActionConstraint(lo=1, hi=24)
    key = jax.random.key(3)
    ref = plain.generate(prompts, params, key, n=2, action_constraint=c)
    out = cached.generate(prompts, params, key, n=2, action_constraint=c)
    assert cached.prefix_cache.num_builds == 1
    assert all(a is not None and 1 <= a <= 24 for a in out.actions)
    # Same key, same distribution: the draws agree unless a float tie flips one token.
    same = sum(a == b for a, b in zip(ref.tokens, out.tokens))
    assert same >= len(ref.tokens) - 1


@pytest.fixture(scope="module")
def prefixes(model, tokenizer):
    """A PrefixCache driven directly through ``plan`` (no decode program to compile)."""
    return PrefixCache(model.config, jnp.float32, 0, min_tokens=32)


def test_single_prompt_sequence_settles_on_the_shared_part(model, prefixes):
    """One env: the first call caches its whole prompt, the next cuts it to the shared part and
    recomputes it compactly once; later calls reuse it."""
    prefixes.clear()
    graphdef, state = nnx.split(model)
    first = SYSTEM + rng.integers(0, 800, 200).tolist()  # 350 tokens
    e1 = prefixes.plan([first], graphdef, state)
    assert e1.tokens == tuple(first[:-1]) and e1.slots == 384
    e2 = prefixes.plan([SYSTEM + HISTORIES[0]], graphdef, state)
    assert e2.tokens == tuple(SYSTEM) and e2.slots == 256
    # Causal attention: the compact prefix's keys/values are the first one's first slots.
    for a, b in zip(e2.k_LyP + e2.v_LyP, e1.k_LyP + e1.v_LyP):  # per layer [1, K, P, H]
        np.testing.assert_allclose(a[:, :, :150], b[:, :, :150], atol=1e-5)
    builds = prefixes.num_builds
    e3 = prefixes.plan([SYSTEM + h for h in HISTORIES], graphdef, state)
    assert e3 is e2 and prefixes.num_builds == builds
    # A shorter shared part inside the same slot bucket is used without recomputing.
    e4 = prefixes.plan([SYSTEM[:140] + [1] * 20], graphdef, state)
    assert e4.tokens == tuple(SYSTEM[:140]) and prefixes.num_builds == builds


def test_weight_update_invalidates_the_prefix(model, prefixes):
    prefixes.clear()
    graphdef, state = nnx.split(model)
    prompts = [SYSTEM + h for h in HISTORIES[:2]]
    e1 = prefixes.plan(prompts, graphdef, state)
    builds, programs = prefixes.num_builds, prefixes._program._cache_size()
    assert prefixes.plan(prompts, graphdef, state) is e1  # same arrays: reused
    state2 = jax.tree.map(lambda x: x * 1.5, state)  # new arrays, like an optimizer update
    e2 = prefixes.plan(prompts, graphdef, state2)
    assert prefixes.num_builds == builds + 1 and e2 is not e1
    assert not np.allclose(np.stack(e2.k_LyP)[..., :150, :], np.stack(e1.k_LyP)[..., :150, :])
    assert prefixes._program._cache_size() == programs  # weights are arguments: no retrace


def test_short_or_unshared_prompts_skip_the_prefix(model, prefixes):
    prefixes.clear()
    graphdef, state = nnx.split(model)
    assert prefixes.plan([SYSTEM[:20], SYSTEM[:32]], graphdef, state) is None  # < 32 + 1
    assert prefixes.plan([SYSTEM + [1], HISTORIES[2] + SYSTEM], graphdef, state) is None
    assert prefixes.entry is None
    prefixes.plan([SYSTEM + [1], SYSTEM + [2]], graphdef, state)
    assert prefixes.entry is not None
    prefixes.clear()
    assert prefixes.entry is None


def test_cache_slots_is_what_a_call_allocates(plain):
    """``cache_slots`` (the memory planners' source of the bucket rules) = the call's cache."""
    prompts = [SYSTEM + h for h in HISTORIES]
    plain.generate(prompts, GREEDY)
    longest = max(len(p) for p in prompts)
    assert (4, cache_slots(longest, GREEDY.max_new_tokens)) in plain._caches


def test_a_cached_prefix_adds_at_most_max_extra_slots():
    """Prefix bucket + suffix bucket - whole-prompt bucket <= MAX_EXTRA_SLOTS, for every prompt
    length < 6k and every prefix length the cache may choose (>= 1 suffix token)."""
    cache = PrefixCache(qwen3.Qwen3Config.tiny(), jnp.float32, 0, min_tokens=1)
    worst = 0
    for total in range(2, 6000):
        whole = cache_slots(total, 1)  # the new-token bucket cancels out below
        for prefix in range(1, total, 1 if total < 700 else 7):
            extra = cache.bucket(prefix) + cache_slots(total - prefix, 1) - whole
            worst = max(worst, extra)
    assert worst <= MAX_EXTRA_SLOTS


@pytest.mark.parametrize("scan_decode", [False, True])
def test_scanned_model_samples_like_the_unrolled_one(checkpoint, tokenizer, plain, scan_decode):
    """``scan_layers`` (scanned prefill and prefix; decode over parameter slices, or a scan
    over a stacked cache with ``scan_decode``): the same greedy tokens and log-probs as the
    unrolled model, with and without the prefix cache, and the same sampled tokens (top-k 20 /
    top-p 0.8, the Actor's settings; n = 2 samples per prompt) from one key."""
    scanned = qwen3.from_pretrained(checkpoint, dtype=jnp.float32, scan_layers=True)
    scanned.config = dataclasses.replace(scanned.config, scan_decode=scan_decode)
    prompts = [SYSTEM + h for h in HISTORIES[:2]]
    want = plain.generate(prompts, GREEDY)
    sampler = Sampler(scanned, tokenizer)
    assert_same(sampler.generate(prompts, GREEDY), want)
    cached = cached_sampler(scanned, tokenizer)
    assert_same(cached.generate(prompts, GREEDY), want)
    assert cached.prefix_cache.num_builds == 1
    actor = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, max_new_tokens=12, ignore_eos=True)
    key = jax.random.key(3)
    assert sampler.generate(prompts, actor, key).tokens == plain.generate(prompts, actor, key).tokens
    assert (sampler.generate(prompts, actor, key, n=2).tokens
            == plain.generate(prompts, actor, key, n=2).tokens)  # fmt: skip


def test_switching_adapters_off_invalidates_the_prefix(checkpoint, tokenizer):
    """``lora.adapters_disabled`` keeps every weight array but changes the function (the graph):
    a prefix cached with the adapters on must not serve the base model (it did: the stale
    keys/values gave the adapted model's tokens)."""
    from sfjax.models import lora

    model = qwen3.from_pretrained(checkpoint, dtype=jnp.float32)
    lora.apply_lora(model, lora.LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    for _, module in lora.lora_modules(model):
        module.lora_b[...] = jnp.full(module.lora_b.shape, 0.5)
    prompts = [SYSTEM + h for h in HISTORIES[:2]]
    cached = cached_sampler(model, tokenizer)
    adapted = cached.generate(prompts, GREEDY)
    with lora.adapters_disabled(model):
        ref = Sampler(model, tokenizer).generate(prompts, GREEDY)
        assert ref.tokens != adapted.tokens
        assert_same(ref, cached.generate(prompts, GREEDY))
    assert_same(adapted, cached.generate(prompts, GREEDY))
    assert cached.prefix_cache.num_builds == 3
