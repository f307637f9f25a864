"""Qwen3 decoder in Flax NNX, with a KV cache for prefill/decode.

The Actor of the paper (section IV) is Qwen3-4B; this module is its decoder, built to match
``transformers.Qwen3ForCausalLM`` numerically: RMSNorm, grouped-query attention with per-head
RMSNorm on q and k applied *before* rotary embeddings (HF ``rotate_half`` convention), a
SiLU-gated MLP and a tied or untied LM head. Parameters live in a chosen dtype (bf16 for real
runs); norms, RoPE and the attention softmax are computed in float32, logits are float32.

Left padding is supported everywhere: a token's RoPE position is the number of real tokens
before it in its row (``cumsum(mask) - 1``), and pads are never attended to.

Shape legend:
  B batch, T query tokens of this call, S key slots (T without cache, cache length with it),
  D hidden size, F MLP width, N query heads, K key/value heads, G = N // K query heads per kv head,
  H head dim, V vocab, L layers.

Loading and saving Hugging Face checkpoints lives in :mod:`sfjax.models.weights`;
``from_pretrained`` and ``save_pretrained`` are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sfjax.models.kv_cache import KVCache, init_cache
from sfjax.models.matmul import matmul
from sfjax.parallel import shard_activation


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
    """With ``scan_layers``, also run single-token cached steps (decode) as a scan, over the
    per-layer cache stacked for the call. Off: decode slices the stacked parameters and runs the
    layers unrolled, which measured 2-5x faster per step on XLA:CPU (the stack / unstack copies
    the whole cache every step; benchmarks/RESULTS.md, "Scanned layers") at the cost of
    compiling the decode step per layer."""
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
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Qwen3Config.{name} must be positive, got {getattr(self, name)}")

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
                raise FileNotFoundError(
                    f"no config.json at {path!r}; pass a Hugging Face Qwen3 checkpoint directory"
                )
            with open(path) as f:
                config = json.load(f)
        c = dict(config)
        model_type = c.get("model_type")
        if model_type != "qwen3":
            raise ValueError(
                f"unsupported model_type {model_type!r}: sfjax implements only 'qwen3' (dense "
                "Qwen3, e.g. Qwen/Qwen3-4B); Qwen3-MoE, Qwen2 and others are not supported"
            )
        if c.get("attention_bias", False):
            raise ValueError(
                "attention_bias=true is not supported by sfjax's Qwen3 (Qwen3 has none)"
            )
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported; Qwen3 uses 'silu'")
        if c.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported by sfjax's Qwen3")
        rope_theta = c.get("rope_theta")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope:
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ValueError(
                    f"rope type {rope_type!r} is not supported (only the default RoPE); remove "
                    "rope_scaling from config.json to run without context extension"
                )
            rope_theta = rope.get("rope_theta", rope_theta)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        missing = [k for k in (*required, "num_attention_heads") if c.get(k) is None]
        if missing:
            raise ValueError(f"config.json lacks required Qwen3 fields {missing}")
        eos = c.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        num_heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=c.get("num_key_value_heads") or num_heads,
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
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_layers,
            "use_sliding_window": False,
            "sliding_window": None,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
            "torch_dtype": dtype,
            "dtype": dtype,  # transformers >= 5 name of torch_dtype
        }


# ------------------------------------------------------------------------------ pure maths
def rms_norm(x, weight, eps: float):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in float32 then cast back (as HF)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


@jax.custom_vjp
def silu_mul(gate, up):
    """``silu(gate) * up`` (the SwiGLU MLP's gate), computed in float32, returned in
    ``gate``'s dtype. The backward recomputes ``sigmoid(gate)`` once and forms both gradients
    from it (``d/dgate = up·s·(1 + gate·(1 - s))``, ``d/dup = gate·s``); autodiff's
    expression graph made XLA:CPU evaluate the exponential in several fusions."""
    g32, u32 = gate.astype(jnp.float32), up.astype(jnp.float32)
    return (g32 * jax.nn.sigmoid(g32) * u32).astype(gate.dtype)


def _silu_mul_fwd(gate, up):
    return silu_mul(gate, up), (gate, up)


def _silu_mul_bwd(residuals, dout):
    gate, up = residuals
    g32, u32, d32 = (a.astype(jnp.float32) for a in (gate, up, dout))
    s = jax.nn.sigmoid(g32)
    d_gate = d32 * u32 * s * (1.0 + g32 * (1.0 - s))
    d_up = d32 * g32 * s
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


silu_mul.defvjp(_silu_mul_fwd, _silu_mul_bwd)


def rope_cos_sin(positions_BT, head_dim: int, theta: float):
    """Float32 ``cos``/``sin`` tables ``[B, T, H]`` of rotary embeddings (HF layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return jnp.cos(emb_BTH), jnp.sin(emb_BTH)


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
    """Rotate ``x`` by its position, ``x cos + rotate_half(x) sin``, in float32."""
    x = x_BTNH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]
    return out.astype(x_BTNH.dtype)


def positions_from_mask(mask_BT, start_B=None):
    """RoPE positions: real tokens before this one (+ ``start``); pads clipped to >= 0."""
    pos_BT = jnp.cumsum(mask_BT.astype(jnp.int32), axis=1) - 1
    if start_B is not None:
        pos_BT = pos_BT + start_B[:, None]
    return jnp.maximum(pos_BT, 0)


def attention(q_BTNH, k_BKSH, v_BKSH, visible_BTS):
    """Grouped-query softmax attention over head-major keys / values; ``visible`` marks the keys
    each query may see.

    The kernel (plain f32 scores, XLA or cuDNN fused) is chosen by :mod:`sfjax.models.attention`.
    """
    from sfjax.models.attention import attention as _attention

    return _attention(q_BTNH, k_BKSH, v_BKSH, visible_BTS)


# --------------------------------------------------------------------------------- modules
class Linear(nnx.Module):
    """Bias-free projection ``x @ kernel`` with ``kernel`` ``[in_features, out_features]``.

    Deliberately plain: LoRA replaces or wraps these modules by attribute assignment.
    """

    def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))

    def __call__(self, x):
        return matmul(x, self.kernel[...])


class RMSNorm(nnx.Module):
    """RMSNorm with a learned per-channel ``weight`` (HF ``Qwen3RMSNorm``)."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


class Embedding(nnx.Module):
    """Token embedding table ``embedding`` ``[V, D]``; ``attend`` is the tied LM head."""

    def __init__(self, vocab_size: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.embedding = nnx.Param(init(rngs.params(), (vocab_size, dim), dtype))

    def __call__(self, ids_BT):
        return jnp.take(self.embedding[...], ids_BT, axis=0)

    def attend(self, x_BTD):
        """Float32 logits ``x @ embedding.T``."""
        return matmul(x_BTD, self.embedding[...], jnp.float32, w_is_OI=True)


class Attention(nnx.Module):
    """GQA self-attention with q/k RMSNorm before RoPE (HF ``Qwen3Attention``)."""

    def __init__(self, config: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype)

    def project_qkv(self, x_BTD, cos_BTH, sin_BTH):
        """Rotated queries ``[B, T, N, H]`` and head-major keys / values ``[B, K, T, H]``."""
        c = self.config
        B, T, _ = x_BTD.shape
        q_BTNH = self.q_norm(self.q_proj(x_BTD).reshape(B, T, c.num_heads, c.head_dim))
        k_BTKH = self.k_norm(self.k_proj(x_BTD).reshape(B, T, c.num_kv_heads, c.head_dim))
        v_BTKH = self.v_proj(x_BTD).reshape(B, T, c.num_kv_heads, c.head_dim)
        k_BTKH = apply_rope(k_BTKH, cos_BTH, sin_BTH)
        return apply_rope(q_BTNH, cos_BTH, sin_BTH), k_BTKH.swapaxes(1, 2), v_BTKH.swapaxes(1, 2)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, visible_BTS):
        q_BTNH, k_BKTH, v_BKTH = self.project_qkv(x_BTD, cos_BTH, sin_BTH)
        out_BTNH = attention(q_BTNH, k_BKTH, v_BKTH, visible_BTS)
        return self.o_proj(out_BTNH.reshape(*x_BTD.shape[:2], -1))


class MLP(nnx.Module):
    """SiLU-gated MLP ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(d, f, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD):
        return self.down_proj(silu_mul(self.gate_proj(x_BTD), self.up_proj(x_BTD)))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention then MLP. Its ``__call__`` is *the* decoder layer of
    sfjax: the un-cached forward, cached prefill / decode, the trainer's shared-prompt passes and
    the prompt-prefix cache all run it, through :meth:`Qwen3.run_layers`."""

    def __init__(self, config: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype
        )
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, visible_BTS, past_k_BKSH=None, past_v_BKSH=None,
                 index=None):  # fmt: skip
        """One layer on ``T`` tokens; returns ``(x_BTD, k, v)``.

        Three uses of the keys / values, one computation:

        * no ``past``: attend to this call's tokens; ``k`` / ``v`` ``[B, K, T, H]`` are its own;
        * ``past`` without ``index`` (a shared prompt prefix, training): attend to
          ``concat(past, own)`` (``visible`` covers ``S + T`` keys); ``k`` / ``v`` are its own;
        * ``past`` with ``index`` (the KV cache): write this call's keys / values into the
          buffers at slot ``index`` (in place under jit with a donated cache), attend to the
          whole buffer; ``k`` / ``v`` are the updated buffers ``[B, K, S, H]``.
        """
        attn = self.self_attn
        q_BTNH, k_BKTH, v_BKTH = attn.project_qkv(self.input_layernorm(x_BTD), cos_BTH, sin_BTH)
        k_out, v_out = k_BKTH, v_BKTH
        if past_k_BKSH is None:
            k_all, v_all = k_BKTH, v_BKTH
        elif index is None:
            k_all = jnp.concatenate([past_k_BKSH.astype(k_BKTH.dtype), k_BKTH], axis=2)
            v_all = jnp.concatenate([past_v_BKSH.astype(v_BKTH.dtype), v_BKTH], axis=2)
        else:
            at = (0, 0, index, 0)
            k_all = jax.lax.dynamic_update_slice(past_k_BKSH, k_BKTH.astype(past_k_BKSH.dtype), at)
            v_all = jax.lax.dynamic_update_slice(past_v_BKSH, v_BKTH.astype(past_v_BKSH.dtype), at)
            k_out, v_out = k_all, v_all
        out_BTNH = attention(q_BTNH, k_all, v_all, visible_BTS)
        x_BTD = x_BTD + attn.o_proj(out_BTNH.reshape(*x_BTD.shape[:2], -1))
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD)), k_out, v_out


class Qwen3(nnx.Module):
    """Qwen3 causal LM. ``model(ids, attention_mask=mask[, cache=cache])`` -> float32 logits.

    Attributes mirror HF names: ``embed_tokens``, ``layers[i]`` (``input_layernorm``,
    ``self_attn.{q,k,v,o}_proj``, ``self_attn.{q,k}_norm``, ``post_attention_layernorm``,
    ``mlp.{gate,up,down}_proj``), ``norm``, ``lm_head`` (``None`` when embeddings are tied).
    With ``config.scan_layers`` ``layers`` is one :class:`DecoderLayer` whose parameters carry a
    leading ``[L]`` axis (built with ``nnx.vmap``).
    """

    def __init__(
        self,
        config: Qwen3Config,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
        remat: bool = False,
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        # Recompute each layer's activations in the backward pass of the un-cached forward
        # (``jax.checkpoint``): memory O(layers x hidden) instead of O(layers x attention maps), for
        # training on long sequences. A plain attribute: ``model.remat = True`` switches it on.
        self.remat = remat
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        if config.scan_layers:

            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(r):
                return DecoderLayer(config, dtype=dtype, rngs=r)

            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List(
                [DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)]
            )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs)
        )

    def lm_logits(self, h_BTD):
        """LM head on final (normed) hidden states: float32 logits ``[B, T, V]``.

        With :meth:`hidden_states`, lets a caller compute log-probs in chunks of tokens instead
        of materialising all ``[B, T, V]`` logits at once (e.g. for a 151936-word vocabulary).
        """
        if self.lm_head is None:
            return self.embed_tokens.attend(h_BTD)
        return self.lm_head(h_BTD).astype(jnp.float32)

    # ------------------------------------------------------------------------ layer runner
    def run_layers(self, x_BTD, cos_BTH, sin_BTH, visible_BTS, past=None, index=None, *,
                   remat: bool = False, keep_kv: bool = True):  # fmt: skip
        """Run every decoder layer (:meth:`DecoderLayer.__call__`); returns ``(x_BTD, kv)``.

        ``past`` (optional) is ``(k, v)``, each either a tuple of ``[B, K, S, H]`` arrays, one
        per layer, or one stacked ``[L, B, K, S, H]`` array; ``index`` makes it a KV cache (see
        the layer). ``kv`` is the layers' keys / values (``None`` unless ``keep_kv``): stacked
        when the layers ran as a scan, else a tuple per layer; either layout can be passed back
        as ``past``. ``remat`` recomputes each layer in the backward pass
        (``config.remat_policy``).

        With ``scan_layers`` the layers run as one ``lax.scan`` (one layer compiled), except a
        single-token cached step (decode) without ``scan_decode``, which slices the stacked
        parameters and runs unrolled: stacking the per-layer cache for a scan copies all of it
        every step, measured 2-5x slower on XLA:CPU (benchmarks/RESULTS.md, "Scanned layers").
        """
        c = self.config
        layer_args = (cos_BTH, sin_BTH, visible_BTS)
        if not c.scan_layers:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                pk, pv = (None, None) if past is None else (past[0][i], past[1][i])
                x_BTD, k, v = _call_layer(layer, remat, c.remat_policy, x_BTD, *layer_args, pk, pv,
                                          index)  # fmt: skip
                x_BTD = shard_activation(x_BTD)  # batch over (data, fsdp) under a mesh; else no-op
                ks.append(k)
                vs.append(v)
            return x_BTD, ((tuple(ks), tuple(vs)) if keep_kv else None)
        if index is not None and x_BTD.shape[1] == 1 and not c.scan_decode:
            return self._run_sliced(x_BTD, layer_args, past, index, keep_kv)
        return self._run_scanned(x_BTD, layer_args, past, index, remat, keep_kv)

    def _split_layers(self):
        graphdef, params, rest = nnx.split(self.layers, nnx.Param, ...)
        return graphdef, params, rest

    def _run_scanned(self, x_BTD, layer_args, past, index, remat, keep_kv):
        graphdef, params, rest = self._split_layers()
        stateful = draws_random_numbers(self.layers)
        policy = getattr(jax.checkpoint_policies, self.config.remat_policy)

        def body(carry, xs):
            x_BTD, rest = carry
            p, pk, pv = xs
            layer = nnx.merge(graphdef, p, rest)
            x_BTD, k, v = layer(x_BTD, *layer_args, pk, pv, index)
            x_BTD = shard_activation(x_BTD)
            rest = nnx.state(layer, nnx.Not(nnx.Param)) if stateful else rest
            return (x_BTD, rest), ((k, v) if keep_kv else None)

        if remat:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        pk, pv = (None, None) if past is None else (_stacked(past[0]), _stacked(past[1]))
        (x_BTD, rest), kv = jax.lax.scan(body, (x_BTD, rest), (params, pk, pv))
        if stateful:
            nnx.update(self.layers, rest)
        return x_BTD, kv

    def _run_sliced(self, x_BTD, layer_args, past, index, keep_kv):
        graphdef, params, rest = self._split_layers()
        ks, vs = [], []
        for i in range(self.config.num_layers):
            layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], params), rest)
            pk, pv = (None, None) if past is None else (past[0][i], past[1][i])
            x_BTD, k, v = layer(x_BTD, *layer_args, pk, pv, index)
            x_BTD = shard_activation(x_BTD)
            ks.append(k)
            vs.append(v)
        return x_BTD, ((tuple(ks), tuple(vs)) if keep_kv else None)

    # ---------------------------------------------------------------------------- forward
    def hidden_states(self, input_ids_BT, attention_mask=None, *, remat: bool | None = None):
        """Final hidden states ``[B, T, D]`` after the last RMSNorm (HF ``last_hidden_state``);
        ``model(ids, mask) == model.lm_logits(model.hidden_states(ids, mask))``. ``remat``
        defaults to ``model.remat``."""
        x_BTD, mask_BT = self._embed(input_ids_BT, attention_mask)
        T = mask_BT.shape[1]
        cos_BTH, sin_BTH = self.rope(positions_from_mask(mask_BT))
        causal_TS = jnp.tril(jnp.ones((T, T), bool))
        visible_BTS = causal_TS[None] & mask_BT[:, None, :]
        remat = self.remat if remat is None else remat
        x_BTD, _ = self.run_layers(x_BTD, cos_BTH, sin_BTH, visible_BTS, remat=remat,
                                   keep_kv=False)  # fmt: skip
        return self.norm(x_BTD)

    def rope(self, pos_BT):
        """Float32 RoPE tables ``(cos_BTH, sin_BTH)`` of positions ``[B, T]``."""
        return rope_cos_sin(pos_BT, self.config.head_dim, self.config.rope_theta)

    def __call__(self, input_ids_BT, attention_mask=None, cache: KVCache | None = None):
        """Logits ``[B, T, V]``; with ``cache`` also returns the updated cache.

        Without cache a query at position t sees real tokens at positions <= t of its row. With
        cache, this call's tokens fill slots ``[index, index + T)`` and a query in slot
        ``index + t`` sees real slots ``<= index + t``.
        """
        if cache is None:
            return self.lm_logits(self.hidden_states(input_ids_BT, attention_mask))
        x_BTD, mask_BT = self._embed(input_ids_BT, attention_mask)
        return self._cached_forward(x_BTD, mask_BT, cache)

    def embed(self, input_ids_BT, attention_mask=None):
        """Validated inputs: embeddings ``[B, T, D]`` and a boolean mask ``[B, T]``."""
        return self._embed(input_ids_BT, attention_mask)

    def _embed(self, input_ids_BT, attention_mask):
        input_ids_BT = jnp.asarray(input_ids_BT)
        if input_ids_BT.ndim != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {input_ids_BT.shape}")
        B, T = input_ids_BT.shape
        if attention_mask is None:
            mask_BT = jnp.ones((B, T), bool)
        else:
            mask_BT = jnp.asarray(attention_mask).astype(bool)
            if mask_BT.shape != (B, T):
                raise ValueError(
                    f"attention_mask shape {mask_BT.shape} != input_ids shape {(B, T)}"
                )
        return shard_activation(self.embed_tokens(input_ids_BT)), mask_BT

    def _cached_forward(self, x_BTD, mask_BT, cache: KVCache):
        B, T = mask_BT.shape
        if cache.batch_size != B:
            raise ValueError(f"cache batch {cache.batch_size} != input batch {B}")
        if len(cache.k) != self.config.num_layers:
            raise ValueError(f"cache has {len(cache.k)} layers, the model {self.config.num_layers}")
        S = cache.max_len
        index = cache.index
        cos_BTH, sin_BTH = self.rope(positions_from_mask(mask_BT, cache.positions))
        slot_mask_BS = jax.lax.dynamic_update_slice(cache.slot_mask, mask_BT, (0, index))
        query_slot_T = index + jnp.arange(T)
        causal_TS = jnp.arange(S)[None, :] <= query_slot_T[:, None]
        visible_BTS = causal_TS[None] & slot_mask_BS[:, None, :]
        # The cache keeps one buffer per layer whatever the parameter layout (kv_cache.py); a
        # scanned prefill stacks them for the scan and splits them after.
        past = (cache.k, cache.v)
        x_BTD, (k, v) = self.run_layers(x_BTD, cos_BTH, sin_BTH, visible_BTS, past, index)
        new_cache = KVCache(
            k=tuple(k),
            v=tuple(v),
            slot_mask=slot_mask_BS,
            positions=cache.positions + mask_BT.sum(axis=1, dtype=jnp.int32),
            index=index + T,
        )
        return self.lm_logits(self.norm(x_BTD)), new_cache


def _stacked(kv):
    """Per-layer arrays (a tuple) stacked on a leading layers axis; a stacked array as it is."""
    return jnp.stack(kv) if isinstance(kv, (tuple, list)) else kv


def _call_layer(layer, remat: bool, policy: str, *args):
    """``layer(*args)``, recomputed in the backward pass when ``remat`` (:func:`remat_call`)."""
    if not remat:
        return layer(*args)
    return remat_call(lambda m, *a: m(*a), layer, *args, policy=policy)


def draws_random_numbers(module: nnx.Module) -> bool:
    """Whether calling ``module`` consumes RNG state (a non-deterministic ``nnx.Dropout``, e.g.
    LoRA dropout in training mode)."""
    return any(
        isinstance(m, nnx.Dropout) and not m.deterministic and m.rate > 0
        for _, m in nnx.iter_modules(module)
    )


def remat_call(fn, module: nnx.Module, *args, policy: str = "nothing_saveable"):
    """``fn(module, *args)`` recomputed in the backward pass, through a pure function of the
    module's state (``jax.checkpoint``): unlike ``nnx.remat`` it works on a module merged inside
    an outer trace (the KTO train step). When the module draws random numbers (dropout) its
    advanced RNG state is threaded out and written back; otherwise nothing is written, so a
    module created at an outer trace level (a no-gradient copy) is never mutated."""
    graphdef, state = nnx.split(module)
    stateful = draws_random_numbers(module)

    @functools.partial(jax.checkpoint, policy=getattr(jax.checkpoint_policies, policy))
    def pure(state, *args):
        inner = nnx.merge(graphdef, state)
        out = fn(inner, *args)
        return out, (nnx.state(inner, nnx.RngState) if stateful else None)

    out, rng_state = pure(state, *args)
    if stateful:
        nnx.update(module, rng_state)
    return out


def count_params(model_or_state) -> int:
    """Number of parameters (works on an abstract model from ``nnx.eval_shape``)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return sum(int(x.size) for x in jax.tree.leaves(state))


from sfjax.models.weights import from_pretrained, save_pretrained  # noqa: E402

__all__ = [
    "KVCache",
    "Linear",
    "Qwen3",
    "Qwen3Config",
    "count_params",
    "from_pretrained",
    "init_cache",
    "save_pretrained",
]
