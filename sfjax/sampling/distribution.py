"""The next-token distribution of the sampler: temperature, top-k, top-p, greedy; pure functions.

Every parameter is a per-row traced array, so a batch can mix greedy rows with sampled rows and
changing a value never recompiles. With logits ``z``, temperature ``τ``, the filtered
distribution is

    p_τ(v) ∝ exp(z_v / τ)                                       (temperature)
    keep_k = {v : z_v >= z_(k)}           (k = 0: keep all)      (top-k; z_(k) the k-th largest)
    q(v)   = p_τ(v) / Σ_{u∈keep_k} p_τ(u) on keep_k              (renormalised)
    keep_p = {v ∈ keep_k : Σ_{u ranked before v} q(u) < p}       (top-p / nucleus; top-1 always)
    π(v)   ∝ p_τ(v) on keep_p, 0 elsewhere

(the order of Hugging Face's warpers and vLLM: temperature, then top-k, then top-p on the
top-k-renormalised distribution). ``τ = 0`` is greedy: ``argmax z`` with log-probability 0.

``k`` is a traced value: top-k is a rank mask over the logits sorted descending. When every row's
``k`` is at most :data:`TOP_K_BOUND` only that many largest logits are selected (``lax.top_k``,
static size) and top-p runs within them; otherwise the whole vocabulary is sorted. Both filters
become one threshold on the sorted logits; tokens tied with the threshold logit are all kept (as
in Hugging Face's top-k; its top-p splits a tie group by sort order, which has no meaning). Ties
with the k-th logit are in ``keep_k``, so they count in the mass top-p renormalises, as in Hugging
Face (the partial selection sees ties only among its ``TOP_K_BOUND`` largest logits).

Shape legend: B = batch rows, V = vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30
"""Logit of a banned token; finite so that a fully banned row still gives finite maths."""


def scaled_logits(logits_BV: jax.Array, temperature_B: jax.Array) -> jax.Array:
    """``z / τ`` per row; greedy rows (``τ = 0``) are left unscaled (their scale is irrelevant)."""
    # Clamped so that banned logits (NEG_INF) stay finite at tiny temperatures.
    t_B = jnp.where(temperature_B > 0, jnp.maximum(temperature_B, 1e-6), 1.0).astype(jnp.float32)
    return logits_BV.astype(jnp.float32) / t_B[:, None]


TOP_K_BOUND = 64
"""Largest ``top_k`` served by the partial selection (``lax.top_k`` of this many logits); a row
with a larger ``k``, or with top-p but no top-k, takes the full sort."""


def _threshold(sorted_BK, top_k_B, top_p_B):
    """The smallest kept logit of top-k ∩ top-p, from the row's logits sorted descending (the
    whole vocabulary, or its ``K >= k`` largest when every filtering row has ``k <= K``)."""
    K = sorted_BK.shape[-1]
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, K), K)
    # Every logit tied with the k-th is in top-k (Hugging Face's `scores < kth` removal), and so
    # in the distribution top-p renormalises, not only the first k in sort order.
    kth_B1 = jnp.take_along_axis(sorted_BK, (k_B - 1)[:, None], axis=-1)
    in_k_BK = sorted_BK >= kth_B1
    probs_BK = jax.nn.softmax(jnp.where(in_k_BK, sorted_BK, NEG_INF), axis=-1)
    mass_before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
    in_p_BK = (mass_before_BK < top_p_B[:, None]) | (top_p_B[:, None] >= 1.0)
    keep_BK = (in_k_BK & in_p_BK).at[:, 0].set(True)
    n_keep_B = keep_BK.sum(axis=-1)
    return jnp.take_along_axis(sorted_BK, (n_keep_B - 1)[:, None], axis=-1)


def partial_selection_fits(top_k_B, top_p_B, max_k: int = TOP_K_BOUND) -> jax.Array:
    """Whether :func:`filter_logits` can select the ``max_k`` largest logits instead of sorting:
    every row filters nothing or keeps at most ``max_k`` tokens by top-k."""
    filters_B = (top_k_B > 0) | (top_p_B < 1.0)
    return jnp.all(~filters_B | ((top_k_B > 0) & (top_k_B <= max_k)))


def filter_logits(
    logits_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array, *, max_k: int = TOP_K_BOUND
) -> jax.Array:
    """Temperature-scaled logits with tokens outside top-k ∩ top-p set to :data:`NEG_INF`.

    When every row either filters nothing or has ``0 < k <= max_k`` (the Actor: k = 20), only
    the ``max_k`` largest logits are selected (``lax.top_k``) and top-p runs within them: the
    first ``max_k`` entries of the full descending sort, hence the same threshold and the same
    distribution, without sorting all ``V`` logits per step. Otherwise (``lax.cond``, decided
    per call) the full sort.

    Args:
      logits_BV: float logits, already temperature-scaled (banned tokens may be ``NEG_INF``).
      top_k_B: int, number of highest tokens kept; ``<= 0`` keeps all.
      top_p_B: float in (0, 1]; nucleus mass; ``>= 1`` keeps all.
      max_k: static bound of the partial selection (0: always the full sort).
    """
    V = logits_BV.shape[-1]
    filters_B = (top_k_B > 0) | (top_p_B < 1.0)

    def full(z_BV):
        return _threshold(-jnp.sort(-z_BV, axis=-1), top_k_B, top_p_B)

    def partial(z_BV):
        top_BK, _ = jax.lax.top_k(z_BV, max_k)
        return _threshold(top_BK, top_k_B, top_p_B)

    if 0 < max_k < V:
        fits = partial_selection_fits(top_k_B, top_p_B, max_k)
        threshold_B = jax.lax.cond(fits, partial, full, logits_BV)
    else:
        threshold_B = full(logits_BV)
    threshold_B = jnp.where(filters_B[:, None], threshold_B, NEG_INF)
    return jnp.where(logits_BV >= threshold_B, logits_BV, NEG_INF)


def sampling_distribution(
    logits_BV: jax.Array,
    temperature_B: jax.Array,
    top_k_B: jax.Array,
    top_p_B: jax.Array,
    *,
    max_k: int = TOP_K_BOUND,
) -> jax.Array:
    """Log-probabilities ``log π`` of the filtered sampling distribution (greedy rows: one-hot)."""
    z_BV = scaled_logits(logits_BV, temperature_B)
    logp_BV = jax.nn.log_softmax(filter_logits(z_BV, top_k_B, top_p_B, max_k=max_k), axis=-1)
    greedy_BV = jnp.where(
        jnp.arange(z_BV.shape[-1])[None, :] == jnp.argmax(z_BV, axis=-1)[:, None], 0.0, NEG_INF
    )
    return jnp.where((temperature_B > 0)[:, None], logp_BV, greedy_BV)


def row_keys(key: jax.Array, rows: int) -> jax.Array:
    """One key per row: ``key`` itself if it already holds ``rows`` keys, else
    ``fold_in(key, r)`` for row ``r`` (a row's draw never depends on how many rows there are)."""
    if key.ndim == 1:
        if key.shape[0] != rows:
            raise ValueError(f"got {key.shape[0]} keys for {rows} rows")
        return key
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(rows))


def sample(
    key: jax.Array,
    logits_BV: jax.Array,
    temperature_B: jax.Array,
    top_k_B: jax.Array,
    top_p_B: jax.Array,
    *,
    max_k: int = TOP_K_BOUND,
) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row from π; returns ``(token_B, log π(token)_B)``.

    ``key`` is one typed key, or one per row (``[B]``); each row draws with its own key
    (:func:`row_keys`), so a row's sample does not depend on the other rows of the batch.

    Greedy rows take ``argmax`` (first index on ties, like ``torch.argmax``) with log-prob 0.
    ``max_k``: see :func:`filter_logits`. The selection behind top-k/top-p runs only when some row asks for it (``lax.cond``), and the
    whole categorical draw is skipped when every row is greedy, so plain greedy decoding costs
    one argmax per step.
    """
    z_BV = scaled_logits(logits_BV, temperature_B)
    greedy_B = jnp.argmax(z_BV, axis=-1).astype(jnp.int32)
    needs_filter = jnp.any(((top_k_B > 0) | (top_p_B < 1.0)) & (temperature_B > 0))

    def draw(_):
        filtered_BV = jax.lax.cond(
            needs_filter,
            lambda z: filter_logits(z, top_k_B, top_p_B, max_k=max_k),
            lambda z: z,
            z_BV,
        )
        logp_BV = jax.nn.log_softmax(filtered_BV, axis=-1)
        keys_B = row_keys(key, filtered_BV.shape[0])
        tok_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BV).astype(jnp.int32)
        tok_B = jnp.where(temperature_B > 0, tok_B, greedy_B)
        lp_B = jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]
        return tok_B, jnp.where(temperature_B > 0, lp_B, 0.0)

    def argmax(_):
        return greedy_B, jnp.zeros(greedy_B.shape, jnp.float32)

    return jax.lax.cond(jnp.any(temperature_B > 0), draw, argmax, None)


def token_logprob(logits_BV: jax.Array, token_B: jax.Array) -> jax.Array:
    """``log softmax(z)[token]`` of the raw model at temperature 1 (what KTO/RfR score)."""
    logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
