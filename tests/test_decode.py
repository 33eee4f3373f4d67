"""Generation: cached decoding vs naive re-running of `forward`, parity with transformers'
`generate`, ragged batches, EOS, seeding, pluggable samplers, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from jaxgpt.decode import decode_padded, generate
from jaxgpt.errors import InputError
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


def test_decode_loop_never_copies_the_kv_cache(model, prompts):
    """At batch 2 the compiled loop updates each layer's cache in place (see the comment on the
    cache in `jaxgpt.model.causal_self_attention`): no HLO `copy` of a cache-shaped array."""
    config, params = model
    B, T = prompts.shape
    n_new = 8
    compiled = decode_padded.lower(
        params, jnp.asarray(prompts), jnp.zeros((B,), jnp.int32), None,
        make_sampler(0.0), jnp.int32(-1), jnp.int32(0), config=config, max_new_tokens=n_new,
    ).compile()  # fmt: skip
    cache_shape = f"f32[{B},{config.n_head},{T + n_new - 1},{config.head_dim}]"
    hlo = compiled.as_text()
    assert cache_shape in hlo  # the check below looks for the right shape
    copies = [line for line in hlo.splitlines() if f"= {cache_shape}" in line and " copy(" in line]
    assert copies == []
