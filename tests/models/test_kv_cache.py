"""KV cache layout and helpers (sfjax/models/kv_cache.py); the cached forward itself is tested
against the un-cached one in test_qwen3.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sfjax.models import qwen3
from sfjax.models.kv_cache import KVCache, init_cache


def test_one_head_major_buffer_per_layer():
    cfg = qwen3.Qwen3Config.tiny(num_layers=3)
    cache = init_cache(cfg, batch_size=2, max_len=7, dtype=jnp.bfloat16)
    assert len(cache.k) == len(cache.v) == 3
    for x in cache.k + cache.v:
        assert x.shape == (2, cfg.num_kv_heads, 7, cfg.head_dim) and x.dtype == jnp.bfloat16
    assert len({id(x) for x in cache.k + cache.v}) == 6  # separate buffers, updated in place
    assert cache.max_len == 7 and cache.batch_size == 2
    assert cache.slot_mask.shape == (2, 7) and not cache.slot_mask.any()
    assert cache.positions.shape == (2,) and int(cache.index) == 0
    assert qwen3.KVCache is KVCache and qwen3.init_cache is init_cache  # the model's re-export


def test_repeat_keeps_each_row_together():
    cfg = qwen3.Qwen3Config.tiny(num_layers=2)
    cache = init_cache(cfg, batch_size=2, max_len=4, dtype=jnp.float32)
    rows = jnp.arange(2, dtype=jnp.float32)[:, None, None, None]
    cache = cache.replace(
        k=tuple(x + rows + 10 * i for i, x in enumerate(cache.k)),
        v=tuple(x - rows for x in cache.v),
        slot_mask=cache.slot_mask.at[1, :2].set(True),
        positions=jnp.array([3, 5], jnp.int32),
        index=jnp.int32(2),
    )
    rep = cache.repeat(3)
    assert rep.batch_size == 6 and rep.max_len == 4 and int(rep.index) == 2
    want_rows = np.array([0, 0, 0, 1, 1, 1])
    for i, x in enumerate(rep.k):
        np.testing.assert_array_equal(np.asarray(x)[:, 0, 0, 0], want_rows + 10 * i)
    np.testing.assert_array_equal(np.asarray(rep.v[1])[:, 0, 0, 0], -want_rows)
    np.testing.assert_array_equal(rep.positions, [3, 3, 3, 5, 5, 5])
    np.testing.assert_array_equal(rep.slot_mask.sum(axis=1), [0, 0, 0, 2, 2, 2])
