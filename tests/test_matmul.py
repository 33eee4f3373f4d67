"""`jaxgpt.matmul.lowp_matmul` and the bfloat16 model against float32.

Tolerances: bfloat16 keeps 8 significant bits, so rounding x, w and the cotangent costs at most
2^-9 ≈ 0.2 % relative per factor; a float32-accumulated dot of such terms is off by about that
much relative to its norm. Gradients are compared normwise (‖g − g_f32‖ / ‖g_f32‖): < 1 % for
one matmul (measured 0.23-0.30 %), < 5 % for every parameter of the whole two-block model
(measured: at most 2.6 %, median 1.8 %; every activation's rounding compounds through
LayerNorm, attention and GELU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.matmul import lowp_matmul
from jaxgpt.objectives import next_token_loss

BF16 = jnp.dtype(jnp.bfloat16)
F32 = jnp.dtype(jnp.float32)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("w_is_vd", [False, True])
def test_lowp_matmul_values_and_gradients_close_to_float32(w_is_vd):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 5, 48), F32)
    w = jnp.asarray(rng.randn(*((40, 48) if w_is_vd else (48, 40))), F32)
    dy = jnp.asarray(rng.randn(2, 5, 40), F32)
    spec = "btd,od->bto" if w_is_vd else "btd,do->bto"

    def loss(f, x, w):
        return jnp.sum(f(x, w).astype(F32) * dy)

    ours = lambda x, w: lowp_matmul(x, w, BF16, BF16, w_is_vd)
    ref = lambda x, w: jnp.einsum(spec, x, w, precision="highest")
    y, y_ref = ours(x, w), ref(x, w)
    assert y.dtype == BF16 and y.shape == y_ref.shape
    (dx, dw), (dx_ref, dw_ref) = (jax.grad(loss, (1, 2))(f, x, w) for f in (ours, ref))
    assert dx.dtype == F32 and dw.dtype == F32  # the inputs' dtypes (float32 master weights)
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert 0 < rel_err(got, want) < 1e-2


def test_every_dot_of_the_backward_takes_bfloat16_inputs_and_accumulates_in_float32():
    x = jnp.ones((2, 3, 16), F32)
    w = jnp.ones((16, 8), F32)
    grad = jax.grad(lambda x, w: jnp.sum(lowp_matmul(x, w, BF16, BF16).astype(F32)), (0, 1))
    dots = [e for e in jax.make_jaxpr(grad)(x, w).jaxpr.eqns if "dot_general" in str(e.primitive)]
    assert len(dots) == 3  # y, dx, dw
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [BF16, BF16]
        assert eqn.outvars[0].aval.dtype == F32


def test_bfloat16_model_gradients_close_to_float32(hf_tiny, tiny_tokens):
    from jaxgpt.pretrained import load_hf

    _, path = hf_tiny
    config, params = load_hf(str(path))
    batch = jnp.asarray(tiny_tokens)
    grad = jax.jit(jax.value_and_grad(next_token_loss), static_argnums=2)
    loss32, g32 = grad(params, batch, config, None)
    loss16, g16 = grad(params, batch, config.replace(dtype="bfloat16"), None)
    assert abs(float(loss16 - loss32)) < 1e-2 * float(loss32)
    errors = {
        jax.tree_util.keystr(path): rel_err(a, b)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g16), jax.tree.leaves(g32))
    }
    assert max(errors.values()) < 5e-2, errors
    assert all(jax.tree.leaves(jax.tree.map(lambda g: g.dtype == F32, g16)))
