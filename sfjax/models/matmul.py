"""The decoder's matmuls: the projection ``x @ w`` accumulated in float32 (fast for bf16 on
CPUs) and the LoRA product ``(x @ a) @ b`` whose weight gradients avoid XLA:CPU's slow
transposed-operand dots (:func:`tn_dot`).

For float32 weights, and on GPU / TPU, :func:`matmul` is one plain ``dot_general``. For 16-bit
weights on XLA:CPU it routes through a custom VJP, because XLA:CPU lowers a dot whose *result*
is bf16 — or one with a float32 operand — by converting both operands to float32 (measured on
one core: 170 GFLOP/s for ``[512, 256] x [256, 768]``), while bf16 operands with a float32
result run on the CPU's bf16 matrix units (1,050–1,320 GFLOP/s with AMX). Autodiff of
``dot(..., preferred_element_type=f32).astype(bf16)`` alone would still hit the slow path in the
backward pass (its cotangent arrives in float32), so the backward matmuls are spelled out:

* forward ``y = round16(x w)``; backward ``dx = round16(g w^T)``, ``dw = round16(x^T g)`` with
  ``g`` rounded to 16 bits first — for a 16-bit result the same arithmetic as autodiff of
  ``jnp.dot`` in bf16 (and as torch's bf16 matmul): 16-bit operands, float32 accumulation, one
  rounding of the result;
* a float32 result (``out_dtype=float32``, the LM head's logits) has a float32 cotangent; it
  is rounded to 16 bits too. ``dx`` is rounded to ``x``'s 16 bits anyway, so this adds one
  rounding of the same size per element (the test bounds both by 2 bf16 ulps of the output
  scale), where autodiff would have converted the whole table to float32 in every step.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def matmul(x_NI, w, out_dtype=None, *, w_is_OI: bool = False):
    """``x @ w`` for ``w`` ``[I, O]`` (``[O, I]`` with ``w_is_OI``, e.g. a tied embedding table,
    contracted without materialising ``w.T``). ``x`` is cast to ``w``'s dtype, products are
    accumulated in float32, the result is in ``out_dtype`` (default: ``w``'s dtype). Leading axes
    of ``x`` are batch axes."""
    x_NI = x_NI.astype(w.dtype)
    out_dtype = jnp.dtype(out_dtype or w.dtype)
    if jnp.dtype(w.dtype).itemsize >= 4 or jax.default_backend() != "cpu":
        return _dot(x_NI, w, w_is_OI, out_dtype)
    return _matmul_16bit(x_NI, w, out_dtype, w_is_OI)


def _dot(x_NI, w, w_is_OI: bool, out_dtype):
    """``x @ w`` (``x @ w.T`` with ``w_is_OI``) contracting ``x``'s last axis. A transposed
    operand would cost XLA:CPU a copy (3.7 vs 0.64 ms for an 8192 x 256 bf16 table)."""
    dims = (((x_NI.ndim - 1,), (1 if w_is_OI else 0,)), ((), ()))
    return jax.lax.dot_general(x_NI, w, dims, preferred_element_type=out_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_16bit(x_NI, w, out_dtype, w_is_OI):
    return _dot(x_NI, w, w_is_OI, jnp.float32).astype(out_dtype)


def _matmul_16bit_fwd(x_NI, w, out_dtype, w_is_OI):
    return _matmul_16bit(x_NI, w, out_dtype, w_is_OI), (x_NI, w)


def _matmul_16bit_bwd(out_dtype, w_is_OI, residuals, g_NO):
    x_NI, w = residuals
    g_NO = g_NO.astype(w.dtype)
    # dx = g w^T: g's last axis contracts with w's output axis.
    dx_NI = _dot(g_NO, w, not w_is_OI, jnp.float32)
    # dw = x^T g ([I, O]) or g^T x ([O, I]), over all leading axes as one 2-D matmul. Unused
    # (frozen base weights) it is dead code and XLA removes it.
    x_MI, g_MO = x_NI.reshape(-1, x_NI.shape[-1]), g_NO.reshape(-1, g_NO.shape[-1])
    if w_is_OI:
        dw = jnp.dot(g_MO.T, x_MI, preferred_element_type=jnp.float32)
    else:
        dw = jnp.dot(x_MI.T, g_MO, preferred_element_type=jnp.float32)
    return dx_NI.astype(x_NI.dtype), dw.astype(w.dtype)


_matmul_16bit.defvjp(_matmul_16bit_fwd, _matmul_16bit_bwd)


def tn_dot(a_NI, b_NR):
    """``a^T @ b`` (``[I, R]``), contracting the leading axis of both — the weight-gradient
    shape. XLA:CPU runs such a dot ~4x slower than a plain one (``[380, 768]^T [380, 16]``:
    364 vs 80 µs), so the smaller operand is transposed first, explicitly, and so is the
    (small) product (the barriers keep XLA from folding either transpose back into the dot).
    Other backends get the plain dot."""
    if jax.default_backend() != "cpu":
        return jnp.dot(a_NI.T, b_NR, preferred_element_type=jnp.float32)
    if b_NR.size <= a_NI.size:
        b_RN = jax.lax.optimization_barrier(b_NR.T)
        ba_RI = jax.lax.optimization_barrier(jnp.dot(b_RN, a_NI, preferred_element_type=jnp.float32))
        return ba_RI.T
    a_IN = jax.lax.optimization_barrier(a_NI.T)
    return jnp.dot(a_IN, b_NR, preferred_element_type=jnp.float32)


@jax.custom_vjp
def low_rank_product(x_NI, a_IR, b_RO):
    """``(x @ a) @ b`` for a LoRA update (``x`` ``[N, I]``, rank ``R`` small), in the operands'
    (equal) dtype. The backward computes ``da = x^T (g b^T)`` and ``db = (x a)^T g`` with
    :func:`tn_dot`; autodiff's transposed-operand dots cost XLA:CPU ~4x more."""
    return (x_NI @ a_IR) @ b_RO


def _low_rank_product_fwd(x_NI, a_IR, b_RO):
    h_NR = x_NI @ a_IR
    return h_NR @ b_RO, (x_NI, a_IR, b_RO, h_NR)


def _low_rank_product_bwd(residuals, g_NO):
    x_NI, a_IR, b_RO, h_NR = residuals
    g_NO = g_NO.astype(h_NR.dtype)
    dh_NR = g_NO @ b_RO.T
    da_IR = tn_dot(x_NI, dh_NR).astype(a_IR.dtype)
    db_RO = tn_dot(h_NR, g_NO).astype(b_RO.dtype)
    return (dh_NR @ a_IR.T).astype(x_NI.dtype), da_IR, db_RO


low_rank_product.defvjp(_low_rank_product_fwd, _low_rank_product_bwd)
