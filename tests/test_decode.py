"""Generation: cached decoding vs naive re-running of `forward`, parity with transformers'
`generate`, ragged batches, EOS, seeding, pluggable samplers, streaming, early stop, the
cache-reuse pieces (`extend`, `decode_steps`), the sliding window, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from jaxgpt.decode import (
    DecodeState,
    decode_padded,
    decode_steps,
    extend,
    generate,
    stream_generate,
)
from jaxgpt.errors import InputError
from jaxgpt.model import init_cache
from jaxgpt.pretrained import load_hf
from jaxgpt.sampling import make_sampler

N_NEW = 40  # new tokens per test: >= 32, and prompt + N_NEW fits hf_tiny's 64 positions


@pytest.fixture(scope="module")
def model(hf_tiny):
    """(config, params) of the tiny transformers GPT-2 (weights std 0.2), loaded via load_hf."""
    return load_hf(hf_tiny[1])


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(3)
    return rng.randint(1, 320, size=(2, 12)).astype(np.int32)


def naive_decode(params, config, tokens_BT, n_new, sampler, key, jit_forward):
    """Reference: re-run the full `forward` over the whole sequence for every new token.

    The sequence lives in a fixed-size buffer (right-padded; causality makes the padding
    irrelevant to the logits read at position t - 1), so `forward` compiles once.
    """
    B, T = tokens_BT.shape
    buf = np.zeros((B, T + n_new), np.int32)
    buf[:, :T] = tokens_BT
    keys = jax.random.split(key, n_new) if key is not None else [None] * n_new
    for i in range(n_new):
        logits = jit_forward(params, jnp.asarray(buf), config)
        buf[:, T + i] = np.asarray(sampler(logits[:, T + i - 1], keys[i]))
    return buf


@pytest.mark.parametrize("temperature, top_k, seed", [(0.0, None, None), (1.0, 20, 5)])
def test_cached_equals_naive(model, prompts, jit_forward, temperature, top_k, seed):
    config, params = model
    sampler = make_sampler(temperature, top_k)
    key = None if seed is None else jax.random.key(seed)
    ours = generate(params, config, prompts, N_NEW, key=key, sampler=sampler)
    naive = naive_decode(params, config, prompts, N_NEW, sampler, key, jit_forward)
    assert ours.shape == (2, 12 + N_NEW)
    np.testing.assert_array_equal(ours, naive)
    assert len(np.unique(ours[:, 12:])) > 5  # a real continuation, not one repeated token


def test_greedy_matches_transformers_generate(hf_tiny, model, prompts):
    torch = pytest.importorskip("torch")
    hf_model, _ = hf_tiny
    config, params = model
    with torch.no_grad():
        theirs = hf_model.generate(
            torch.tensor(prompts, dtype=torch.long),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            do_sample=False,
            max_new_tokens=N_NEW,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    ours = generate(params, config, prompts, N_NEW, temperature=0)
    assert theirs.shape == ours.shape == (2, 12 + N_NEW)
    np.testing.assert_array_equal(ours, theirs)


def test_ragged_batch_equals_each_prompt_alone(model):
    config, params = model
    rng = np.random.RandomState(4)
    # Lengths 3 and 12: the batch has the [2, 12] shape of the other tests (one compilation).
    prompts = [rng.randint(1, 320, size=n).tolist() for n in (3, 12)]
    batch = generate(params, config, prompts, N_NEW, temperature=0)
    assert [len(row) for row in batch] == [3 + N_NEW, 12 + N_NEW]
    for prompt, row in zip(prompts, batch):
        assert row[: len(prompt)] == prompt
        assert row == generate(params, config, prompt, N_NEW, temperature=0)


def test_eos_stops_a_row_and_pads_it(model, prompts):
    config, params = model
    free = generate(params, config, prompts, N_NEW, temperature=0)
    # Make row 0's 6th new token the EOS id, provided it did not appear earlier in either row.
    eos = int(free[0, 12 + 5])
    assert eos not in free[0, 12 : 12 + 5]
    stopped = generate(params, config, prompts, N_NEW, temperature=0, eos_id=eos, pad_id=7)
    np.testing.assert_array_equal(stopped[0, : 12 + 6], free[0, : 12 + 6])
    assert (stopped[0, 12 + 6 :] == 7).all()
    # Row 1 stops at its own first EOS (if any) and is otherwise untouched.
    new1 = free[1, 12:].tolist()
    end1 = new1.index(eos) + 1 if eos in new1 else N_NEW
    np.testing.assert_array_equal(stopped[1, : 12 + end1], free[1, : 12 + end1])
    assert (stopped[1, 12 + end1 :] == 7).all()
    # The list form drops the padding: prompt + tokens up to and including EOS.
    as_lists = generate(params, config, prompts.tolist(), N_NEW, temperature=0, eos_id=eos)
    assert as_lists[0] == free[0, : 12 + 6].tolist() and as_lists[0][-1] == eos


def test_same_key_same_tokens_different_key_different(model, prompts):
    config, params = model
    a = generate(params, config, prompts, N_NEW, key=jax.random.key(1), top_k=20)
    b = generate(params, config, prompts, N_NEW, key=jax.random.key(1), top_k=20)
    c = generate(params, config, prompts, N_NEW, key=jax.random.key(2), top_k=20)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(a[:, :12], prompts)


@struct.dataclass
class AlwaysToken:
    """A researcher's strategy: plugged in without touching the loop."""

    token: int

    def __call__(self, logits_BV, key):
        return jnp.full(logits_BV.shape[:1], self.token, jnp.int32)


def test_custom_sampler(model, prompts):
    config, params = model
    out = generate(params, config, prompts[:, :4], 3, sampler=AlwaysToken(9))
    np.testing.assert_array_equal(out[:, 4:], 9)


@pytest.mark.parametrize(
    "prompt, kwargs, match",
    [
        ([], {}, "empty"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([1, 320], {}, "token id 320"),
        ([1, -1], {}, "token id -1"),
        ([1, 2], dict(temperature=-1.0), "temperature"),
        ([1, 2], dict(top_k=0), "top_k"),
        ([1, 2], dict(top_p=0.0), "top_p"),
        ([1, 2], dict(top_p=1.01), "top_p"),
        ([1, 2], dict(max_new_tokens=0), "max_new_tokens"),
        ([1] * 30, dict(max_new_tokens=40), "keep only the last 24 prompt tokens"),
        ([1] * 30, dict(max_new_tokens=40), "slide=True"),
        ([1, 2], dict(eos_id=999), "eos_id"),
        (np.zeros((1, 2, 3), np.int32), {}, "1-D"),
        ("hello", {}, "token ids"),
    ],
)
def test_bad_input(model, prompt, kwargs, match):
    config, params = model
    n_new = kwargs.pop("max_new_tokens", 4)
    with pytest.raises(InputError, match=match):
        generate(params, config, prompt, n_new, **kwargs)


def test_sampling_without_key_is_an_error(model):
    config, params = model
    with pytest.raises(InputError, match="key"):
        generate(params, config, [1, 2], 2, temperature=1.0)


@pytest.mark.parametrize("rows", [1, 2])
def test_decode_loop_never_copies_the_kv_cache(model, prompts, rows):
    """At batch 1 and 2 the compiled loop updates each layer's cache in place (see
    `jaxgpt.model.init_cache` and the comment on the cache in `causal_self_attention`): no HLO
    `copy` of a cache-shaped array (batch 1 had four per layer and token with a [B, H, S, K]
    cache)."""
    config, params = model
    prompts = prompts[:rows]
    B, T = prompts.shape
    n_new = 8
    compiled = decode_padded.lower(
        params, jnp.asarray(prompts), jnp.zeros((B,), jnp.int32), None,
        make_sampler(0.0), jnp.int32(-1), jnp.int32(0), config=config, max_new_tokens=n_new,
    ).compile()  # fmt: skip
    cache_shape = f"f32[{B * config.n_head},{T + n_new - 1},{config.head_dim}]"
    hlo = compiled.as_text()
    assert cache_shape in hlo  # the check below looks for the right shape
    copies = [line for line in hlo.splitlines() if f"= {cache_shape}" in line and " copy(" in line]
    assert copies == []


# --------------------------------------------------------------------------- streaming


def hf_greedy(hf_model, prompts, n_new):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return hf_model.generate(
            torch.tensor(prompts, dtype=torch.long),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            do_sample=False, max_new_tokens=n_new, eos_token_id=None, pad_token_id=0,
        ).numpy()  # fmt: skip


def test_greedy_stream_equals_generate_equals_transformers(hf_tiny, model, prompts):
    config, params = model
    chunk = 7  # 39 steps after the prefill: five chunks of 7 and a last one of 4
    pieces = list(stream_generate(params, config, prompts, N_NEW, temperature=0, chunk=chunk))
    # The first token comes from the prefill, then `chunk` tokens per compiled call.
    assert pieces[0].shape == (2, 1)
    assert [p.shape[1] for p in pieces[1:]] == [chunk] * ((N_NEW - 1) // chunk) + (
        [(N_NEW - 1) % chunk] if (N_NEW - 1) % chunk else []
    )
    streamed = np.concatenate([prompts, *pieces], axis=1)
    np.testing.assert_array_equal(streamed, generate(params, config, prompts, N_NEW, temperature=0))
    np.testing.assert_array_equal(streamed, hf_greedy(hf_tiny[0], prompts, N_NEW))


def test_sampled_stream_equals_generate(model, prompts):
    config, params = model
    key = jax.random.key(5)
    pieces = stream_generate(params, config, prompts, N_NEW, key=key, top_k=20, chunk=7)
    np.testing.assert_array_equal(
        np.concatenate([prompts, *pieces], axis=1),
        generate(params, config, prompts, N_NEW, key=key, top_k=20),
    )


def test_stream_stops_when_every_row_has_finished(model, prompts):
    config, params = model
    free = generate(params, config, prompts[:1], N_NEW, temperature=0)[0, 12:].tolist()
    # The EOS: the first new token that did not appear earlier, at least 10 tokens in.
    at = next(i for i in range(10, N_NEW) if free[i] not in free[:i])
    pieces = list(stream_generate(params, config, prompts[:1], N_NEW, temperature=0, chunk=4,
                                  eos_id=free[at]))  # fmt: skip
    streamed = np.concatenate(pieces, axis=1)[0].tolist()
    assert streamed == free[: at + 1]  # stopped right after the EOS, inside a chunk
    # A batch whose rows all finish at the first token: nothing more is computed.
    pieces = stream_generate(
        params, config, prompts, N_NEW, sampler=AlwaysToken(9), eos_id=9, chunk=4
    )
    assert sum(p.shape[1] for p in pieces) == 1


def test_decode_steps_counts_the_steps_it_ran(model, prompts):
    """The loop is a `lax.while_loop`: after every row's EOS no further step is computed."""
    config, params = model
    free = generate(params, config, prompts, N_NEW, temperature=0)[:, 12:]
    # The EOS: the first token of row 0 from new-token index 10 on that neither row emitted
    # before; row 1 emits it later or never.
    at = next(i for i in range(10, N_NEW) if free[0, i] not in free[:, :i])
    eos = int(free[0, at])
    row1 = free[1].tolist()
    last = max(at, row1.index(eos) if eos in row1 else N_NEW)

    def run(eos_id):
        cache = init_cache(config, 2, 12 + N_NEW)
        logits_BV, cache = extend(params, config, cache, 0, prompts)
        token_B = jnp.argmax(logits_BV, -1).astype(jnp.int32)
        done_B = token_B == (-1 if eos_id is None else eos_id)
        state = DecodeState(cache, token_B, done_B, jnp.int32(12), jnp.zeros(2, jnp.int32))
        return decode_steps(params, config, state, N_NEW - 1, sampler=make_sampler(0.0),
                            eos_id=eos_id)  # fmt: skip

    _, out, steps = run(None)
    assert int(steps) == N_NEW - 1
    np.testing.assert_array_equal(out, free[:, 1:])
    _, out, steps = run(eos)
    if last < N_NEW:
        assert int(steps) == last  # step i produces new token i + 1
    np.testing.assert_array_equal(out[0, :at], free[0, 1 : at + 1])


# --------------------------------------------------------------------------- cache reuse (chat)


def test_extend_continues_a_cache_without_recomputing_it(model, jit_forward):
    """Turn 1 prefilled, then turn 2 appended at the next slot: the logits and the greedy
    continuation equal those of the whole conversation run at once."""
    config, params = model
    rng = np.random.RandomState(7)
    turn1, turn2 = rng.randint(1, 320, (1, 9)), rng.randint(1, 320, (1, 6))
    whole = np.concatenate([turn1, turn2], axis=1)
    cache = init_cache(config, 1, config.block_size)
    logits1, cache = extend(params, config, cache, 0, turn1)
    logits2, cache = extend(params, config, cache, 9, turn2)
    reference = jit_forward(params, jnp.asarray(whole), config)
    np.testing.assert_allclose(logits1, reference[:, 8], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logits2, reference[:, 14], atol=1e-4, rtol=1e-4)
    token = jnp.argmax(logits2, -1).astype(jnp.int32)
    first = int(token[0])  # read it now: decode_steps donates the state (token included)
    state = DecodeState(cache, token, jnp.zeros(1, bool), jnp.int32(15), jnp.zeros(1, jnp.int32))
    state, out, _ = decode_steps(params, config, state, 8, sampler=make_sampler(0.0))
    expected = generate(params, config, whole, 9, temperature=0)[0, 15:]
    assert [first, *np.asarray(out[0]).tolist()] == expected.tolist()
    assert int(state.slot) == 15 + 8
    with pytest.raises(InputError, match="do not fit"):
        extend(params, config, state.cache, int(state.slot), np.ones((1, 50), np.int32))


# --------------------------------------------------------------------------- sliding window


def windowed_reference(params, config, prompt, n_new, sampler, key, jit_forward):
    """The documented policy, token by token with the full `forward`: the model sees the
    sequence from `start`; when that reaches block_size tokens, `start` moves so that the last
    block_size // 2 tokens remain."""
    S, keep = config.block_size, config.block_size // 2
    seq = list(prompt)
    start = 0 if len(seq) < S else len(seq) - keep
    keys = jax.random.split(key, n_new) if key is not None else [None] * n_new
    for i in range(n_new):
        if len(seq) - start >= S:
            start = len(seq) - keep
        window = seq[start:]
        buf = np.zeros((1, S), np.int32)  # right-padded to one shape: one compilation
        buf[0, : len(window)] = window
        logits = jit_forward(params, jnp.asarray(buf), config)[:, len(window) - 1]
        seq.append(int(sampler(logits, keys[i])[0]))
    return seq


# Prompt 12 + 84 new: 52 tokens fill the context of 64, then a window from the last 32 gives 32.
# Prompt 70 (longer than the context): two windows of 32 + 32, each from the last 32 tokens.
@pytest.mark.parametrize("prompt_len, n_new, seed", [(12, 84, None), (70, 64, 3)])
def test_sliding_window_follows_the_policy(model, jit_forward, prompt_len, n_new, seed):
    config, params = model  # block_size 64
    prompt = np.random.RandomState(8).randint(1, 320, prompt_len).tolist()
    sampler = make_sampler(0.0 if seed is None else 1.0, 20)
    key = None if seed is None else jax.random.key(seed)
    ours = generate(params, config, prompt, n_new, sampler=sampler, key=key, slide=True)
    assert ours == windowed_reference(params, config, prompt, n_new, sampler, key, jit_forward)
    if seed is None:
        streamed = stream_generate(params, config, prompt, n_new, temperature=0, slide=True)
        assert prompt + np.concatenate(list(streamed), axis=1)[0].tolist() == ours
