"""Attention implementations for the Qwen3 decoder, chosen at trace time.

One function, :func:`attention`, computes grouped-query softmax attention
``softmax(q kᵀ / sqrt(H) masked by visible) v`` for the un-cached forward (training, scoring)
and for the KV-cache forward (prefill, decode) of :mod:`sfjax.models.qwen3`. Which kernel
computes it is a setting, read when a function is *traced*:

* ``"plain"`` — the reference path (what ``qwen3.attention`` always did): float32 scores
  ``[B, K, G, T, S]`` materialised by ``einsum``, a finite mask value (``-1e30``, so a query
  that sees no key gets a uniform softmax, not NaN), probabilities cast back to the input dtype.
* ``"xla"`` / ``"cudnn"`` — :func:`jax.nn.dot_product_attention` with that ``implementation``:
  inputs in their own dtype (bf16 on GPU), float32 softmax inside, GQA handled by the kernel
  (query heads grouped over the ``K`` key/value heads), the visibility mask as a boolean
  ``[B, 1, T, S]`` mask (cuDNN turns it into an additive bias). ``"cudnn"`` is the fused
  flash-attention kernel: the ``[T, S]`` scores never reach HBM.
* ``"auto"`` (the default) — ``"cudnn"`` on a GPU when the shapes and dtypes allow it
  (:func:`cudnn_unsupported_reason`), otherwise ``"plain"``; every fallback on a GPU is logged
  once with its reason, and :func:`choices` counts what each traced call used. Decode steps
  (one query per row) always take ``"plain"``: they only read the cache, which the plain path
  does in place.

Keys and values come head-major, ``[B, K, S, H]`` — the layout of the KV cache
(:class:`sfjax.models.qwen3.KVCache`), so that the plain path's matmuls have their batch axes
``(B, K)`` leading and XLA never rewrites the cache into another layout; the fused kernels get
them swapped to ``[B, S, K, H]``.

Rows with an empty visible set (a left-padding query sees no real key; a cache slot before a
row's prompt) are defined as zero in the fused paths: the kernel is given one dummy visible key
for them (so no kernel ever normalises an all-masked row, forward or backward) and their output
is set to 0. Real rows are unaffected; pad rows stay finite, so nothing NaN can reach the cache
or the residual stream.

Selecting: ``SFJAX_ATTENTION=cudnn`` in the environment, :func:`set_implementation`, an
:class:`AttentionConfig` field in a config of your own (``cfg.attention.apply()``; no experiment
CLI has one, the experiments read ``SFJAX_ATTENTION``), or
``with attention.implementation("xla"): ...``; ``benchmarks/gpu_*.py --attention`` sets it.
The setting is read when a function is traced, and changing it clears JAX's compilation caches
(:func:`jax.clear_caches`), so every jitted function — a :class:`sfjax.sampling.Sampler`'s
cached programs included — retraces with the new kernel at its next call (a one-off recompile;
switching is meant to be rare).

Shape legend: B batch, T query tokens, S key slots, N query heads, K key/value heads,
G = N // K query heads per key/value head, H head dim.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("plain", "xla", "cudnn", "auto")
"""Accepted names; ``"auto"`` resolves to ``"cudnn"`` or ``"plain"`` per call."""

MASK_VALUE = -1e30
"""Score of an invisible key in the plain path: finite, so an all-masked row gives no NaN."""

_ENV_VAR = "SFJAX_ATTENTION"
_log = logging.getLogger(__name__)


def _check(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {name!r}; choose one of {IMPLEMENTATIONS} "
            f"(e.g. SFJAX_ATTENTION=plain or attention.set_implementation('plain'))"
        )
    return name


_current = [_check(os.environ.get(_ENV_VAR, "auto") or "auto")]
_choices: collections.Counter = collections.Counter()
_warned: set[str] = set()


# ---------------------------------------------------------------------------------- setting
def get_implementation() -> str:
    """The implementation that the next traced call of :func:`attention` will request."""
    return _current[0]


def set_implementation(name: str) -> str:
    """Select the implementation; returns the previous one. A change clears JAX's compilation
    caches so that already-jitted functions retrace with it."""
    previous = _current[0]
    _current[0] = _check(name)
    if name != previous:
        jax.clear_caches()
    return previous


@contextlib.contextmanager
def implementation(name: str) -> Iterator[str]:
    """``with implementation("cudnn"): ...`` — the setting inside, the previous one after."""
    previous = set_implementation(name)
    try:
        yield name
    finally:
        set_implementation(previous)


@dataclass(frozen=True)
class AttentionConfig:
    """Attention kernel choice, to nest in a config of your own (tyro: ``--attention.*``)."""

    implementation: str = "auto"
    """plain (f32 scores, the reference), xla / cudnn (jax.nn.dot_product_attention), auto
    (cuDNN on a GPU when the shapes allow, else plain)."""

    def __post_init__(self):
        _check(self.implementation)

    def apply(self) -> str:
        """Make it the process-wide setting (:func:`set_implementation`); returns the previous."""
        return set_implementation(self.implementation)


def choices() -> dict[str, int]:
    """How many traced attention calls used each implementation (``"auto->plain"`` etc.), for
    benchmark records: proof of what actually ran."""
    return dict(_choices)


def reset_choices() -> None:
    _choices.clear()


# ---------------------------------------------------------------------------------- maths
def plain_attention(q_BTNH, k_BKSH, v_BKSH, visible_BTS):
    """Reference grouped-query attention with float32 scores (paper IV: the Actor's decoder).

    ``out[b, t, n] = Σ_s softmax_s(q[b,t,n]·k[b,n//G,s] / sqrt(H) | visible[b,t,s]) v[b,n//G,s]``;
    an invisible key scores ``MASK_VALUE``, so a row that sees nothing averages all values.
    Keys and values are head-major ``[B, K, S, H]`` (the KV cache's layout), read in place.
    Queries are laid out ``[B, K, G·T, H]`` first (one transpose), so both matmuls are plain
    batched ``[M, H] x [H, S]`` / ``[M, S] x [S, H]`` products over ``(B, K)`` and the scores
    stay ``[B, K, G·T, S]`` throughout: left to a 5-D einsum, XLA:CPU computed the transposed
    scores and transposed them back, in the forward and again in the backward pass (measured,
    bf16 forward + backward: 1.18 → 0.75 ms for 32 queries over 127 keys, 2.9 → 1.6 ms for a
    95-token prompt, batch 4, 8/2 heads).
    """
    q_BKMH = _grouped_queries(q_BTNH, k_BKSH.shape[1])
    logits_BKMS = jnp.einsum(
        "BKMH,BKSH->BKMS", q_BKMH, k_BKSH.astype(q_BTNH.dtype),
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    logits_BKMS = _masked_scores(logits_BKMS, visible_BTS, q_BTNH.shape[-1])
    probs_BKMS = jax.nn.softmax(logits_BKMS, axis=-1).astype(q_BTNH.dtype)
    out_BKMH = jnp.einsum("BKMS,BKSH->BKMH", probs_BKMS, v_BKSH.astype(q_BTNH.dtype))
    return _ungrouped(out_BKMH, q_BTNH.shape)


def _grouped_queries(q_BTNH, K: int):
    """Queries ``[B, T, N, H]`` laid out ``[B, K, G·T, H]`` (G = N / K query rows per KV head)."""
    B, T, N, H = q_BTNH.shape
    G = N // K
    return q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)


def _ungrouped(out_BKMH, shape_BTNH):
    """The inverse of :func:`_grouped_queries` on an output ``[B, K, G·T, H]``."""
    B, T, N, H = shape_BTNH
    K = out_BKMH.shape[1]
    return out_BKMH.reshape(B, K, N // K, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _masked_scores(logits_BKMX, visible_BTX, H: int):
    """Float32 scores ``[B, K, G·T, X]`` scaled by ``1 / sqrt(H)``, ``MASK_VALUE`` where a query
    does not see key ``x`` (``visible_BTX``, shared by the G query rows of a KV head)."""
    B, K, M, X = logits_BKMX.shape
    T = visible_BTX.shape[1]
    visible_B1MX = jnp.broadcast_to(visible_BTX[:, None, None], (B, 1, M // T, T, X)).reshape(
        B, 1, M, X
    )
    return jnp.where(visible_B1MX, logits_BKMX * (H**-0.5), MASK_VALUE)


def cache_and_own_attention(q_BTNH, k_BKSH, v_BKSH, visible_BTS, k_BKTH, v_BKTH, visible_BTT):
    """:func:`plain_attention` over the keys of a read-only cache ``k_BKSH`` followed by this
    call's own keys ``k_BKTH`` (one softmax over ``S + T`` keys), without concatenating them:
    the scores of the two parts are computed apart and joined, so the cache is read where it
    lies and never copied into a new buffer (the scanned decode step reads each layer's slice
    of a stacked cache this way, :meth:`sfjax.models.qwen3.Qwen3.run_layers`).

    ``visible_BTS`` marks the cache slots each query sees (not the slots this call's tokens
    will fill), ``visible_BTT`` the own keys. Equal to :func:`plain_attention` over the cache
    with the own keys written into it: the same float32 products of ``dtype`` operands, summed
    in float32, probabilities rounded to ``dtype`` before ``p v``. The cache products are
    written as multiply-and-sum rather than matmuls (a decode step has ``G`` query rows per
    head: a matrix-vector product, memory-bound), a reduction into which a compiler can fuse
    the read of the cache slice, where a matmul (a library call) needs its operand sliced out
    of a stacked ``[L, ...]`` cache into a buffer first. XLA:CPU copies the slice either way
    (it upcasts 16-bit slices to float32; both forms measured the same there,
    benchmarks/RESULTS.md "Decode as a scan over a stacked cache"); the fusion is for GPU / TPU,
    to be measured.
    """
    H, S = q_BTNH.shape[-1], k_BKSH.shape[2]
    dtype = q_BTNH.dtype
    f32 = jnp.float32
    q_BKMH = _grouped_queries(q_BTNH, k_BKSH.shape[1])
    k_BK1SH = k_BKSH.astype(dtype)[:, :, None]
    cache_BKMS = jnp.sum(q_BKMH[:, :, :, None].astype(f32) * k_BK1SH.astype(f32), axis=-1)
    own_BKMT = jnp.einsum("BKMH,BKTH->BKMT", q_BKMH, k_BKTH.astype(dtype),
                          preferred_element_type=f32)
    logits_BKMZ = jnp.concatenate([_masked_scores(cache_BKMS, visible_BTS, H),
                                   _masked_scores(own_BKMT, visible_BTT, H)], axis=-1)
    probs_BKMZ = jax.nn.softmax(logits_BKMZ, axis=-1).astype(dtype)
    v_BK1SH = v_BKSH.astype(dtype)[:, :, None]
    out_BKMH = jnp.sum(probs_BKMZ[..., :S, None].astype(f32) * v_BK1SH.astype(f32), axis=-2)
    out_BKMH += jnp.einsum("BKMT,BKTH->BKMH", probs_BKMZ[..., S:], v_BKTH.astype(dtype),
                           preferred_element_type=f32)  # fmt: skip
    return _ungrouped(out_BKMH.astype(dtype), q_BTNH.shape)


def fused_attention(q_BTNH, k_BKSH, v_BKSH, visible_BTS, implementation: str = "xla"):
    """The same attention through :func:`jax.nn.dot_product_attention` (``"xla"``/``"cudnn"``).

    ``k``/``v`` are cast to the query dtype (the kernels want one dtype) and handed over in the
    kernel's ``[B, S, K, H]`` order. A query row whose visible set is empty gets one dummy
    visible key (slot 0) for the kernel and a zero output.
    """
    if implementation not in ("xla", "cudnn"):
        raise ValueError(f"fused_attention implements 'xla' or 'cudnn', got {implementation!r}")
    k_BSKH, v_BSKH = k_BKSH.swapaxes(1, 2), v_BKSH.swapaxes(1, 2)
    S = k_BSKH.shape[1]
    dtype = q_BTNH.dtype
    any_BT = jnp.any(visible_BTS, axis=-1)
    first_S = jnp.arange(S) == 0
    safe_BTS = visible_BTS | (~any_BT[:, :, None] & first_S[None, None, :])
    out_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BSKH.astype(dtype), v_BSKH.astype(dtype),
        mask=safe_BTS[:, None], implementation=implementation,
    )  # fmt: skip
    return jnp.where(any_BT[:, :, None, None], out_BTNH, jnp.zeros((), dtype))


# ---------------------------------------------------------------------------------- dispatch
def cudnn_unsupported_reason(q_BTNH, k_BKSH, backend: str | None = None, *,
                             differentiable: bool = True) -> str | None:  # fmt: skip
    """Why cuDNN flash attention cannot run this call (``None`` when it can).

    Static checks only (shapes, dtypes, backend), mirroring JAX's cuDNN checks: a GPU backend,
    fp16/bf16 inputs, head dim a multiple of 8 and <= 128, query heads a multiple of kv heads,
    and — for a call that may be differentiated (``differentiable``: the un-cached forward and
    the trainer's continuation of a shared prompt; never a KV-cache write) — even query and key
    lengths, since cuDNN's backward with a mask refuses odd ones. JAX checks that only when it
    traces the backward pass, which under ``lax.scan`` or ``jax.checkpoint`` happens after this
    module's call has returned: too late to fall back, so it is checked here.
    """
    backend = backend or jax.default_backend()
    if backend != "gpu":
        return f"backend is {backend!r}, cuDNN needs a GPU"
    if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q_BTNH.dtype} (cuDNN flash attention takes bf16/fp16)"
    _, T, N, H = q_BTNH.shape
    _, K, S, _ = k_BKSH.shape
    if H % 8 or H > 128:
        return f"head dim {H} (cuDNN needs a multiple of 8, <= 128)"
    if N % K:
        return f"{N} query heads not a multiple of {K} kv heads"
    if differentiable and (T % 2 or S % 2):
        return (
            f"odd length (queries {T}, keys {S}) in a call that may be differentiated "
            "(cuDNN's backward with a mask needs even lengths)"
        )
    return None


def _note(choice: str) -> None:
    _choices[choice] += 1


def _fallback(reason: str) -> None:
    if jax.default_backend() == "gpu" and reason not in _warned:
        _warned.add(reason)
        _log.warning("attention 'auto': cuDNN not used (%s); using the plain path", reason)


def attention(q_BTNH, k_BKSH, v_BKSH, visible_BTS, implementation: str | None = None, *,
              differentiable: bool = True):  # fmt: skip
    """Grouped-query softmax attention with the selected implementation (module docstring).

    Args:
      q_BTNH: rotated queries.
      k_BKSH, v_BKSH: keys/values, head-major (this call's, or the whole cache with ``S``
        slots).
      visible_BTS: True where query t may attend to slot s (causal and not padding).
      implementation: overrides the module setting for this call.
      differentiable: whether the call may be differentiated (``False`` for KV-cache writes:
        "auto" then lets cuDNN take odd lengths, see :func:`cudnn_unsupported_reason`).
    """
    name = _check(implementation or _current[0])
    if name == "plain":
        _note("plain")
        return plain_attention(q_BTNH, k_BKSH, v_BKSH, visible_BTS)
    if name == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(
            f"attention 'cudnn' needs a GPU (backend is {jax.default_backend()!r}); "
            "use 'auto' (cuDNN where possible), 'xla' or 'plain'"
        )
    if name in ("xla", "cudnn"):
        _note(name)
        return fused_attention(q_BTNH, k_BKSH, v_BKSH, visible_BTS, name)
    if q_BTNH.shape[1] == 1:
        # A decode step: one query per row, memory-bound on reading the cache. The plain path
        # reads it in place; the kernel would want the cache in [B, S, K, H] order (a copy of
        # every layer's cache per step) and has no [T, S] scores to save at T = 1.
        _note("auto->plain")
        return plain_attention(q_BTNH, k_BKSH, v_BKSH, visible_BTS)
    reason = cudnn_unsupported_reason(q_BTNH, k_BKSH, differentiable=differentiable)
    if reason is None:
        try:
            out = fused_attention(q_BTNH, k_BKSH, v_BKSH, visible_BTS, "cudnn")
        except (NotImplementedError, RuntimeError, ValueError) as e:  # rejected while tracing
            reason = f"cuDNN rejected the call: {e}"
        else:
            _note("auto->cudnn")
            return out
    _fallback(reason)
    _note("auto->plain")
    return plain_attention(q_BTNH, k_BKSH, v_BKSH, visible_BTS)


__all__ = [
    "IMPLEMENTATIONS",
    "AttentionConfig",
    "attention",
    "cache_and_own_attention",
    "choices",
    "cudnn_unsupported_reason",
    "fused_attention",
    "get_implementation",
    "implementation",
    "plain_attention",
    "set_implementation",
]
