"""Generation: one prefill pass over the prompt, then a jitted `lax.scan` adding a token per step.

    prompt tokens [B, T] (left-padded when ragged; row b starts at slot kv_start_B[b])
      → prefill: `forward_cached` over the whole prompt fills the KV cache, logits of the last slot
      → sample token 0 (a `jaxgpt.sampling` sampler: greedy, temperature, top-k, top-p, ...)
      → scan N-1 steps: `forward_cached` of the newest token at the next slot → sample the next

Every model call goes through `forward_cached`, i.e. the same `block` / attention functions as
training: there is one implementation of the model. The loop is compiled once per
(config, batch, prompt length, max_new_tokens, sampler kind) and cached by `jax.jit`; sampler
settings such as temperature and top_p, the PRNG key, `eos_id` and `pad_id` are traced values, so
changing them does not recompile.

After a row emits `eos_id`, its later positions hold `pad_id` and it no longer changes (the row is
still computed — a scan has a fixed length — but its samples are discarded).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.errors import InputError
from jaxgpt.model import forward_cached, init_cache
from jaxgpt.params import Params, check_params
from jaxgpt.sampling import Sampler, make_sampler

_NO_EOS = -1  # an id no token can have: "never stop"


# --------------------------------------------------------------------------- the jitted loop


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def decode_padded(
    params: Params,
    tokens_BT: jax.Array,
    kv_start_B: jax.Array,
    keys_N: jax.Array | None,
    sampler: Sampler,
    eos_id: jax.Array,
    pad_id: jax.Array,
    *,
    config: GPTConfig,
    max_new_tokens: int,
) -> jax.Array:
    """The decode loop on a left-padded batch; returns the new tokens `[B, max_new_tokens]`.

    Args:
      params: model parameters.
      tokens_BT: prompts, left-padded to a common length T (pad slots hold any valid id).
      kv_start_B: first real slot of each row (T - prompt length); slots before it are masked out
        of attention and positions count from it, so each row computes what it would alone.
      keys_N: one PRNG key per new token (`jax.random.split(key, N)`), or None for a sampler that
        needs none (greedy).
      sampler: a `jaxgpt.sampling` sampler (a pytree: its numeric settings are traced).
      eos_id: int32 scalar; a row that samples it stops (-1: never).
      pad_id: int32 scalar written after a row's EOS.
      config, max_new_tokens: static.
    """
    B, T = tokens_BT.shape
    # The last sampled token is never fed back, so the cache needs T + N - 1 slots.
    cache = init_cache(config, B, T + max_new_tokens - 1)

    def pick(logits_BV: jax.Array, key: jax.Array | None, done_B: jax.Array):
        tok_B = sampler(logits_BV, key).astype(jnp.int32)
        tok_B = jnp.where(done_B, pad_id, tok_B)
        return tok_B, done_B | (tok_B == eos_id)

    logits_B1V, cache = forward_cached(
        params, tokens_BT, config, cache, 0, kv_start_B, last_only=True
    )
    first_key = None if keys_N is None else keys_N[0]
    tok_B, done_B = pick(logits_B1V[:, 0], first_key, jnp.zeros((B,), bool))

    def step(carry, key):
        cache, tok_B, done_B, slot = carry
        logits_B1V, cache = forward_cached(params, tok_B[:, None], config, cache, slot, kv_start_B)
        tok_B, done_B = pick(logits_B1V[:, 0], key, done_B)
        return (cache, tok_B, done_B, slot + 1), tok_B

    rest_keys = None if keys_N is None else keys_N[1:]
    _, rest_NB = jax.lax.scan(
        step, (cache, tok_B, done_B, jnp.int32(T)), rest_keys, length=max_new_tokens - 1
    )
    return jnp.concatenate([tok_B[:, None], rest_NB.T], axis=1)


# --------------------------------------------------------------------------- the public function


def _as_prompts(prompt_tokens: Any) -> tuple[list[np.ndarray], str]:
    """The prompts as a list of 1-D int arrays, and the input kind ("array", "list", "lists")."""
    if isinstance(prompt_tokens, (np.ndarray, jax.Array)):
        arr = np.asarray(prompt_tokens)
        if arr.ndim == 1:
            return [arr], "array1"
        if arr.ndim == 2:
            return list(arr), "array2"
        raise InputError(
            f"prompt_tokens must be 1-D [T] or 2-D [B, T], got shape {tuple(arr.shape)}"
        )
    if isinstance(prompt_tokens, Sequence) and not isinstance(prompt_tokens, (str, bytes)):
        if len(prompt_tokens) == 0:
            raise InputError("prompt_tokens is empty: give at least one token")
        if all(isinstance(p, (Sequence, np.ndarray, jax.Array)) for p in prompt_tokens):
            return [np.asarray(p) for p in prompt_tokens], "lists"
        return [np.asarray(prompt_tokens)], "list"
    raise InputError(
        "prompt_tokens must be token ids: a list of ints, a list of lists (a ragged batch), "
        f"or an integer array [T] / [B, T]; got {type(prompt_tokens).__name__}"
    )


def _check_prompts(prompts: list[np.ndarray], config: GPTConfig) -> None:
    for i, p in enumerate(prompts):
        where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
        if p.ndim != 1 or p.size == 0:
            raise InputError(f"{where} is empty: at least one token is needed to start generating")
        if not np.issubdtype(p.dtype, np.integer):
            raise InputError(f"{where} must hold integer token ids, got dtype {p.dtype}")
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(
                f"token id {bad} in {where} is outside the vocabulary [0, {config.vocab_size - 1}]"
            )


def check_request(
    config: GPTConfig,
    prompt_tokens: Any,
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> tuple[list[np.ndarray], str, int]:
    """What `generate` checks before any work: InputError for a request no model call can serve.

    Returns (prompts, their input form, max_new_tokens as an int); callers that print before
    generating (the CLI) call it first, so an error is the only thing they print.
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and not 0 <= int(value) < config.vocab_size:
            raise InputError(
                f"{name} {value} is outside the vocabulary [0, {config.vocab_size - 1}]"
            )
    prompts, kind = _as_prompts(prompt_tokens)
    _check_prompts(prompts, config)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.block_size:
        room = config.block_size - max_new_tokens
        raise InputError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = "
            f"{longest + max_new_tokens} exceeds the model's block_size {config.block_size}; "
            + (
                f"keep only the last {room} prompt tokens or ask for at most "
                f"{config.block_size - longest} new tokens"
                if room >= 1
                else f"max_new_tokens must be at most {config.block_size - 1}"
            )
        )
    return prompts, kind, max_new_tokens


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts → (tokens_BT left-padded with `pad_id`, kv_start_B = first real slot)."""
    T = max(len(p) for p in prompts)
    tokens_BT = np.full((len(prompts), T), pad_id, np.int32)
    kv_start_B = np.zeros((len(prompts),), np.int32)
    for b, p in enumerate(prompts):
        tokens_BT[b, T - len(p) :] = p
        kv_start_B[b] = T - len(p)
    return tokens_BT, kv_start_B


def generate(
    params: Params,
    config: GPTConfig,
    prompt_tokens: Any,
    max_new_tokens: int,
    *,
    key: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    sampler: Sampler | None = None,
) -> np.ndarray | list:
    """Continue each prompt by `max_new_tokens` tokens; returns prompt + generated tokens.

    Args:
      params, config: the model (`init_params` / `load_hf` / a training checkpoint).
      prompt_tokens: one prompt (a list of ints or a 1-D array), a batch of equal-length prompts
        (a 2-D array `[B, T]`), or a ragged batch (a list of lists).
      max_new_tokens: tokens to add (static: one compilation per value).
      key: PRNG key for sampling (`jax.random.key(seed)`); the same key gives the same tokens.
        Not needed for greedy decoding.
      temperature: 0 means greedy; otherwise logits are divided by it before sampling.
      top_k: sample only among the k most likely tokens (ties with the k-th kept).
      top_p: nucleus sampling: the smallest set of most likely tokens with mass > top_p.
      eos_id: a row that emits this id stops; its later tokens are `pad_id`.
      pad_id: filler after EOS (default: `eos_id`, else 0).
      sampler: a sampler object (see `jaxgpt.sampling`) to use instead of
        temperature / top_k / top_p — the way to plug in a new strategy.

    Returns, matching the input's form:
      * a 1-D or 2-D int32 numpy array → an array `[T + N]` / `[B, T + N]`; after a row's EOS the
        array holds `pad_id`;
      * a list of ints → a list of ints; a list of lists → a list of lists, each its prompt plus
        its new tokens up to and including EOS (padding dropped, so lengths may differ).

    Raises:
      InputError: empty prompt, ids outside the vocabulary, bad sampling settings, or
        prompt length + max_new_tokens > config.block_size.
    """
    if sampler is None:
        sampler = make_sampler(temperature, top_k, top_p)
    prompts, kind, max_new_tokens = check_request(
        config, prompt_tokens, max_new_tokens, eos_id=eos_id, pad_id=pad_id
    )
    check_params(params, config)
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0

    tokens_BT, kv_start_B = left_pad(prompts, pad_id)
    keys_N = None if key is None else jax.random.split(key, max_new_tokens)
    new_BN = decode_padded(
        params,
        jnp.asarray(tokens_BT),
        jnp.asarray(kv_start_B),
        keys_N,
        sampler,
        jnp.int32(_NO_EOS if eos_id is None else eos_id),
        jnp.int32(pad_id),
        config=config,
        max_new_tokens=max_new_tokens,
    )
    new_BN = np.asarray(new_BN)

    if kind in ("array1", "array2"):
        out_BT = np.concatenate([tokens_BT, new_BN], axis=1)
        return out_BT[0] if kind == "array1" else out_BT
    rows = []
    for prompt, new_N in zip(prompts, new_BN):
        new = new_N.tolist()
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        rows.append([int(t) for t in prompt] + new)
    return rows[0] if kind == "list" else rows
