"""Generation: one prefill pass over the prompt, then a jitted loop adding a token per step.

    prompt tokens [B, T] (left-padded when ragged; row b starts at slot kv_start_B[b])
      → prefill: `forward_cached` over the whole prompt fills the KV cache, logits of the last slot
      → sample token 0 (a `jaxgpt.sampling` sampler: greedy, temperature, top-k, top-p, ...)
      → `lax.while_loop`: `forward_cached` of the newest token at the next slot → sample the next,
        until N tokens are out or every row has emitted EOS (the loop stops early)

Every model call goes through `forward_cached`, i.e. the same `block` / attention functions as
training: there is one implementation of the model. Compiled functions are cached by `jax.jit`
per shape; sampler settings such as temperature and top_p, the PRNG keys, `eos_id` and `pad_id`
are traced values, so changing them does not recompile.

Three ways in, all built on the same two pieces (`_prefill` and `_loop` below):

* `generate` — the whole continuation at once: one compiled call per window (see below).
* `stream_generate` — yields the new tokens while they are produced: the prefill, then
  `decode_steps` calls of `chunk` steps each, driven from Python.
* `extend`, `DecodeState`, `decode_steps` — the pieces, for code that keeps a KV cache between
  calls (a chat continues from its cache and slot; earlier turns are never prefilled again).

Sliding window (`generate(..., slide=True)`, `stream_generate(..., slide=True)`, `jaxgpt sample`
and the end-of-training sample): the model sees at most `block_size` tokens. While the prompt plus
the continuation fits, nothing slides. Whenever the sequence (prompt + tokens so far) has filled
the context, the next window is the last `block_size // 2` tokens of each row, prefilled afresh
(positions restart at 0), and decoding goes on from there until the context is full again. A
prompt already longer than the context starts from its last `block_size // 2` tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgpt.config import GPTConfig
from jaxgpt.errors import InputError
from jaxgpt.model import KVCache, forward_cached, init_cache
from jaxgpt.params import Params, check_params
from jaxgpt.sampling import Sampler, make_sampler

_NO_EOS = -1  # an id no token can have: "never stop"


# --------------------------------------------------------------------------- the pieces


@struct.dataclass
class DecodeState:
    """Where a decode stands: everything the next step needs.

    cache: per layer `(k_NSK, v_NSK)`, N = B·H (`jaxgpt.model.init_cache`); slots
      `kv_start_B[b] ... slot - 1` hold row b's sequence.
    token_B: the last sampled token of each row; it is NOT in the cache yet (the next step, or the
      next `extend`, writes it at `slot`).
    done_B: rows that have emitted EOS (their later tokens are `pad_id`).
    slot: int32 scalar, the cache slot `token_B` goes to.
    kv_start_B: first real slot of each row (left padding before it is never attended to).
    """

    cache: KVCache
    token_B: jax.Array
    done_B: jax.Array
    slot: jax.Array
    kv_start_B: jax.Array


def _pick(sampler, logits_BV, key, done_B, eos_id, pad_id) -> tuple[jax.Array, jax.Array]:
    """Sample each row's next token; finished rows get `pad_id`. Returns (token_B, done_B)."""
    tok_B = sampler(logits_BV, key).astype(jnp.int32)
    tok_B = jnp.where(done_B, pad_id, tok_B)
    return tok_B, done_B | (tok_B == eos_id)


def _prefill(
    params, tokens_BT, kv_start_B, key, done_B, sampler, eos_id, pad_id, config, cache_len
):
    """A fresh cache of `cache_len` slots, the prompt written at slots 0..T-1, token 0 sampled."""
    B, T = tokens_BT.shape
    cache = init_cache(config, B, cache_len)
    logits_B1V, cache = forward_cached(
        params, tokens_BT, config, cache, 0, kv_start_B, last_only=True
    )
    tok_B, done_B = _pick(sampler, logits_B1V[:, 0], key, done_B, eos_id, pad_id)
    return DecodeState(cache, tok_B, done_B, jnp.int32(T), kv_start_B)


def _loop(params, state, keys_N, limit, sampler, eos_id, pad_id, config, n_steps):
    """Up to min(limit, n_steps) decode steps, stopping once every row is done.

    Returns (state, tokens_BN with `pad_id` in steps not run, steps run).
    """
    B = state.token_B.shape[0]
    limit = jnp.minimum(limit, n_steps)

    def running(carry) -> jax.Array:
        state, _, i = carry
        return (i < limit) & ~jnp.all(state.done_B)

    def step(carry):
        state, out_BN, i = carry
        logits_B1V, cache = forward_cached(
            params, state.token_B[:, None], config, state.cache, state.slot, state.kv_start_B
        )
        key = None if keys_N is None else keys_N[i]
        tok_B, done_B = _pick(sampler, logits_B1V[:, 0], key, state.done_B, eos_id, pad_id)
        out_BN = jax.lax.dynamic_update_slice(out_BN, tok_B[:, None], (0, i))
        return DecodeState(cache, tok_B, done_B, state.slot + 1, state.kv_start_B), out_BN, i + 1

    out_BN = jnp.full((B, n_steps), pad_id, jnp.int32)
    return jax.lax.while_loop(running, step, (state, out_BN, jnp.int32(0)))


# --------------------------------------------------------------------------- compiled entry points


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def decode_padded(
    params: Params,
    tokens_BT: jax.Array,
    kv_start_B: jax.Array,
    keys_N: jax.Array | None,
    sampler: Sampler,
    eos_id: jax.Array,
    pad_id: jax.Array,
    done_B: jax.Array | None = None,
    *,
    config: GPTConfig,
    max_new_tokens: int,
) -> jax.Array:
    """The whole decode of a left-padded batch in one compiled call: new tokens `[B, N]`.

    Args:
      params: model parameters.
      tokens_BT: prompts, left-padded to a common length T (pad slots hold any valid id).
      kv_start_B: first real slot of each row (T - prompt length); slots before it are masked out
        of attention and positions count from it, so each row computes what it would alone.
      keys_N: one PRNG key per new token (`jax.random.split(key, N)`), or None for a sampler that
        needs none (greedy).
      sampler: a `jaxgpt.sampling` sampler (a pytree: its numeric settings are traced).
      eos_id: int32 scalar; a row that samples it stops (-1: never). Once every row has stopped
        the loop ends; the steps not run hold `pad_id`.
      pad_id: int32 scalar written after a row's EOS.
      done_B: rows already finished (default: none).
      config, max_new_tokens: static.
    """
    B, T = tokens_BT.shape
    done_B = jnp.zeros((B,), bool) if done_B is None else done_B
    first_key = None if keys_N is None else keys_N[0]
    # The last sampled token is never fed back, so the cache needs T + N - 1 slots.
    cache_len = T + max_new_tokens - 1
    state = _prefill(
        params, tokens_BT, kv_start_B, first_key, done_B, sampler, eos_id, pad_id, config, cache_len
    )
    if max_new_tokens == 1:
        return state.token_B[:, None]
    rest_keys = None if keys_N is None else keys_N[1:]
    n = max_new_tokens - 1
    _, rest_BN, _ = _loop(params, state, rest_keys, n, sampler, eos_id, pad_id, config, n)
    return jnp.concatenate([state.token_B[:, None], rest_BN], axis=1)


_prefill_jit = jax.jit(_prefill, static_argnames=("config", "cache_len"))


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _extend_jit(params, cache, slot, tokens_BT, kv_start_B, *, config):
    logits_B1V, cache = forward_cached(
        params, tokens_BT, config, cache, slot, kv_start_B, last_only=True
    )
    return logits_B1V[:, 0], cache


@functools.partial(jax.jit, static_argnames=("config", "n_steps"), donate_argnames=("state",))
def _decode_steps_jit(params, state, keys_N, limit, sampler, eos_id, pad_id, *, config, n_steps):
    return _loop(params, state, keys_N, limit, sampler, eos_id, pad_id, config, n_steps)


def extend(
    params: Params,
    config: GPTConfig,
    cache: KVCache,
    slot: int,
    tokens_BT: Any,
    kv_start_B: Any = None,
) -> tuple[jax.Array, KVCache]:
    """Write `tokens_BT` into the cache at slots `slot ... slot + T - 1`; return (logits_BV, cache).

    The logits are those of the last new token (what the next token is sampled from). Earlier
    slots are attended to, never recomputed: a chat's next turn costs its own tokens only. The
    cache passed in is donated (its buffers are reused): keep only the returned one.

    Args:
      cache: from `init_cache(config, B, S)` or a previous `extend` / `decode_steps`.
      slot: the first free slot (0 for an empty cache; `int(state.slot)` after `decode_steps`).
      tokens_BT: int token ids `[B, T]`.
      kv_start_B: first real slot of each row (default: 0 for every row).

    Raises:
      InputError: tokens of the wrong shape, or slot + T beyond the cache or the model's context.
    """
    tokens_BT = np.asarray(tokens_BT)
    if tokens_BT.ndim != 2 or tokens_BT.shape[1] == 0:
        raise InputError(f"tokens_BT must be a non-empty [B, T] array, got {tokens_BT.shape}")
    capacity = min(cache[0][0].shape[1], config.block_size)
    if not 0 <= int(slot) <= capacity - tokens_BT.shape[1]:
        raise InputError(
            f"{tokens_BT.shape[1]} tokens at slot {int(slot)} do not fit: the cache holds "
            f"{capacity} positions (the model's block_size is {config.block_size})"
        )
    if kv_start_B is None:
        kv_start_B = np.zeros((tokens_BT.shape[0],), np.int32)
    return _extend_jit(
        params, cache, jnp.int32(slot), jnp.asarray(tokens_BT, jnp.int32),
        jnp.asarray(kv_start_B, jnp.int32), config=config,
    )  # fmt: skip


def decode_steps(
    params: Params,
    config: GPTConfig,
    state: DecodeState,
    n_steps: int,
    *,
    sampler: Sampler,
    keys_N: jax.Array | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    limit: int | None = None,
) -> tuple[DecodeState, jax.Array, jax.Array]:
    """Run up to `n_steps` decode steps from `state`; stop early once every row is done.

    Returns (new state, tokens `[B, n_steps]` with `pad_id` in the steps not run, steps run).
    `state` is donated: use the returned one. Compiled once per `n_steps` (static); `limit` (at
    most n_steps, default n_steps) caps the steps without recompiling. `keys_N` holds one key
    per step (length n_steps) for a random sampler. The cache must have room for the steps.
    """
    limit = n_steps if limit is None else limit
    return _decode_steps_jit(
        params, state, keys_N, np.int32(limit), sampler,
        np.int32(_NO_EOS if eos_id is None else eos_id), np.int32(pad_id),
        config=config, n_steps=n_steps,
    )  # fmt: skip


# --------------------------------------------------------------------------- checking the input


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
    slide: bool = False,
) -> tuple[list[np.ndarray], str, int]:
    """What `generate` checks before any work: InputError for a request no model call can serve.

    Returns (prompts, their input form, max_new_tokens as an int); callers that print before
    generating (the CLI) call it first, so an error is the only thing they print. With `slide`,
    prompt + max_new_tokens may exceed the context (the sliding-window policy above).
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
    if not slide and longest + max_new_tokens > config.block_size:
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
            + " (or pass slide=True to slide the context window)"
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


@struct.dataclass
class _Job:
    """A validated generation request."""

    prompts: list = struct.field(pytree_node=False)
    kind: str = struct.field(pytree_node=False)
    max_new_tokens: int = struct.field(pytree_node=False)
    keys_N: Any = None
    sampler: Any = None
    eos_id: int = struct.field(pytree_node=False, default=_NO_EOS)
    pad_id: int = struct.field(pytree_node=False, default=0)
    slide: bool = struct.field(pytree_node=False, default=False)


def _prepare(
    params, config, prompt_tokens, max_new_tokens, key, temperature, top_k, top_p, eos_id,
    pad_id, sampler, slide,
) -> _Job:  # fmt: skip
    if sampler is None:
        sampler = make_sampler(temperature, top_k, top_p)
    prompts, kind, max_new_tokens = check_request(
        config, prompt_tokens, max_new_tokens, eos_id=eos_id, pad_id=pad_id, slide=slide
    )
    check_params(params, config)
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    keys_N = None if key is None else jax.random.split(key, max_new_tokens)
    return _Job(
        prompts=prompts, kind=kind, max_new_tokens=max_new_tokens, keys_N=keys_N,
        sampler=sampler, eos_id=_NO_EOS if eos_id is None else int(eos_id), pad_id=int(pad_id),
        slide=bool(slide),
    )  # fmt: skip


# --------------------------------------------------------------------------- windows and chunks


def _window(params, config, job, tokens_BT, kv_start_B, keys, done_B, n, chunk):
    """One context window: `n` new tokens from a fresh cache, yielded as `[B, k]` arrays."""
    # numpy scalars: a jax.Array built per call costs more than a small model's decode step
    eos, pad = np.int32(job.eos_id), np.int32(job.pad_id)
    tokens_BT, kv_start_B = jnp.asarray(tokens_BT), jnp.asarray(kv_start_B)
    if chunk is None:  # everything in one compiled call
        new_BN = decode_padded(
            params, tokens_BT, kv_start_B, keys, job.sampler, eos, pad, jnp.asarray(done_B),
            config=config, max_new_tokens=n,
        )  # fmt: skip
        yield np.asarray(new_BN)
        return
    first_key = None if keys is None else keys[0]
    state = _prefill_jit(
        params, tokens_BT, kv_start_B, first_key, jnp.asarray(done_B), job.sampler, eos, pad,
        config=config, cache_len=tokens_BT.shape[1] + n - 1,
    )  # fmt: skip
    yield np.asarray(state.token_B)[:, None]
    made = 1
    while made < n and not np.asarray(state.done_B).all():
        step_keys = None
        if keys is not None:
            step_keys = keys[made : made + chunk]
            if step_keys.shape[0] < chunk:  # the last chunk: fill up (the extra keys go unused)
                fill = jnp.repeat(step_keys[-1:], chunk - step_keys.shape[0], axis=0)
                step_keys = jnp.concatenate([step_keys, fill])
        state, out_BN, steps = _decode_steps_jit(
            params, state, step_keys, np.int32(min(chunk, n - made)), job.sampler, eos, pad,
            config=config, n_steps=chunk,
        )  # fmt: skip
        steps = int(steps)
        if steps:
            yield np.asarray(out_BN)[:, :steps]
        made += steps


def _windows(params, config, job: _Job, chunk: int | None) -> Iterator[np.ndarray]:
    """The new tokens `[B, k]` in order, window after window (the sliding-window policy)."""
    seqs = [np.asarray(p, np.int32) for p in job.prompts]
    done_B = np.zeros((len(seqs),), bool)
    keep = max(1, config.block_size // 2)
    made = 0
    while made < job.max_new_tokens and not done_B.all():
        context = seqs
        if max(len(s) for s in seqs) >= config.block_size:  # only with slide=True
            context = [s[-keep:] for s in seqs]
        n = min(job.max_new_tokens - made, config.block_size - max(len(c) for c in context))
        tokens_BT, kv_start_B = left_pad(context, job.pad_id)
        keys = None if job.keys_N is None else job.keys_N[made : made + n]
        for new_Bk in _window(params, config, job, tokens_BT, kv_start_B, keys, done_B, n, chunk):
            if job.slide:
                seqs = [np.concatenate([s, row]) for s, row in zip(seqs, new_Bk)]
            done_B |= (new_Bk == job.eos_id).any(axis=1)
            made += new_Bk.shape[1]
            yield new_Bk


# --------------------------------------------------------------------------- the public functions

_SETTINGS_DOC = """
      params, config: the model (`init_params` / `load_hf` / a training checkpoint).
      prompt_tokens: one prompt (a list of ints or a 1-D array), a batch of equal-length prompts
        (a 2-D array `[B, T]`), or a ragged batch (a list of lists).
      max_new_tokens: tokens to add.
      key: PRNG key for sampling (`jax.random.key(seed)`); the same key gives the same tokens.
        Not needed for greedy decoding.
      temperature: 0 means greedy; otherwise logits are divided by it before sampling.
      top_k: sample only among the k most likely tokens (ties with the k-th kept).
      top_p: nucleus sampling: the smallest set of most likely tokens with mass > top_p.
      eos_id: a row that emits this id stops; its later tokens are `pad_id`. When every row has
        stopped, generation ends (no further steps are computed).
      pad_id: filler after EOS (default: `eos_id`, else 0).
      sampler: a sampler object (see `jaxgpt.sampling`) to use instead of
        temperature / top_k / top_p — the way to plug in a new strategy.
      slide: allow prompt + max_new_tokens beyond `config.block_size` by sliding the context
        window (the policy in this module's docstring). Without it such a request is an error.
"""


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
    slide: bool = False,
) -> np.ndarray | list:
    """Continue each prompt by `max_new_tokens` tokens; returns prompt + generated tokens.

    Args:{settings}
    Returns, matching the input's form:
      * a 1-D or 2-D int32 numpy array → an array `[T + N]` / `[B, T + N]`; after a row's EOS the
        array holds `pad_id`;
      * a list of ints → a list of ints; a list of lists → a list of lists, each its prompt plus
        its new tokens up to and including EOS (padding dropped, so lengths may differ).

    Raises:
      InputError: empty prompt, ids outside the vocabulary, bad sampling settings, or
        prompt length + max_new_tokens > config.block_size without `slide=True`.
    """
    job = _prepare(
        params, config, prompt_tokens, max_new_tokens, key, temperature, top_k, top_p, eos_id,
        pad_id, sampler, slide,
    )  # fmt: skip
    new_BN = np.full((len(job.prompts), job.max_new_tokens), job.pad_id, np.int32)
    made = 0
    for new_Bk in _windows(params, config, job, chunk=None):
        new_BN[:, made : made + new_Bk.shape[1]] = new_Bk
        made += new_Bk.shape[1]

    if job.kind in ("array1", "array2"):
        tokens_BT, _ = left_pad(job.prompts, job.pad_id)
        out_BT = np.concatenate([tokens_BT, new_BN], axis=1)
        return out_BT[0] if job.kind == "array1" else out_BT
    rows = []
    for prompt, new_N in zip(job.prompts, new_BN):
        new = new_N.tolist()
        if job.eos_id in new:
            new = new[: new.index(job.eos_id) + 1]
        rows.append([int(t) for t in prompt] + new)
    return rows[0] if job.kind == "list" else rows


def stream_generate(
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
    slide: bool = False,
    chunk: int = 1,
) -> Iterator[np.ndarray]:
    """Generate like `generate`, yielding the new tokens as soon as they exist.

    Args:{settings}      chunk: decode steps per compiled call (a yield after each). 1 streams
        every token; larger chunks cost fewer host round trips (docs/generation.md).

    Yields int32 arrays `[B, k]` (k >= 1): the next k new tokens of every row (`pad_id` after a
    row's EOS). Concatenated they equal `generate`'s new tokens (with the same key), except that
    the stream ends as soon as every row has emitted EOS.
    """
    if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
        raise InputError(f"chunk must be an integer >= 1, got {chunk!r}")
    job = _prepare(
        params, config, prompt_tokens, max_new_tokens, key, temperature, top_k, top_p, eos_id,
        pad_id, sampler, slide,
    )  # fmt: skip
    yield from _windows(params, config, job, chunk=int(chunk))


generate.__doc__ = generate.__doc__.format(settings=_SETTINGS_DOC)
stream_generate.__doc__ = stream_generate.__doc__.format(settings=_SETTINGS_DOC)
