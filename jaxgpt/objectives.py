"""Training objectives: the small pure part that differs between stages of the one training loop.

An objective is a pure function

    objective(params, batch, config, key) -> (loss, weight)

`batch` is one micro-batch as the stage's data source makes it (an int32 `[B, T+1]` array of
token windows for pretraining; a dict of packed `[B, T+1]` arrays for SFT, see
`jaxgpt.packing`); `key` is the dropout key (None: no dropout); `loss` is the mean over the
`weight` predictions the batch trains (a float32 scalar). The train step
(`jaxgpt.train.make_train_step`) weighs micro-batches by `weight`, so gradient accumulation gives
the mean over every trained token of the whole step, however they fall into micro-batches.

    next_token   pretraining: every next token of every window
    sft          supervised fine-tuning: only the tokens the assistant says (the chat mask),
                 on conversations packed into rows without attending across them
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import GPTConfig
from jaxgpt.errors import ConfigError
from jaxgpt.model import forward
from jaxgpt.packing import loss_weights
from jaxgpt.params import Params

Objective = Callable[[Params, Any, GPTConfig, "jax.Array | None"], tuple[jax.Array, jax.Array]]


def masked_mean(values_BT: jax.Array, weights_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Σ values·weights / Σ weights, Σ weights); 0 loss when nothing is weighted."""
    weights_BT = weights_BT.astype(jnp.float32)
    count = weights_BT.sum()
    return (values_BT * weights_BT).sum() / jnp.maximum(count, 1.0), count


def next_token(
    params: Params, batch_BT1: jax.Array, config: GPTConfig, key: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy (nats) of `forward` on `[B, T+1]` windows."""
    inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
    logits_BTV = forward(params, inputs_BT, config, train=key is not None, key=key)
    loss_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    return loss_BT.mean(), jnp.float32(loss_BT.size)


def sft(
    params: Params, batch: dict[str, jax.Array], config: GPTConfig, key: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy over the masked (assistant) tokens of packed conversations.

    `batch` holds `tokens`, `segments`, `positions` and `mask`, each `[B, T+1]` (see
    `jaxgpt.packing.get_packed_batch`). Each conversation attends only within itself and its
    positions restart at 0, so packing changes no conversation's loss.
    """
    tokens_BT1, segments_BT1 = batch["tokens"], batch["segments"]
    logits_BTV = forward(
        params, tokens_BT1[:, :-1], config, train=key is not None, key=key,
        positions_BT=batch["positions"][:, :-1], segment_ids_BT=segments_BT1[:, :-1],
    )  # fmt: skip
    loss_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT1[:, 1:])
    return masked_mean(loss_BT, loss_weights(batch["mask"], segments_BT1))


OBJECTIVES: dict[str, Objective] = {"next_token": next_token, "sft": sft}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]
