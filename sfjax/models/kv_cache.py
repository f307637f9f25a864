"""The KV cache shared by the Qwen3 decoder (:mod:`sfjax.models.qwen3`) and the sampler.

A batch of rows decodes in lockstep over ``S`` slots per row. A forward call with the cache
writes its ``T`` tokens' keys / values into slots ``[index, index + T)`` of every layer (in
place under jit when the cache is donated) and advances ``index``; ``slot_mask`` marks the
slots that hold real tokens (left padding and unwritten slots stay masked, so prompts of
different lengths share one ``index``), and ``positions`` counts each row's real tokens — the
RoPE position of its next one. A query in slot ``index + t`` attends to the real slots up to
its own.

Layout: one head-major array ``[B, K, S, H]`` per layer for keys and one for values. Head-major
because the attention matmuls batch over ``(B, K)``; one array per layer because XLA copies a
layer's slice out of a stacked ``[L, ...]`` array before every matmul that reads it (measured
on the CPU decode step, benchmarks/RESULTS.md). Sharding (:mod:`sfjax.parallel`): rows over
``(data, fsdp)``, KV heads over ``tp``.

Shape legend: B rows, K KV heads, S slots, H head dim, L layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import struct

if TYPE_CHECKING:
    from sfjax.models.config import Qwen3Config


@struct.dataclass
class KVCache:
    """Per-layer keys/values of a batch decoding in lockstep (the module docstring).

    ``k``/``v`` hold one array ``[B, K, S, H]`` per layer: each layer's keys and values are a
    buffer of their own, head-major, so a decode step writes its slot in place and the
    attention matmuls read the buffer as it is (a stacked ``[L, ...]`` array or a slot-major
    layout makes XLA copy every layer's cache at every step, see :mod:`sfjax.models.attention`).
    ``slot_mask`` ``[B, S]`` marks slots holding real tokens; ``positions`` ``[B]`` is the RoPE
    position of each row's next real token; ``index`` is the next slot to write, shared by all
    rows.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    slot_mask: jax.Array
    positions: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        """Number of slots S."""
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        """Number of rows B."""
        return self.k[0].shape[0]

    def repeat(self, n: int) -> KVCache:
        """Each row repeated ``n`` times consecutively (row b -> rows b*n .. b*n+n-1)."""
        return KVCache(
            k=tuple(jnp.repeat(x, n, axis=0) for x in self.k),
            v=tuple(jnp.repeat(x, n, axis=0) for x in self.v),
            slot_mask=jnp.repeat(self.slot_mask, n, axis=0),
            positions=jnp.repeat(self.positions, n, axis=0),
            index=self.index,
        )


def init_cache(
    config: Qwen3Config, batch_size: int, max_len: int, dtype=jnp.bfloat16, mesh=None
) -> KVCache:
    """An empty cache of ``max_len`` slots per row (prompt bucket + new tokens) for a model with
    ``config.num_layers`` layers of ``config.num_kv_heads`` x ``config.head_dim``. With a
    ``mesh`` it is created directly on its shards (:func:`sfjax.parallel.cache_shardings`), so a
    4B model's cache never sits whole on one device."""
    if mesh is not None:
        from sfjax.parallel import cache_shardings

        make = lambda: init_cache(config, batch_size, max_len, dtype)  # noqa: E731
        return jax.jit(make, out_shardings=cache_shardings(jax.eval_shape(make), mesh))()
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        slot_mask=jnp.zeros((batch_size, max_len), bool),
        positions=jnp.zeros((batch_size,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


__all__ = ["KVCache", "init_cache"]
