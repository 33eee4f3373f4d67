"""From the last position's logits to the next token: greedy, temperature, top-k, top-p.

A sampler is a small object with `__call__(logits_BV, key) -> tokens_B`; the decode loop calls it
and knows nothing else about it, so a new strategy is a new class, not a change to the loop.
Samplers are `flax.struct` dataclasses: numeric settings (temperature, top_p) are traced values,
so changing them does not recompile; `top_k` is static because it fixes a shape.

The filters follow the order and semantics of Hugging Face's logits warpers: temperature first,
then top-k (every token tied with the k-th largest logit is kept), then top-p (drop the
lowest-probability tokens whose cumulative probability is at most 1 - p; always keep the top one).
"""

from __future__ import annotations

import math
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import struct

from jaxgpt.errors import InputError

FILTERED = -jnp.inf


class Sampler(Protocol):
    def __call__(self, logits_BV: jax.Array, key: jax.Array | None) -> jax.Array: ...


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits of each row (and anything tied with the k-th); -inf elsewhere."""
    k = min(k, logits_BV.shape[-1])
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
    return jnp.where(logits_BV < kth_B1, FILTERED, logits_BV)


def top_p_filter(logits_BV: jax.Array, p: jax.Array | float) -> jax.Array:
    """Nucleus filter: keep the smallest set of top tokens whose probability mass exceeds p."""
    order_BV = jnp.argsort(logits_BV, axis=-1, stable=True)  # ascending, as Hugging Face sorts
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    remove_sorted_BV = cumulative_BV <= 1.0 - p
    remove_sorted_BV = remove_sorted_BV.at[..., -1].set(False)  # the most likely token stays
    # Scatter the decision back from sorted order to vocabulary order.
    remove_BV = (
        jnp.zeros_like(remove_sorted_BV)
        .at[jnp.arange(logits_BV.shape[0])[:, None], order_BV]
        .set(remove_sorted_BV)
    )
    return jnp.where(remove_BV, FILTERED, logits_BV)


@struct.dataclass
class Greedy:
    """The most likely token (temperature 0)."""

    def __call__(self, logits_BV: jax.Array, key: jax.Array | None = None) -> jax.Array:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


@struct.dataclass
class RandomSampling:
    """Sample from softmax(logits / temperature), optionally restricted by top-k and/or top-p."""

    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = struct.field(pytree_node=False, default=None)

    def filter_logits(self, logits_BV: jax.Array) -> jax.Array:
        """The logits the token is drawn from: scaled, then top-k and top-p filtered."""
        logits_BV = logits_BV.astype(jnp.float32) / self.temperature
        if self.top_k is not None:
            logits_BV = top_k_filter(logits_BV, self.top_k)
        if self.top_p is not None:
            logits_BV = top_p_filter(logits_BV, self.top_p)
        return logits_BV

    def __call__(self, logits_BV: jax.Array, key: jax.Array | None) -> jax.Array:
        if key is None:
            raise InputError("random sampling needs a PRNG key; pass key=jax.random.key(seed)")
        return jax.random.categorical(key, self.filter_logits(logits_BV), axis=-1).astype(jnp.int32)


def make_sampler(
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Greedy | RandomSampling:
    """The sampler for these settings; temperature 0 means greedy. Bad values raise InputError."""
    if (
        not isinstance(temperature, (int, float))
        or isinstance(temperature, bool)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise InputError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}"
        )
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InputError(f"top_k must be an integer >= 1 (or None), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise InputError(f"top_p must be in (0, 1] (or None), got {top_p!r}")
    if temperature == 0:
        return Greedy()
    return RandomSampling(temperature=float(temperature), top_p=top_p, top_k=top_k)
