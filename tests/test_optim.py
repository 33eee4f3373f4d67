"""The optimiser: schedule shape, weight-decay mask, clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import get_preset
from jaxgpt.experiment import OptimSection, ScheduleSection
from jaxgpt.optim import decay_mask, lr_schedule, make_optimizer
from jaxgpt.params import init_params


def test_schedule_warmup_cosine_floor():
    optim, sched = OptimSection(lr=1e-3), ScheduleSection(max_steps=100, warmup_steps=10,
                                                          min_lr_ratio=0.1)  # fmt: skip
    lr = lr_schedule(optim, sched)
    values = np.asarray(jax.jit(jax.vmap(lr))(jnp.arange(101)))
    assert values[0] == 0 and np.isclose(values[5], 5e-4) and np.isclose(values[10], 1e-3)
    assert np.all(np.diff(values[10:]) <= 1e-12)
    assert np.isclose(values[100], 1e-4) and np.isclose(float(lr(500)), 1e-4)
    assert np.isclose(values[55], 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-4)  # cosine midpoint


@pytest.fixture(scope="module")
def tiny_params():
    # One compiled init instead of dozens of eagerly dispatched ops.
    return jax.jit(init_params, static_argnums=0)(get_preset("tiny"), jax.random.key(0))


def test_decay_mask(tiny_params):
    params = tiny_params
    mask = decay_mask(params)
    assert mask["wte"] and mask["wpe"]
    block = mask["blocks"][0]
    assert block["attn"]["c_attn"]["kernel"] and block["mlp"]["c_proj"]["kernel"]
    assert not block["attn"]["c_attn"]["bias"] and not block["ln_1"]["scale"]
    assert not mask["ln_f"]["bias"]
    no_emb = decay_mask(params, decay_embeddings=False)
    assert not no_emb["wte"] and not no_emb["wpe"] and no_emb["blocks"][1]["mlp"]["c_fc"]["kernel"]


def test_weight_decay_only_on_masked_leaves(tiny_params):
    params = jax.tree.map(lambda x: x + 1.0, tiny_params)  # biases nonzero, so decay would show
    optim = OptimSection(lr=0.1, weight_decay=0.5, decay_embeddings=False)
    opt = make_optimizer(optim, ScheduleSection(max_steps=10, warmup_steps=0, min_lr_ratio=1.0))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(lambda p: opt.update(zeros, opt.init(p), p))(params)
    # With zero gradients AdamW's update is -lr · wd · param on decayed leaves, 0 elsewhere.
    k = params["blocks"][0]["mlp"]["c_fc"]["kernel"]
    np.testing.assert_allclose(updates["blocks"][0]["mlp"]["c_fc"]["kernel"], -0.05 * k, rtol=1e-6)
    assert not np.any(updates["blocks"][0]["mlp"]["c_fc"]["bias"])
    assert not np.any(updates["wte"]) and not np.any(updates["ln_f"]["scale"])


def test_global_norm_clipping():
    # With eps = 1, Adam's first update is -lr · g / (|g| + 1), so it shows the gradient's scale:
    # 16 entries of 10 (global norm 40) clipped to norm 1 become 0.25 each → update -0.2.
    params = {"w": jnp.ones((4, 4))}
    sched = ScheduleSection(max_steps=10, warmup_steps=0, min_lr_ratio=1.0)
    grads = {"w": jnp.full((4, 4), 10.0)}
    for clip, expected in ((1.0, -0.25 / 1.25), (0.0, -10.0 / 11.0)):
        opt = make_optimizer(OptimSection(lr=1.0, eps=1.0, weight_decay=0.0, grad_clip=clip), sched)
        updates, _ = jax.jit(lambda p, g, o=opt: o.update(g, o.init(p), p))(params, grads)
        np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)
