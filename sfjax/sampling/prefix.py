"""Prompt-prefix KV-cache reuse across sampler calls (the Actor's system prompt).

Consecutive Actor prompts share their beginning: the chat template and the system prompt (and,
for a batch of parallel environments, everything up to where the histories differ). Recomputing
that prefix on every decision is wasted prefill: at Qwen3-4B scale it is a large part of the time
to the action (issue 11). :class:`PrefixCache` keeps the keys/values of one token prefix, computed
by a small jitted prefill program, and tells the sampler how many leading tokens of the current
prompts it may take from the cache instead of recomputing them.

Policy (host side, :meth:`PrefixCache.plan`):

1. If a prefix is cached (and the model's weights are the very arrays it was computed with), the
   reusable part is its longest common prefix with *every* prompt of the call. If that is at least
   ``min_tokens`` long it is used; when it is much shorter than the cached prefix (its slot bucket
   is smaller) the prefix is recomputed compactly for just that part, once, so later calls do not
   attend over dead slots.
2. Otherwise a new prefix is cached: the longest prefix shared by all prompts of the call, or, for
   a single prompt, the whole prompt but its last token (the next call will cut it to what the two
   calls share, e.g. the system prompt).

At least one token of every prompt is left to the main program, whose last prompt position
produces the first logits. Weight changes (a KTO update replaces the LoRA arrays) invalidate the
cache: identity of every weight array is checked through weak references, so nothing is kept
alive; so does a change of the model's structure (``lora.adapters_disabled``: same arrays,
another function).

The prefix occupies slots ``[0, Pb)`` of every row of the decode cache (right-padded: real tokens
in ``[0, L)``, masked slots after), the prompt suffixes follow, left-padded, in
``[Pb, Pb + T)``; RoPE positions continue from ``L`` (``KVCache.positions``), so the result is the
same computation as prefilling the whole prompt.

Shape legend: Ly = layers, P = prefix slots (bucket), K = KV heads, H = head dim.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfjax.models.qwen3 import KVCache, init_cache

MAX_EXTRA_SLOTS = 512
"""Most slots a cached prefix can add to a row (default 128-slot granularity): the prefix's
bucket plus the suffix's prompt bucket exceed the whole prompt's bucket by at most 512
(checked over prompt lengths < 6k in tests/test_sampling_prefix.py; for the SF prompt it is
128: 640 prefix + 2,048 suffix slots against 2,560)."""


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def shared_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix shared by all sequences."""
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for s in seqs[1:]:
        n = min(n, common_prefix_len(first[:n], s[:n]))
    return n


@dataclass
class CachedPrefix:
    """Keys/values of ``tokens`` in slots ``[0, len(tokens))`` of ``k``/``v`` (a one-row cache's,
    ``[1, K, P, H]`` per layer or stacked ``[L, 1, K, P, H]``, as the config lays it out)."""

    tokens: tuple[int, ...]
    k_LyP: jax.Array
    v_LyP: jax.Array
    weights: tuple[weakref.ref, ...]
    graphdef: object = None
    """The model structure it was computed with (LoRA adapters switched off is another one)."""

    @property
    def slots(self) -> int:
        return int(jax.tree.leaves(self.k_LyP)[0].shape[-2])


def _prefill_prefix(graphdef, state, k_LyP, v_LyP, ids_1P, mask_1P):
    """Run the model over one right-padded prefix; return its per-layer keys and values."""
    model = nnx.merge(graphdef, state)
    if hasattr(model, "eval"):
        model.eval()
    cache = KVCache(
        k=k_LyP,
        v=v_LyP,
        slot_mask=jnp.zeros(ids_1P.shape, bool),
        positions=jnp.zeros((1,), jnp.int32),
        index=jnp.int32(0),
    )
    _, cache = model(ids_1P, attention_mask=mask_1P, cache=cache)
    return cache.k, cache.v


class PrefixCache:
    """One cached prompt prefix and the policy that decides when to use or replace it.

    Args:
      config: the model config (layers, KV heads, head dim) for the cache shape.
      cache_dtype: dtype of the cached keys/values (the sampler's).
      pad_token_id: id written into the padding slots of the prefix program.
      min_tokens: shortest prefix worth caching.
      granularity: prefix slot buckets are multiples of this (a stable system prompt compiles
        one program; a finer bucket wastes fewer masked slots than powers of two).
      mesh: the sampler's device mesh, if any: the prefix program then runs with the weights'
        shardings and returns keys/values sharded like a one-row KV cache
        (:func:`sfjax.parallel.cache_shardings`).
    """

    def __init__(
        self, config, cache_dtype, pad_token_id: int, *, min_tokens: int = 128,
        granularity: int = 128, mesh=None,
    ):  # fmt: skip
        if min_tokens < 1 or granularity < 1:
            raise ValueError(
                f"min_tokens and granularity must be >= 1, got {min_tokens}, {granularity}"
            )
        self.config = config
        self.cache_dtype = jnp.dtype(cache_dtype)
        self.pad_token_id = int(pad_token_id)
        self.min_tokens = int(min_tokens)
        self.granularity = int(granularity)
        self.entry: CachedPrefix | None = None
        self.num_builds = 0
        """How many prefixes were computed (a counter for tests and logs)."""
        self.mesh = mesh
        self._program = jax.jit(_prefill_prefix, static_argnums=(0,), donate_argnums=(2, 3))
        self._sharded_programs: dict[tuple, object] = {}

    def clear(self) -> None:
        """Drop the cached prefix."""
        self.entry = None

    def bucket(self, n: int) -> int:
        """Slots reserved for an ``n``-token prefix."""
        return -(-n // self.granularity) * self.granularity

    def plan(
        self, prompt_ids: Sequence[Sequence[int]], graphdef, state, weights=None
    ) -> CachedPrefix | None:
        """The prefix to use for these prompts (building or compacting it if needed), or None.

        The reused length is ``len(entry.tokens)`` of the returned entry: every prompt starts
        with those tokens and has at least one token after them. ``weights`` (default:
        ``state``) is the model state whose array identities key the cache.
        """
        cap = min(len(p) for p in prompt_ids) - 1
        if cap < self.min_tokens:
            return None
        leaves = jax.tree.leaves(state if weights is None else weights)
        entry = self.entry
        if entry is not None and not self._same_weights(entry, leaves, graphdef):
            entry = self.entry = None
        if entry is not None:
            reuse = min([cap] + [common_prefix_len(entry.tokens, p) for p in prompt_ids])
            if reuse >= self.min_tokens:
                if reuse < len(entry.tokens) and self.bucket(reuse) < entry.slots:
                    entry = self._build(entry.tokens[:reuse], graphdef, state, leaves)
                elif reuse < len(entry.tokens):
                    entry = CachedPrefix(
                        entry.tokens[:reuse], entry.k_LyP, entry.v_LyP, entry.weights,
                        entry.graphdef,
                    )
                    self.entry = entry
                return entry
        shared = min(cap, shared_prefix_len(prompt_ids)) if len(prompt_ids) > 1 else cap
        if shared < self.min_tokens:
            return None
        return self._build(tuple(prompt_ids[0][:shared]), graphdef, state, leaves)

    def kv_sharding(self, slots: int):
        """Sharding of the cached keys/values (one-row cache layout) under the mesh."""
        from sfjax import parallel

        abstract = jax.eval_shape(lambda: init_cache(self.config, 1, slots, self.cache_dtype))
        return parallel.cache_shardings(abstract, self.mesh).k

    # --------------------------------------------------------------------------- internals
    def _sharded_program(self, graphdef, state, P: int):
        from sfjax import parallel

        key = (graphdef, jax.tree.structure(state), P)
        if key not in self._sharded_programs:
            kv_sh = self.kv_sharding(P)
            rep = parallel.replicated(self.mesh)
            state_sh = parallel.state_shardings(state, self.mesh)
            self._sharded_programs[key] = jax.jit(
                _prefill_prefix, static_argnums=(0,), donate_argnums=(2, 3),
                in_shardings=(state_sh, kv_sh, kv_sh, rep, rep), out_shardings=(kv_sh, kv_sh),
            )  # fmt: skip
        return self._sharded_programs[key]

    @staticmethod
    def _same_weights(entry: CachedPrefix, leaves, graphdef) -> bool:
        # The structure too: `lora.adapters_disabled` keeps every array but changes the function.
        return entry.graphdef == graphdef and len(leaves) == len(entry.weights) and all(
            ref() is leaf for ref, leaf in zip(entry.weights, leaves)
        )

    def _build(self, tokens, graphdef, state, leaves) -> CachedPrefix:
        tokens = tuple(int(t) for t in tokens)
        P = self.bucket(len(tokens))
        ids_1P = np.full((1, P), self.pad_token_id, np.int32)
        ids_1P[0, : len(tokens)] = tokens
        mask_1P = np.zeros((1, P), bool)
        mask_1P[0, : len(tokens)] = True
        empty = init_cache(self.config, 1, P, self.cache_dtype, mesh=self.mesh)
        if self.mesh is None:
            k, v = self._program(graphdef, state, empty.k, empty.v, ids_1P, mask_1P)
        else:
            from sfjax import parallel

            program = self._sharded_program(graphdef, state, P)
            rep = parallel.replicated(self.mesh)
            k, v = program(graphdef, state, empty.k, empty.v,
                           *parallel.put((ids_1P, mask_1P), rep))  # fmt: skip
        self.num_builds += 1
        self.entry = CachedPrefix(
            tokens, k, v, tuple(weakref.ref(x) for x in leaves), graphdef
        )
        return self.entry
