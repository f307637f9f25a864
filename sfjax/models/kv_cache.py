"""The KV cache shared by the Qwen3 decoder (:mod:`sfjax.models.qwen3`) and the sampler.

A batch of rows decodes in lockstep over ``S`` slots per row. A forward call with the cache
writes its ``T`` tokens' keys / values into slots ``[index, index + T)`` of every layer (in
place under jit when the cache is donated) and advances ``index``; ``slot_mask`` marks the
slots that hold real tokens (left padding and unwritten slots stay masked, so prompts of
different lengths share one ``index``), and ``positions`` counts each row's real tokens — the
RoPE position of its next one. A query in slot ``index + t`` attends to the real slots up to
its own.

Layout: head-major keys and values, ``[B, K, S, H]``, because the attention matmuls batch over
``(B, K)``. Two ways to hold the layers, chosen by the config (:func:`init_cache`):

* one array per layer (a tuple, the default): the unrolled decoder, and a scanned one decoding
  over parameter slices, write each layer's slot in place and read each buffer as it is;
* one stacked ``[L, B, K, S, H]`` array (``Qwen3Config.scan_decode``): a decode step runs the
  layers as one ``lax.scan`` that reads the stack (each layer's slice) and returns every layer's
  new keys / values, written into the stack at slot ``index`` by ONE update after the scan
  (:meth:`sfjax.models.qwen3.Qwen3.run_layers`) — never a stack / split of the whole cache.

Every function here works on both (the arrays' trailing four axes are ``[B, K, S, H]``).
Sharding (:mod:`sfjax.parallel`): rows over ``(data, fsdp)``, KV heads over ``tp``, the layers
axis unsharded.

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

    ``k``/``v`` hold either one array ``[B, K, S, H]`` per layer (a tuple: each layer's keys
    and values a buffer of their own, written in place) or one stacked ``[L, B, K, S, H]``
    array (the scanned decode's layout, :attr:`stacked`); the module docstring says which
    config picks which. Head-major: a slot-major layout makes XLA copy every layer's cache at
    every step (:mod:`sfjax.models.attention`). ``slot_mask`` ``[B, S]`` marks slots holding
    real tokens; ``positions`` ``[B]`` is the RoPE position of each row's next real token;
    ``index`` is the next slot to write, shared by all rows.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    slot_mask: jax.Array
    positions: jax.Array
    index: jax.Array

    @property
    def stacked(self) -> bool:
        """Whether ``k`` / ``v`` are one ``[L, B, K, S, H]`` array each (else a tuple)."""
        return is_stacked(self.k)

    @property
    def max_len(self) -> int:
        """Number of slots S."""
        return jax.tree.leaves(self.k)[0].shape[-2]

    @property
    def batch_size(self) -> int:
        """Number of rows B."""
        return jax.tree.leaves(self.k)[0].shape[-4]

    def repeat(self, n: int) -> KVCache:
        """Each row repeated ``n`` times consecutively (row b -> rows b*n .. b*n+n-1)."""
        rep = lambda x: jnp.repeat(x, n, axis=-4)  # noqa: E731
        return KVCache(
            k=jax.tree.map(rep, self.k),
            v=jax.tree.map(rep, self.v),
            slot_mask=jnp.repeat(self.slot_mask, n, axis=0),
            positions=jnp.repeat(self.positions, n, axis=0),
            index=self.index,
        )


def is_stacked(kv) -> bool:
    """Whether per-layer keys (or values) ``kv`` are one stacked ``[L, ...]`` array."""
    return not isinstance(kv, (tuple, list))


def with_rows(kv, rows: int, slots: int):
    """Zeros shaped like ``kv`` (either layout) with ``rows`` rows and ``slots`` slots."""
    return jax.tree.map(
        lambda x: jnp.zeros((*x.shape[:-4], rows, x.shape[-3], slots, x.shape[-1]), x.dtype), kv
    )


def write_rows(kv, new, repeat: int = 1):
    """``kv`` (either layout) with ``new`` (the same layout) written from row 0, slot 0 of
    every layer: each of ``new``'s rows ``repeat`` times, or one row broadcast to all rows."""

    def one(x, y):
        y = jnp.repeat(y, repeat, axis=-4) if repeat > 1 else y
        y = jnp.broadcast_to(y, (*y.shape[:-4], x.shape[-4], *y.shape[-3:]))
        return jax.lax.dynamic_update_slice(x, y.astype(x.dtype), (0,) * x.ndim)

    return jax.tree.map(one, kv, new)


def init_cache(
    config: Qwen3Config, batch_size: int, max_len: int, dtype=jnp.bfloat16, mesh=None
) -> KVCache:
    """An empty cache of ``max_len`` slots per row (prompt bucket + new tokens) for a model with
    ``config.num_layers`` layers of ``config.num_kv_heads`` x ``config.head_dim``: stacked
    ``[L, B, K, S, H]`` when ``config.stacked_cache`` (a scanned decode), else one array per
    layer. With a ``mesh`` it is created directly on its shards
    (:func:`sfjax.parallel.cache_shardings`), so a 4B model's cache never sits whole on one
    device."""
    if mesh is not None:
        from sfjax.parallel import cache_shardings

        make = lambda: init_cache(config, batch_size, max_len, dtype)  # noqa: E731
        return jax.jit(make, out_shardings=cache_shardings(jax.eval_shape(make), mesh))()
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    if config.stacked_cache:
        layers = lambda: jnp.zeros((config.num_layers, *shape), dtype)  # noqa: E731
    else:
        layers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))  # noqa: E731
    return KVCache(
        k=layers(),
        v=layers(),
        slot_mask=jnp.zeros((batch_size, max_len), bool),
        positions=jnp.zeros((batch_size,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


__all__ = ["KVCache", "init_cache", "is_stacked", "with_rows", "write_rows"]
