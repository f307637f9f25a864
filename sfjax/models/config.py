"""The Qwen3 architecture config (:class:`Qwen3Config`): the fields of an HF ``config.json``
that matter, presets, HF conversion, and the execution-layout fields (``scan_layers``,
``scan_decode``, ``remat_policy``) that pick how :class:`sfjax.models.qwen3.Qwen3` compiles."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax


class UnsupportedCheckpoint(ValueError):
    """A checkpoint whose config.json sfjax cannot run: another architecture, an option its
    Qwen3 does not implement, or required fields missing. The message names what."""


class CheckpointUnavailable(FileNotFoundError):
    """A checkpoint (or its tokenizer) that is not there: a wrong path, a directory without
    config.json, a hub id not in the local cache while offline. The message says what to pass."""


@dataclass(frozen=True)
class Qwen3Config:
    """Architecture of a Qwen3 dense decoder (the fields of HF ``config.json`` that matter)."""

    vocab_size: int = 151936
    """Rows of the embedding table (and columns of the LM head)."""
    hidden_size: int = 2560
    """Residual stream width D."""
    intermediate_size: int = 9728
    """SiLU-gated MLP width F."""
    num_layers: int = 36
    """Number of decoder layers L (HF ``num_hidden_layers``)."""
    num_heads: int = 32
    """Query heads N (HF ``num_attention_heads``)."""
    num_kv_heads: int = 8
    """Key/value heads K (HF ``num_key_value_heads``); must divide ``num_heads``."""
    head_dim: int = 128
    """Per-head width H; in Qwen3 independent of ``hidden_size / num_heads``."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 1_000_000.0
    """RoPE base frequency."""
    tie_word_embeddings: bool = True
    """Whether the LM head reuses the embedding table (no ``lm_head.weight`` in the checkpoint)."""
    max_position_embeddings: int = 40960
    """Longest context the checkpoint was trained for (informational; not enforced in forward)."""
    bos_token_id: int | None = None
    """Beginning-of-sequence id from ``config.json`` (Qwen3 does not prepend it)."""
    eos_token_id: int | tuple[int, ...] | None = None
    """End-of-sequence id(s) from ``config.json``."""
    scan_layers: bool = False
    """Execution layout, not architecture (never written to ``config.json``): keep the decoder
    layers' parameters stacked on a leading ``[L, ...]`` axis and run the un-cached forward and
    the prefill as one ``lax.scan`` over them, so XLA compiles one layer instead of ``L``
    (benchmarks/bench_compile.py). Single-token decode slices the stack and runs unrolled
    unless ``scan_decode``. Same results as the unrolled model."""
    scan_decode: bool = False
    """With ``scan_layers``, also run single-token cached steps (decode) as a scan: the KV cache
    is then one stacked ``[L, B, K, S, H]`` array per keys / values (:func:`init_cache` reads
    this field), each layer attends over its slice of the stack plus its own new key (read only,
    no cache write inside the scan) and returns its new keys / values, written into the stack
    by one update after the scan. Off: the cache is one array per layer and decode slices the
    stacked parameters and runs the layers unrolled.

    Default off, measured (benchmarks/RESULTS.md, "Decode as a scan over a stacked cache";
    XLA:CPU only, GPU to be measured): the scanned Qwen3-4B decode / RfR programs compile 6.8x /
    4.2x faster than unrolled, but a decode step ran 2.1x (batch 1) / 3.1x (batch 8) slower than
    unrolled on a mid-size bf16 model — no faster than the earlier scan that stacked / split the
    per-layer cache every step (2.3x / 2.6x in the same session), because XLA:CPU copies every
    layer's weights and cache slice out of the stack per step (float32 upcasts of 16-bit slices;
    a dynamic slice cannot feed its matmuls in place). With float32 weights and cache (no
    upcasts) it ran 1.4x / 1.7x the unrolled time and 1.5x / 1.9x faster than the earlier scan.
    Turn it on where compile time dominates (a short device lease)."""
    remat_policy: str = "nothing_saveable"
    """``jax.checkpoint_policies`` name used when layers are rematerialised (``remat``):
    ``nothing_saveable`` recomputes the whole layer in the backward pass (least memory);
    ``dots_with_no_batch_dims_saveable`` keeps the projection outputs (less recompute)."""

    def __post_init__(self):
        if not hasattr(jax.checkpoint_policies, self.remat_policy):
            raise ValueError(
                f"remat_policy {self.remat_policy!r} is not a jax.checkpoint_policies name (e.g. "
                "'nothing_saveable', 'dots_with_no_batch_dims_saveable', 'everything_saveable')"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"Qwen3Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def stacked_cache(self) -> bool:
        """Whether the KV cache keeps its layers stacked (``scan_layers`` and ``scan_decode``)."""
        return self.scan_layers and self.scan_decode

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (the GQA ratio G)."""
        return self.num_heads // self.num_kv_heads

    # ----------------------------------------------------------------------------- presets
    @classmethod
    def qwen3_4b(cls) -> Qwen3Config:
        """Qwen/Qwen3-4B (the paper's Actor): 36 layers, 32/8 heads, tied embeddings, ≈4.02 B."""
        return cls(bos_token_id=151643, eos_token_id=151645)

    @classmethod
    def qwen3_1_7b(cls) -> Qwen3Config:
        """Qwen/Qwen3-1.7B: 28 layers, hidden 2048, 16/8 heads, tied embeddings."""
        return cls(
            hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
            num_kv_heads=8, bos_token_id=151643, eos_token_id=151645,
        )  # fmt: skip

    @classmethod
    def qwen3_0_6b(cls) -> Qwen3Config:
        """Qwen/Qwen3-0.6B: 28 layers, hidden 1024, 16/8 heads, tied embeddings."""
        return cls(
            hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
            num_kv_heads=8, bos_token_id=151643, eos_token_id=151645,
        )  # fmt: skip

    @classmethod
    def tiny(cls, **overrides: Any) -> Qwen3Config:
        """The tiny test architecture of :func:`sfjax.testing.write_tiny_checkpoint` (GQA 2).

        Keyword overrides replace fields, e.g. ``Qwen3Config.tiny(tie_word_embeddings=False)``.
        """
        base = cls(
            vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=820,
            eos_token_id=822,
        )  # fmt: skip
        return dataclasses.replace(base, **overrides)

    # ------------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> Qwen3Config:
        """Build from an HF ``config.json`` (a dict, the file, or the checkpoint directory).

        Raises ``ValueError`` for anything this implementation does not compute faithfully
        (another ``model_type``, biases, sliding windows, RoPE scaling, a non-SiLU MLP).
        """
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise CheckpointUnavailable(
                    f"no config.json at {path!r}; pass a Hugging Face Qwen3 checkpoint directory"
                )
            with open(path) as f:
                try:
                    config = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path}: not valid JSON ({e}); re-download or re-save the checkpoint"
                    ) from None
        c = dict(config)
        model_type = c.get("model_type")
        if model_type != "qwen3":
            raise UnsupportedCheckpoint(
                f"unsupported model_type {model_type!r}: sfjax implements only 'qwen3' (dense "
                "Qwen3, e.g. Qwen/Qwen3-4B); Qwen3-MoE, Qwen2 and others are not supported"
            )
        if c.get("attention_bias", False):
            raise UnsupportedCheckpoint(
                "attention_bias=true is not supported by sfjax's Qwen3 (Qwen3 has none)"
            )
        if c.get("hidden_act", "silu") != "silu":
            raise UnsupportedCheckpoint(
                f"hidden_act {c['hidden_act']!r} is not supported; Qwen3 uses 'silu'"
            )
        if c.get("use_sliding_window", False):
            raise UnsupportedCheckpoint(
                "use_sliding_window=true is not supported by sfjax's Qwen3"
            )
        rope_theta = c.get("rope_theta")
        # transformers 5 (PreTrainedConfig.convert_rope_params_to_dict): rope_scaling, when set,
        # replaces rope_parameters (e.g. YaRN added to a config.json that transformers 5 wrote)
        rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
        if rope:
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise UnsupportedCheckpoint(
                    f"rope type {rope_type!r} is not supported (only the default RoPE); remove "
                    "rope_scaling from config.json to run without context extension"
                )
            rope_theta = rope.get("rope_theta", rope_theta)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        missing = [k for k in (*required, "num_attention_heads") if c.get(k) is None]
        if missing:
            raise UnsupportedCheckpoint(f"config.json lacks required Qwen3 fields {missing}")
        eos = c.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        num_heads = c["num_attention_heads"]
        # transformers' Qwen3Config: an absent key takes the class default (32), an explicit
        # null means multi-head attention (num_key_value_heads = num_attention_heads)
        num_kv_heads = c.get("num_key_value_heads", HF_DEFAULT_NUM_KV_HEADS)
        if num_kv_heads is None:
            num_kv_heads = num_heads
        elif "num_key_value_heads" not in c and num_heads % num_kv_heads:
            raise ValueError(
                f"config.json has no num_key_value_heads; transformers' Qwen3Config then takes "
                f"its default {HF_DEFAULT_NUM_KV_HEADS}, which does not divide "
                f"num_attention_heads={num_heads} (transformers refuses this checkpoint too): add "
                '"num_key_value_heads" to config.json (rows of self_attn.k_proj.weight / head_dim; '
                "equal to num_attention_heads for multi-head attention)"
            )
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=c.get("head_dim") or 128,  # HF Qwen3Config default (not hidden / heads)
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10_000.0),
            tie_word_embeddings=c.get("tie_word_embeddings", False),  # HF Qwen3Config default
            max_position_embeddings=c.get("max_position_embeddings", 32768),
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=eos,
        )

    def to_hf(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """An HF ``config.json`` dict that ``transformers.Qwen3Config`` reads back to this."""
        eos = self.eos_token_id
        return {
            **HF_FIXED_FIELDS,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_layers,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
            "torch_dtype": dtype,
            "dtype": dtype,  # transformers >= 5 name of torch_dtype
        }


HF_DEFAULT_NUM_KV_HEADS = 32
"""``num_key_value_heads`` of a ``config.json`` without the key: transformers' (5.25)
``Qwen3Config`` class default, not ``num_attention_heads`` (that is what an explicit null gives)."""

HF_FIXED_FIELDS: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rope_scaling": None,
    "use_sliding_window": False,
    "sliding_window": None,
    "use_cache": True,
}
"""The ``config.json`` entries of every Qwen3 this project writes that :class:`Qwen3Config` does
not carry (fixed by the architecture): :meth:`Qwen3Config.to_hf` and
:func:`sfjax.testing.hf_config` both start from them."""


__all__ = ["HF_FIXED_FIELDS", "Qwen3Config"]
