"""Supervised fine-tuning: the masked loss on packed conversations."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxgpt.config import GPTConfig
from jaxgpt.objectives import sft
from jaxgpt.packing import Documents, pack
from jaxgpt.params import init_params

CONFIG = GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CONFIG, jax.random.key(0))


def test_each_conversation_has_the_same_loss_packed_and_alone(params):
    rng = np.random.default_rng(0)
    lengths = [9, 12, 7]
    tokens = rng.integers(0, CONFIG.vocab_size, sum(lengths)).astype(np.int32)
    mask = (rng.random(sum(lengths)) < 0.6).astype(np.uint8)
    docs = Documents(tokens, mask, np.concatenate([[0], np.cumsum(lengths)]))
    loss = jax.jit(sft, static_argnums=2)

    packed = pack(docs, np.arange(3), rows=1, row_len=CONFIG.block_size + 1)
    assert packed.segments[0].max() == 3  # all three in one row
    total, count = loss(params, packed.as_dict(), CONFIG, None)
    alone = [loss(params, pack(docs, np.array([i]), 1, CONFIG.block_size + 1).as_dict(),
                  CONFIG, None) for i in range(3)]  # fmt: skip
    counts = np.array([float(c) for _, c in alone])
    losses = np.array([float(v) for v, _ in alone])
    assert float(count) == counts.sum() > 0
    # The packed mean is the count-weighted mean of each conversation's own mean.
    np.testing.assert_allclose(float(total), (losses * counts).sum() / counts.sum(), rtol=1e-5)
    # And it is not what attending across conversations would give.
    crossing = dict(packed.as_dict(), segments=np.where(packed.segments > 0, 1, 0))
    crossing["positions"] = np.where(crossing["segments"] > 0, np.arange(33), 0)
    leaked, _ = loss(params, crossing, CONFIG, None)
    assert abs(float(leaked) - float(total)) > 1e-4
