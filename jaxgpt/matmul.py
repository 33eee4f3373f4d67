"""Low-precision matmuls that stay low-precision in the backward pass.

`lowp_matmul(x, w, dtype, out_dtype)` multiplies in `dtype` (bfloat16 / float16) with float32
accumulation, forward and backward: all three dots — `y = x·w`, `dx = dy·wᵀ`, `dw = xᵀ·dy` —
take `dtype` inputs and accumulate in float32 (`preferred_element_type=float32`); each result is
rounded once to the dtype it must have (`out_dtype` for y, the inputs' own dtypes for dx and dw,
i.e. float32 for the float32 master weights).

Why a custom VJP: JAX's own transpose of `dot(x16, w16, preferred_element_type=float32)` gets a
float32 cotangent and multiplies it with a bfloat16 operand, i.e. runs the backward dots in
float32 (on GPUs: no tensor cores; on XLA:CPU: the float32 GEMM); writing the dot with a bfloat16
*output* instead keeps the backward in bfloat16 but then XLA:CPU runs every dot at its float32 rate
(docs/benchmarks.md). Here the cotangent is rounded to `dtype` first, as PyTorch's autocast does.

The function takes `x` with any leading axes, so callers apply it to a whole `[B, T, D]` array:
under `jax.vmap` a custom VJP's weight gradient would be batched as per-example outer products
`[N, in, out]` and summed, instead of one GEMM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _dot(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def lowp_matmul(
    x: jax.Array, w: jax.Array, dtype: jnp.dtype, out_dtype: jnp.dtype, w_is_vd: bool = False
) -> jax.Array:
    """`x [..., D] @ w [D, O]` (or `@ w.T` for `w [O, D]` with `w_is_vd=True`, the tied
    embedding) in `dtype` with float32 accumulation; returns `out_dtype`."""
    spec = "...d,od->...o" if w_is_vd else "...d,do->...o"
    return _dot(x.astype(dtype), w.astype(dtype), spec).astype(out_dtype)


def _forward(x, w, dtype, out_dtype, w_is_vd):
    x_low, w_low = x.astype(dtype), w.astype(dtype)
    spec = "...d,od->...o" if w_is_vd else "...d,do->...o"
    # Empty arrays carry the inputs' dtypes to the backward (cotangents must match them).
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
    return _dot(x_low, w_low, spec).astype(out_dtype), (x_low, w_low, dtypes)


def _backward(dtype, out_dtype, w_is_vd, residuals, dy):
    x_low, w_low, (x_like, w_like) = residuals
    dy_low = dy.astype(dtype)
    dx = _dot(dy_low, w_low, "...o,od->...d" if w_is_vd else "...o,do->...d")
    dw = _dot(dy_low, x_low, "...o,...d->od") if w_is_vd else _dot(x_low, dy_low, "...d,...o->do")
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


lowp_matmul.defvjp(_forward, _backward)
