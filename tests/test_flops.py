"""`flops_per_token` checked two independent ways: by hand for GPT-2 124M, and against the
matmuls the model really traces (every dot_general of the forward pass's jaxpr)."""

from __future__ import annotations

import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import pytest

from jaxgpt.config import get_preset
from jaxgpt.flops import flops_per_token
from jaxgpt.model import forward
from jaxgpt.params import init_params


def test_gpt2_124m_by_hand():
    """GPT-2 124M (L=12, D=768, V=50257, context 1024), worked out from the architecture."""
    L, D, V, T = 12, 768, 50257, 1024
    # Per block: c_attn D·3D + 3D, attention c_proj D·D + D, c_fc D·4D + 4D, MLP c_proj 4D·D + D,
    # two LayerNorms 2·2D: 12·D² + 13·D. Plus the tied unembedding wte (V·D) and ln_f (2D);
    # the position table wpe is a lookup, not a matmul.
    weights = L * (12 * D * D + 13 * D) + V * D + 2 * D
    assert weights == 123_653_376
    # 2 FLOPs (multiply + add) per weight per token, plus QKᵀ and AV over the full T×T square:
    # 2·T·D each per token per layer.
    forward_flops = 2 * weights + L * 2 * (2 * T * D)
    assert forward_flops == 285_055_488
    config = get_preset("gpt2")
    assert flops_per_token(config, T, training=False) == forward_flops
    # Backward costs twice the forward (gradients for the activations and for the weights).
    assert flops_per_token(config, T, training=True) == 3 * forward_flops == 855_166_464


def _dot_flops(jaxpr) -> int:
    """FLOPs of every dot_general in a jaxpr: 2 · (output elements) · (contracted size); a scan's
    body counts `length` times."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += repeat * _dot_flops(sub)
    return total


@pytest.mark.parametrize("preset,T,share", [("tiny", 64, 0.02), ("gpt2", 1024, 0.001)])
def test_matches_the_traced_matmuls(preset, T, share):
    """The formula against the matmuls the forward pass really does (traced, never run)."""
    config = get_preset(preset)
    B = 2
    params = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    jaxpr = jax.make_jaxpr(functools.partial(forward, config=config))(params, tokens)
    traced = _dot_flops(jaxpr.jaxpr) / (B * T)
    # The formula counts every parameter but wpe at 2 FLOPs per token, biases and LayerNorm
    # scales included (13·D per block + 2·D for ln_f); the matmuls do exactly the rest.
    L, D = config.n_layer, config.n_embd
    not_in_matmuls = 2 * (L * 13 * D + 2 * D)
    assert traced == flops_per_token(config, T, training=False) - not_in_matmuls
    # The convention's own overcount: under 0.1 % for GPT-2, 2 % for the tiny width of 32.
    assert not_in_matmuls / traced < share
