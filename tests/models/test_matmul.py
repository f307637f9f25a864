"""``matmul``: float32 is a plain dot; bf16 on CPU (custom VJP) matches autodiff of ``jnp.dot``.
``tn_dot`` / ``low_rank_product`` (LoRA): equal to ``a^T b`` / autodiff of ``(x @ a) @ b``.

References are computed in float64 numpy on the same bf16-valued operands. Tolerances:
float32 path bit-equal to ``jnp.dot``; bf16 results 1 bf16 ulp of the output scale (2^-8: one
rounding of a float32-accumulated sum of exact products); the gradient of the LM head's bf16
hidden state from a float32 cotangent 2 ulps (2^-7: the cotangent is rounded to bf16 too);
the float32 LoRA helpers 1e-5 relative (summation order only).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfjax.models.matmul import low_rank_product, matmul, tn_dot

BF16_REL = 2.0**-8
TWO_ROUNDINGS_REL = 2.0**-7


def operands(seed, n=(3, 5), i=48, o=40, dtype=jnp.bfloat16):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (*n, i)).astype(dtype)
    w = jax.random.normal(kw, (i, o)).astype(dtype)
    g = jax.random.normal(kg, (*n, o))
    return x, w, g


def f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def max_rel(a, ref):
    return float(np.max(np.abs(f64(a) - ref)) / np.max(np.abs(ref)))


def test_float32_is_a_plain_dot():
    x, w, _ = operands(0, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(matmul)(x, w)), np.asarray(jnp.dot(x, w)))


@pytest.mark.parametrize("w_is_OI", [False, True])
def test_bf16_forward_and_gradients_match_the_float64_reference(w_is_OI):
    x, w_IO, g = operands(1)
    w = w_IO.T if w_is_OI else w_IO
    g16 = g.astype(jnp.bfloat16)

    def f(x, w):
        return matmul(x, w, w_is_OI=w_is_OI)

    y, vjp = jax.vjp(jax.jit(f), x, w)
    dx, dw = vjp(g16)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    X, W, G = f64(x).reshape(-1, x.shape[-1]), f64(w_IO), f64(g16).reshape(-1, g.shape[-1])
    assert max_rel(y.reshape(-1, y.shape[-1]), X @ W) <= BF16_REL
    assert max_rel(dx.reshape(-1, x.shape[-1]), G @ W.T) <= BF16_REL
    assert max_rel(dw.T if w_is_OI else dw, X.T @ G) <= BF16_REL
    # ... and the same numbers as autodiff of jnp.dot in bf16, up to one rounding.
    y_ref, vjp_ref = jax.vjp(lambda x, w: jnp.dot(x, w.T if w_is_OI else w), x, w)
    for ours, ref in zip((y, *vjp(g16)), (y_ref, *vjp_ref(g16))):
        assert max_rel(ours, f64(ref)) <= BF16_REL


def test_float32_logits_from_a_bf16_table():
    """The LM head: bf16 table [V, D], float32 logits; dx from a float32 cotangent."""
    x, w_IO, g = operands(2, o=96)
    table = w_IO.T  # [V, D]
    y, vjp = jax.vjp(lambda x, t: matmul(x, t, jnp.float32, w_is_OI=True), x, table)
    assert y.dtype == jnp.float32
    X, W, G = f64(x).reshape(-1, 48), f64(w_IO), np.asarray(g, np.float64).reshape(-1, 96)
    assert max_rel(y.reshape(-1, 96), X @ W) <= 1e-6  # bf16 products are exact in float32
    dx, dtable = vjp(g)
    assert dx.dtype == dtable.dtype == jnp.bfloat16
    assert max_rel(dx.reshape(-1, 48), G @ W.T) <= TWO_ROUNDINGS_REL
    assert max_rel(dtable.T, X.T @ G) <= TWO_ROUNDINGS_REL


def test_gradients_flow_through_jit_remat_and_vmap():
    x, w, g = operands(3)
    loss = lambda x, w: jnp.sum(matmul(x, w).astype(jnp.float32) * g)  # noqa: E731
    ref = jax.grad(loss, argnums=(0, 1))(x, w)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(x, w)
    for a, b in zip(remat, ref):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    per_row = jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None))(x[:, None], w)
    assert per_row.shape == (x.shape[0], *w.shape)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the custom VJP is the CPU path")
def test_every_matmul_of_forward_and_backward_takes_bf16_operands():
    """The point of the custom VJP: every dot has bf16 operands and a float32 result (a bf16
    result or a float32 operand makes XLA:CPU convert both operands to float32 and skip the
    bf16 units)."""
    x, w, _ = operands(4)  # x [3, 5, 48], w [48, 40]
    table = w  # a [V=48, D=40] table: logits [3, 5, 48]

    def loss(x, w, table):
        h = matmul(x, w)
        return jnp.sum(jax.nn.log_softmax(matmul(h, table, jnp.float32, w_is_OI=True)))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, w, table).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert len(dots) == 6  # 2 forward + 2 x (dx, dw)
    for line in dots:
        operand_types = line.rsplit(": (", 1)[1].split(") ->")[0]
        assert "f32" not in operand_types and operand_types.count("bf16") == 2, line
        assert line.rstrip().endswith("xf32>"), line  # accumulated and returned in float32


@pytest.mark.parametrize("shapes", [((37, 24), (37, 5)), ((6, 3), (6, 40))])
def test_tn_dot_is_a_transposed_product(shapes):
    """Either operand may be the one transposed first; the result is ``a^T b`` either way."""
    a = jax.random.normal(jax.random.key(5), shapes[0])
    b = jax.random.normal(jax.random.key(6), shapes[1])
    got = jax.jit(tn_dot)(a, b)
    np.testing.assert_allclose(np.asarray(got), f64(a).T @ f64(b), rtol=1e-5, atol=1e-5)


def test_low_rank_product_matches_autodiff():
    """The LoRA product's custom VJP equals autodiff of ``(x @ a) @ b`` (float32, 1e-5)."""
    kx, ka, kb, kg = jax.random.split(jax.random.key(7), 4)
    x, a = jax.random.normal(kx, (29, 24)), jax.random.normal(ka, (24, 4))
    b, g = jax.random.normal(kb, (4, 33)), jax.random.normal(kg, (29, 33))
    out, vjp = jax.vjp(jax.jit(low_rank_product), x, a, b)
    ref_out, ref_vjp = jax.vjp(lambda x, a, b: (x @ a) @ b, x, a, b)
    for got, want in zip((out, *vjp(g)), (ref_out, *ref_vjp(g))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
