"""Packed sequences: segment ids in the one attention rule, every backend, and the whole model.

A row may pack several independent sequences (conversations, for supervised fine-tuning): with
`segment_ids` a token attends only to earlier tokens of its own segment, and with positions that
restart per segment, each packed sequence must get exactly the logits it gets alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.attention import attention_mask, multi_head_attention, reference_attention
from jaxgpt.config import get_preset
from jaxgpt.errors import ConfigError, InputError
from jaxgpt.kernels import BlockSizes, decode_attention, flash_attention
from jaxgpt.kernels.flash_attention import allowed_mask
from jaxgpt.model import forward
from jaxgpt.params import param_shapes

BLOCKS = BlockSizes(16, 16)


def segments_of(lengths: list[int]) -> np.ndarray:
    """Segment ids `[sum(lengths)]`: 0 for the first `lengths[0]` slots, 1 for the next, ..."""
    return np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)


def positions_of(lengths: list[int]) -> np.ndarray:
    """Positions restarting at 0 at the start of each segment."""
    return np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)


def random_qkv(B, H, T, S, D, seed=0):
    rng = np.random.RandomState(seed)
    q, k, v = (jnp.asarray(rng.randn(B, H, n, D), jnp.float32) for n in (T, S, S))
    return q, k, v, jnp.asarray(rng.randn(B, H, T, D), jnp.float32)


def value_and_grads(attend, q, k, v, cotangent):
    """(out, (dq, dk, dv)) with the gradients of <out, cotangent>, in one compile."""

    def loss(q, k, v):
        out = attend(q, k, v)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def test_mask_is_causal_within_segments_only():
    seg_BS = jnp.asarray([segments_of([2, 3])], jnp.int32)
    mask = np.asarray(attention_mask(0, 5, 5, jnp.zeros((1,), jnp.int32), seg_BS)[0])
    expected = np.array(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)


def test_kernel_tile_rule_equals_the_reference_mask():
    """The Pallas tiles' `allowed_mask` and `attention_mask` give the same [T, S] mask, with a
    cache offset, a row start and segments all at once."""
    T, S, q_offset, kv_start = 6, 20, 14, 3
    seg_S = segments_of([5, 7, 8])
    mask = attention_mask(q_offset, T, S, jnp.asarray([kv_start]), jnp.asarray(seg_S[None]))[0]
    q_slot_T1 = q_offset + np.arange(T)[:, None]
    tile = allowed_mask(
        q_slot_T1, np.arange(S)[None, :], kv_start, seg_S[q_slot_T1], seg_S[None, :]
    )
    np.testing.assert_array_equal(np.asarray(tile), np.asarray(mask))


# (B, H, T, S, D), q_offset, kv_start_B, segment lengths per row (summing to S)
CASES = {
    # 3 blocks of 16 with a tail; row 0's second segment (slots 7..30) crosses two block
    # boundaries, row 1 has a one-token segment and a segment starting exactly on a block.
    "ragged-across-blocks": ((2, 2, 40, 40, 16), 0, None, [[7, 24, 9], [1, 15, 16, 8]]),
    # A cache: 9 queries at slots 28..36 of 37, left-padded row 1, segments over the key slots.
    "cache-offset": ((2, 2, 9, 37, 16), 28, [0, 5], [[20, 17], [12, 19, 6]]),
}


@pytest.mark.parametrize("case", CASES)
def test_flash_kernel_with_segments_matches_the_xla_path(case):
    (B, H, T, S, D), q_offset, kv_start, lengths = CASES[case]
    q, k, v, cotangent = random_qkv(B, H, T, S, D)
    seg_BS = jnp.asarray(np.stack([segments_of(n) for n in lengths]))
    kv_start_B = None if kv_start is None else jnp.asarray(kv_start, jnp.int32)
    kw = dict(q_offset=q_offset, kv_start_B=kv_start_B, segment_ids_BS=seg_BS)

    out, grads = value_and_grads(
        functools.partial(flash_attention, block_sizes=BLOCKS, **kw), q, k, v, cotangent
    )
    ref_out, ref_grads = value_and_grads(
        lambda q, k, v: reference_attention(q, k, v, **kw)[0], q, k, v, cotangent
    )
    for name, x, ref_x in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        scale = max(1.0, float(jnp.max(jnp.abs(ref_x))))
        assert max_err(x, ref_x) < 1e-5 * scale, name
    # The segments matter: without them the answer is different.
    plain = reference_attention(q, k, v, q_offset=q_offset, kv_start_B=kv_start_B)[0]
    assert max_err(plain, ref_out) > 1e-2


def test_packed_attention_equals_each_sequence_alone():
    """The XLA path with segments, against each segment's attention computed separately."""
    lengths = [5, 11, 8]
    q, k, v, _ = random_qkv(1, 2, 24, 24, 16, seed=1)
    seg_BS = jnp.asarray(segments_of(lengths)[None])
    packed, _ = reference_attention(q, k, v, segment_ids_BS=seg_BS)
    start = 0
    for n in lengths:
        alone, _ = reference_attention(*(x[:, :, start : start + n] for x in (q, k, v)))
        assert max_err(packed[:, :, start : start + n], alone) < 1e-6
        start += n


def test_decode_kernel_refuses_segments():
    q, k, v, _ = random_qkv(1, 1, 1, 8, 16)
    with pytest.raises(ConfigError, match="decode_attention takes no segment ids"):
        decode_attention(q, k, v, q_offset=3, segment_ids_BS=jnp.zeros((1, 8), jnp.int32))


def test_segment_ids_of_the_wrong_shape_are_a_clear_error():
    q, k, v, _ = random_qkv(2, 1, 4, 4, 16)
    with pytest.raises(InputError, match=r"segment ids must be an integer array \[B, S\]"):
        multi_head_attention(q, k, v, segment_ids_BS=jnp.zeros((2, 3), jnp.int32))


@pytest.fixture(scope="module")
def tiny_model():
    """(tiny config, random params with std 0.2 so attention is far from uniform)."""
    config = get_preset("tiny")
    rng = np.random.RandomState(0)
    params = jax.tree.map(
        lambda leaf: jnp.asarray(0.2 * rng.randn(*leaf.shape), leaf.dtype), param_shapes(config)
    )
    return config, params


def next_token_losses(logits_TV, tokens_T) -> np.ndarray:
    """Per-position cross-entropy of predicting token t+1 from position t."""
    logp_TV = jax.nn.log_softmax(logits_TV[:-1])
    return -np.asarray(jnp.take_along_axis(logp_TV, tokens_T[1:, None], axis=-1)[:, 0])


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_packed_conversations_get_the_logits_and_loss_they_get_alone(tiny_model, backend):
    """Three sequences (and a padding tail) packed in one row with restarting positions and
    segment ids: each one's logits and next-token loss equal running it alone, unpacked."""
    config, params = tiny_model
    config = config.replace(attention=backend)
    lengths = [7, 12, 9, 4]  # the last is padding: its own segment, never read
    tokens = np.random.RandomState(5).randint(0, config.vocab_size, sum(lengths)).astype(np.int32)
    run = jax.jit(forward, static_argnames=("config",))
    packed = run(
        params, tokens[None], config,
        positions_BT=jnp.asarray(positions_of(lengths)[None]),
        segment_ids_BT=jnp.asarray(segments_of(lengths)[None]),
    )[0]  # fmt: skip
    start = 0
    for n in lengths[:-1]:
        seq = tokens[start : start + n]
        alone = run(params, seq[None], config)[0]
        assert max_err(packed[start : start + n], alone) < 1e-4
        np.testing.assert_allclose(
            next_token_losses(packed[start : start + n], seq),
            next_token_losses(alone, seq),
            atol=1e-5,
        )
        start += n
    # Without segments the second sequence sees the first: its logits change.
    unsegmented = run(params, tokens[None], config, positions_BT=positions_of(lengths)[None])[0]
    assert max_err(unsegmented[7:19], packed[7:19]) > 1e-2


def test_forward_checks_positions_and_segment_ids(tiny_model):
    config, params = tiny_model
    tokens = np.zeros((1, 6), np.int32)
    with pytest.raises(InputError, match="positions_BT must be an integer array shaped like"):
        forward(params, tokens, config, positions_BT=np.zeros((1, 5), np.int32))
    with pytest.raises(InputError, match="segment_ids_BT must be an integer array shaped like"):
        forward(params, tokens, config, segment_ids_BT=np.zeros((1, 6), np.float32))
    with pytest.raises(InputError, match=r"positions_BT must lie in \[0, "):
        forward(params, tokens, config, positions_BT=np.full((1, 6), config.block_size))
