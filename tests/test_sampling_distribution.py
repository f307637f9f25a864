"""Sampling maths: temperature / top-k / top-p against numpy and Hugging Face's warpers.

The chi-square tests draw 20 000 samples per configuration from fixed logits with a fixed seed
and reject at significance level 0.001 (so a correct sampler fails one configuration in a
thousand seeds; the seed is fixed, so the test is deterministic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sfjax.sampling import distribution as dist

ALPHA = 1e-3
LOGITS = np.array([2.1, -0.3, 1.4, 0.9, -1.7, 0.2, 1.8, -0.8, 0.5, 1.1, -2.5, 0.0], np.float32)


def reference_probs(logits, temperature, top_k, top_p):
    """Plain numpy transcription of the definition in the module docstring."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    k = len(z) if top_k <= 0 else min(top_k, len(z))
    kept_k = order[:k]
    q = np.exp(z[kept_k] - z[kept_k].max())
    q /= q.sum()
    mass_before = 0.0
    for idx, prob in zip(kept_k, q):
        if mass_before < top_p or top_p >= 1 or not keep.any():
            keep[idx] = True
        mass_before += prob
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    return p / p.sum()


CONFIGS = [
    (1.0, 0, 1.0),
    (0.7, 5, 1.0),
    (1.3, 0, 0.8),
    (1.0, 6, 0.7),
    (2.0, 3, 0.95),
]


def test_chi_square_per_row_parameters():
    """One batch mixing all configurations row-wise: each block matches its own distribution."""
    per = 20_000
    C = len(CONFIGS)
    logits_BV = jnp.tile(jnp.asarray(LOGITS)[None], (C * per, 1))
    temp = jnp.repeat(jnp.asarray([c[0] for c in CONFIGS], jnp.float32), per)
    top_k = jnp.repeat(jnp.asarray([c[1] for c in CONFIGS], jnp.int32), per)
    top_p = jnp.repeat(jnp.asarray([c[2] for c in CONFIGS], jnp.float32), per)
    tok, lp = jax.jit(dist.sample)(jax.random.key(0), logits_BV, temp, top_k, top_p)
    tok, lp = np.asarray(tok), np.asarray(lp)
    for c, (t, k, p) in enumerate(CONFIGS):
        ref = reference_probs(LOGITS, t, k, p)
        block = tok[c * per : (c + 1) * per]
        counts = np.bincount(block, minlength=len(LOGITS))
        assert counts[ref == 0].sum() == 0, f"filtered tokens were sampled for {CONFIGS[c]}"
        kept = ref > 0
        res = stats.chisquare(counts[kept], ref[kept] * per)
        assert res.pvalue > ALPHA, (CONFIGS[c], counts, ref * per, res.pvalue)
        # The reported log-probability is the one of the filtered distribution.
        np.testing.assert_allclose(lp[c * per : (c + 1) * per], np.log(ref[block]), atol=1e-5)


PARTIAL_CONFIGS = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 6, 0.7), (2.0, 3, 0.95), (0.0, 4, 0.5)]
"""Rows that all fit a partial selection of the 6 largest logits (unfiltered, k <= 6, greedy)."""


def test_chi_square_partial_selection_path():
    """top-k by ``lax.top_k`` of the 6 largest logits (no full sort), top-p within them: each
    block still matches the reference distribution."""
    per = 20_000
    C = len(PARTIAL_CONFIGS)
    temp, top_k, top_p = (jnp.repeat(jnp.asarray([c[i] for c in PARTIAL_CONFIGS]), per)
                          for i in range(3))  # fmt: skip
    top_k = top_k.astype(jnp.int32)
    assert bool(dist.partial_selection_fits(top_k, top_p, 6))
    assert not bool(dist.partial_selection_fits(top_k.at[0].set(7), top_p, 6))
    assert not bool(dist.partial_selection_fits(top_k.at[0].set(0), top_p.at[0].set(0.9), 6))
    logits_BV = jnp.tile(jnp.asarray(LOGITS)[None], (C * per, 1))
    fn = jax.jit(lambda *a: dist.sample(*a, max_k=6))
    tok, lp = (np.asarray(x) for x in fn(jax.random.key(5), logits_BV, temp, top_k, top_p))
    for c, (t, k, p) in enumerate(PARTIAL_CONFIGS):
        block = tok[c * per : (c + 1) * per]
        if t == 0:
            assert (block == np.argmax(LOGITS)).all()
            continue
        ref = reference_probs(LOGITS, t, k, p)
        counts = np.bincount(block, minlength=len(LOGITS))
        assert counts[ref == 0].sum() == 0, f"filtered tokens were sampled for {c}"
        res = stats.chisquare(counts[ref > 0], ref[ref > 0] * per)
        assert res.pvalue > ALPHA, (PARTIAL_CONFIGS[c], counts, ref * per, res.pvalue)
        np.testing.assert_allclose(lp[c * per : (c + 1) * per], np.log(ref[block]), atol=1e-5)


def test_sampling_distribution_matches_reference():
    for t, k, p in CONFIGS:
        got = dist.sampling_distribution(
            jnp.asarray(LOGITS)[None], jnp.asarray([t]), jnp.asarray([k]), jnp.asarray([p])
        )
        np.testing.assert_allclose(np.exp(np.asarray(got[0])), reference_probs(LOGITS, t, k, p),
                                   atol=1e-6)


@pytest.mark.parametrize("max_k", [0, 8])
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (4, 1.0), (7, 0.6), (1, 1.0), (0, 0.3)])
def test_filter_matches_hf_warpers(top_k, top_p, max_k):
    """The kept set equals transformers' TopK + TopP warpers (their order: k then p)."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((6, 50)).astype(np.float32) * 2
    scores = torch.tensor(logits)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    hf_keep = torch.isfinite(scores).numpy()
    ours = dist.filter_logits(
        jnp.asarray(logits), jnp.full((6,), top_k, jnp.int32), jnp.full((6,), top_p), max_k=max_k
    )  # max_k 8: rows with 0 < k <= 8 select the 8 largest of 50 logits instead of sorting
    np.testing.assert_array_equal(np.asarray(ours) > dist.NEG_INF / 2, hf_keep)


@pytest.mark.parametrize("max_k", [0, 16])
def test_ties_at_the_kth_logit_count_in_top_p_as_in_hf(max_k):
    """bf16 logits tie often. Hugging Face's top-k keeps every logit tied with the k-th, and its
    top-p renormalises over all of them; sfjax renormalised over the first k in sort order only,
    so top-p cut earlier: [2, 1.9, 1.8, 0, 0, 0], k=4, p=0.62 kept 2 tokens, HF 3. Where HF's
    top-p keeps whole tie groups the kept sets must be equal; where it splits one (by sort
    order) sfjax keeps that whole group."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    crafted = np.array([2.0, 1.9, 1.8, 0, 0, 0, -1, -2], np.float32)
    ours = dist.filter_logits(jnp.asarray(crafted)[None], jnp.asarray([4]),
                              jnp.asarray([0.62]), max_k=max_k)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(ours)[0] > dist.NEG_INF / 2, [1, 1, 1, 0, 0, 0, 0, 0])

    rng = np.random.default_rng(0)
    logits = (rng.integers(-6, 7, size=(400, 40)) / 2).astype(np.float32)  # many ties
    top_k = rng.choice([1, 2, 3, 5, 8, 12], size=400).astype(np.int32)
    top_p = rng.choice([0.3, 0.5, 0.62, 0.8, 0.9, 0.95], size=400).astype(np.float32)
    ours = np.asarray(dist.filter_logits(jnp.asarray(logits), jnp.asarray(top_k),
                                         jnp.asarray(top_p), max_k=max_k)) > dist.NEG_INF / 2
    compared = 0
    for r in range(400):
        scores = torch.tensor(logits[r])[None]
        scores = TopPLogitsWarper(float(top_p[r]))(None, TopKLogitsWarper(int(top_k[r]))(None, scores))
        hf = torch.isfinite(scores).numpy()[0]
        split = set(logits[r][hf]) & set(logits[r][~hf])  # a tie group HF cut through
        if not split:
            np.testing.assert_array_equal(ours[r], hf, err_msg=f"row {r}")
            compared += 1
        else:
            assert ours[r][hf].all() and (ours[r] == (hf | np.isin(logits[r], list(split)))).all()
    assert compared > 150  # rows whose HF result does not depend on its sort order


def test_greedy_rows_and_banned_tokens():
    logits = jnp.asarray(np.stack([LOGITS, LOGITS]))
    banned = logits.at[:, 0].set(dist.NEG_INF)  # the argmax is banned: next best is index 6
    tok, lp = dist.sample(
        jax.random.key(1), banned, jnp.asarray([0.0, 1e-8]), jnp.asarray([0, 3]),
        jnp.asarray([1.0, 0.5]),
    )
    assert tok.tolist() == [6, 6]
    assert float(lp[0]) == 0.0
    assert np.isfinite(np.asarray(lp)).all()


def test_token_logprob_is_raw_log_softmax():
    logits = jnp.asarray(LOGITS)[None]
    lp = dist.token_logprob(logits, jnp.asarray([3]))
    ref = LOGITS[3] - np.log(np.exp(LOGITS.astype(np.float64)).sum())
    np.testing.assert_allclose(float(lp[0]), ref, atol=1e-6)
