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

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sfjax.models.attention import cache_and_own_attention
from sfjax.models.config import Qwen3Config
from sfjax.models.kv_cache import KVCache, init_cache, is_stacked
from sfjax.models.matmul import matmul
from sfjax.parallel import shard_activation


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


def attention(q_BTNH, k_BKSH, v_BKSH, visible_BTS, *, differentiable: bool = True):
    """Grouped-query softmax attention over head-major keys / values; ``visible`` marks the keys
    each query may see; ``differentiable=False`` for KV-cache writes, never differentiated.

    The kernel (plain f32 scores, XLA or cuDNN fused) is chosen by :mod:`sfjax.models.attention`.
    """
    from sfjax.models.attention import attention as _attention

    return _attention(q_BTNH, k_BKSH, v_BKSH, visible_BTS, differentiable=differentiable)


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
                 index=None, read_only: bool = False):  # fmt: skip
        """One layer on ``T`` tokens; returns ``(x_BTD, k, v)``.

        Four uses of the keys / values, one computation:

        * no ``past``: attend to this call's tokens; ``k`` / ``v`` ``[B, K, T, H]`` are its own;
        * ``past`` without ``index`` (a shared prompt prefix, training): attend to
          ``concat(past, own)`` (``visible`` covers ``S + T`` keys); ``k`` / ``v`` are its own;
        * ``past`` with ``index`` (the KV cache): write this call's keys / values into the
          buffers at slot ``index`` (in place under jit with a donated cache), attend to the
          whole buffer; ``k`` / ``v`` are the updated buffers ``[B, K, S, H]``;
        * ``past`` with ``index`` and ``read_only`` (a slice of a stacked cache in the scanned
          decode): the same attention, but the buffers are only read — one token attends over
          the buffer's slots plus its own key (:func:`sfjax.models.attention.
          cache_and_own_attention`), several write into a copy first; ``k`` / ``v`` are its own,
          for the caller to write.
        """
        attn = self.self_attn
        q_BTNH, k_BKTH, v_BKTH = attn.project_qkv(self.input_layernorm(x_BTD), cos_BTH, sin_BTH)
        k_out, v_out = k_BKTH, v_BKTH
        if past_k_BKSH is None:
            out_BTNH = attention(q_BTNH, k_BKTH, v_BKTH, visible_BTS)
        elif index is None:
            k_all = jnp.concatenate([past_k_BKSH.astype(k_BKTH.dtype), k_BKTH], axis=2)
            v_all = jnp.concatenate([past_v_BKSH.astype(v_BKTH.dtype), v_BKTH], axis=2)
            out_BTNH = attention(q_BTNH, k_all, v_all, visible_BTS)
        elif read_only and x_BTD.shape[1] == 1:
            B, S = visible_BTS.shape[0], visible_BTS.shape[2]
            own_BT1 = jax.lax.dynamic_slice(visible_BTS, (0, 0, index), (B, 1, 1))
            cached_BTS = visible_BTS & (jnp.arange(S) != index)
            out_BTNH = cache_and_own_attention(
                q_BTNH, past_k_BKSH, past_v_BKSH, cached_BTS,
                k_BKTH.astype(past_k_BKSH.dtype), v_BKTH.astype(past_v_BKSH.dtype), own_BT1,
            )  # fmt: skip
        else:
            at = (0, 0, index, 0)
            k_all = jax.lax.dynamic_update_slice(past_k_BKSH, k_BKTH.astype(past_k_BKSH.dtype), at)
            v_all = jax.lax.dynamic_update_slice(past_v_BKSH, v_BKTH.astype(past_v_BKSH.dtype), at)
            if not read_only:
                k_out, v_out = k_all, v_all
            out_BTNH = attention(q_BTNH, k_all, v_all, visible_BTS, differentiable=False)
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

        With ``scan_layers`` the layers run as one ``lax.scan`` (one layer compiled). A KV cache
        (``index``) stacked ``[L, B, K, S, H]`` (``config.scan_decode``) is only read inside the
        scan (each layer's slice: :meth:`DecoderLayer.__call__` ``read_only``); the layers' new
        keys / values come out of the scan and are written into the stack at slot ``index`` by
        one update after it, and the updated stack is returned. A per-layer (tuple) cache is
        prefilled by a scan over it stacked for the call and split after; a single-token step on
        it (decode) slices the stacked parameters and runs unrolled, because stacking the cache
        copies all of it (benchmarks/RESULTS.md, "Scanned layers").
        """
        c = self.config
        layer_args = (cos_BTH, sin_BTH, visible_BTS)
        stacked_cache = past is not None and index is not None and is_stacked(past[0])
        if stacked_cache and not c.scan_layers:
            raise ValueError(
                "a stacked [L, ...] KV cache needs Qwen3Config.scan_layers; build the cache with "
                "init_cache(model.config, ...) so that its layout matches the model"
            )
        if stacked_cache:
            return self._run_scanned_read_only(x_BTD, layer_args, past, index)
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
        if index is not None and x_BTD.shape[1] == 1:
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

    def _run_scanned_read_only(self, x_BTD, layer_args, past, index):
        """The scan over a stacked cache ``past`` = ``(k, v)`` ``[L, B, K, S, H]`` that it only
        reads; returns ``(x_BTD, (k, v))`` with every layer's new keys / values written at slot
        ``index`` by one ``dynamic_update_slice`` (in place under jit when donated)."""
        graphdef, params, rest = self._split_layers()

        def body(x_BTD, xs):
            p, pk, pv = xs
            layer = nnx.merge(graphdef, p, rest)
            x_BTD, k, v = layer(x_BTD, *layer_args, pk, pv, index, read_only=True)
            return shard_activation(x_BTD), (k, v)

        k_LBKSH, v_LBKSH = past
        x_BTD, (k_LBKTH, v_LBKTH) = jax.lax.scan(body, x_BTD, (params, k_LBKSH, v_LBKSH))
        at = (0, 0, 0, index, 0)
        k_LBKSH = jax.lax.dynamic_update_slice(k_LBKSH, k_LBKTH.astype(k_LBKSH.dtype), at)
        v_LBKSH = jax.lax.dynamic_update_slice(v_LBKSH, v_LBKTH.astype(v_LBKSH.dtype), at)
        return x_BTD, (k_LBKSH, v_LBKSH)

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
        # The cache's layout (kv_cache.py) decides how the layers run: stacked, a scan that only
        # reads it; per layer, unrolled decode steps and a scanned prefill that stacks it.
        past = (cache.k, cache.v)
        x_BTD, (k, v) = self.run_layers(x_BTD, cos_BTH, sin_BTH, visible_BTS, past, index)
        new_cache = KVCache(
            k=k if cache.stacked else tuple(k),
            v=v if cache.stacked else tuple(v),
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
