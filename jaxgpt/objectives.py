"""Training objectives: small pure losses over the model's logits.

* `next_token_loss` — pretraining: every position predicts the next token.
* `masked_next_token_loss` — supervised fine-tuning: only the positions whose target the mask
  marks (the assistant's tokens, `jaxgpt.chat`) count; it also returns how many did, the number
  SFT prints so that a dropped or inverted mask cannot go unnoticed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def next_token_loss(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats) of `logits_BTV` against the integer targets `targets_BT`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()


def masked_next_token_loss(
    logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over the positions where `mask_BT` is 1, and their count.

    Args:
      logits_BTV: float logits at each position.
      targets_BT: the token each position should predict; where the mask is 0 any value is
        accepted (e.g. -1 padding) and ignored.
      mask_BT: 1 (or True) where the target is trained, 0 elsewhere.

    Returns:
      (loss, count): the float32 mean over the trained positions (0 when there are none, never
      NaN) and the int32 number of trained positions.
    """
    mask_BT = mask_BT.astype(bool)
    # Masked-out targets may be padding ids outside the vocabulary: replace them before indexing.
    safe_targets_BT = jnp.where(mask_BT, targets_BT, 0)
    loss_BT = optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV.astype(jnp.float32), safe_targets_BT
    )
    count = mask_BT.sum(dtype=jnp.int32)
    total = jnp.where(mask_BT, loss_BT, 0.0).sum()
    return total / jnp.maximum(count, 1).astype(jnp.float32), count
