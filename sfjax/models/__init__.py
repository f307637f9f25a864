"""Model code: the Qwen3 decoder (:mod:`sfjax.models.qwen3`) and its HF weight I/O.

``from sfjax.models import qwen3`` then ``qwen3.from_pretrained(...)``.
"""

from sfjax.models import qwen3
from sfjax.models.qwen3 import KVCache, Qwen3, Qwen3Config, init_cache

__all__ = ["KVCache", "Qwen3", "Qwen3Config", "init_cache", "qwen3"]
