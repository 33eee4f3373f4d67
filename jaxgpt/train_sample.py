"""The sample `jaxgpt train` prints at the end of a run: `forward` in a loop, no KV cache.

This is deliberately the simplest correct decoder (one full forward pass per new token over a
fixed `[1, block_size]` window, so it compiles once) and is kept apart so that it can be replaced
by `jaxgpt.decode.generate` (the KV-cache decoder) without touching the training code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.model import forward
from jaxgpt.params import Params
from jaxgpt.sampling import make_sampler


@functools.partial(jax.jit, static_argnames=("config", "sampler"))
def _next_token(params, window_1T, position, key, config, sampler):
    """The token sampled after `window_1T[0, :position + 1]` (later slots do not matter: causal)."""
    logits_1TV = forward(params, window_1T, config)
    logits_1V = jax.lax.dynamic_index_in_dim(logits_1TV, position, axis=1, keepdims=False)
    return sampler(logits_1V, key)[0]


def sample_text(
    params: Params,
    config: GPTConfig,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    seed: int = 0,
) -> list[int]:
    """`max_new_tokens` ids continuing `prompt_ids` (the context slides once it fills the block)."""
    sampler = make_sampler(temperature, top_k=top_k)
    T = config.block_size
    ids = list(prompt_ids)[-T:] or [0]
    out: list[int] = []
    key = jax.random.key(seed)
    for i in range(max_new_tokens):
        context = ids[-T:]
        window = np.zeros((1, T), np.int32)
        window[0, : len(context)] = context
        token = _next_token(
            params, jnp.asarray(window), len(context) - 1, jax.random.fold_in(key, i), config,
            sampler,
        )  # fmt: skip
        token = int(token)
        ids.append(token)
        out.append(token)
    return out
