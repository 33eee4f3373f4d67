"""PPO for a language model: per-token rewards with a KL penalty, advantages, and β's controller.

One rollout gives, for each answer token t of each row: the policy's log-probability of the
sampled token, the frozen reference (SFT) policy's, and the value head's estimate V_t; the reward
model gives one score for the whole answer. PPO turns those into

    reward_t    = -β · (log π(t) - log π_ref(t))        every answer token: stay near the SFT model
                  + score                               added at the answer's last token
    advantage_t = Σ_k (γλ)^k δ_{t+k},  δ_t = reward_t + γ V_{t+1} - V_t    (GAE; 0 after the end)
    return_t    = advantage_t + V_t                     the value head's regression target

and the clipped update (`jaxgpt.objectives.clipped_policy_loss`, `clipped_value_loss`) then
raises the probability of tokens with positive advantage, a little at a time.

Every function is pure and works on `[B, T]` arrays whose `mask_BT` marks the answer tokens
(contiguous from the answer's first token; padding after it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kl_penalized_rewards(
    score_B: jax.Array, logp_BT: jax.Array, logp_ref_BT: jax.Array, mask_BT: jax.Array, beta
) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards `[B, T]` and the per-row KL estimate `[B]` (Σ log π - log π_ref).

    The score goes to each row's last answer token; every answer token pays β times its
    log-ratio to the reference policy.
    """
    mask_BT = mask_BT.astype(jnp.float32)
    kl_BT = (logp_BT - logp_ref_BT) * mask_BT
    last_BT = mask_BT * (1.0 - jnp.pad(mask_BT[:, 1:], ((0, 0), (0, 1))))
    rewards_BT = -beta * kl_BT + last_BT * score_B[:, None]
    return rewards_BT, kl_BT.sum(axis=1)


def gae(
    rewards_BT: jax.Array,
    values_BT: jax.Array,
    mask_BT: jax.Array,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation: (advantages_BT, returns_BT), zero outside the mask.

    Computed backwards in time with a `lax.scan`; the value after a row's last answer token is 0
    (the episode ends there).
    """
    mask_BT = mask_BT.astype(jnp.float32)
    values_BT = values_BT * mask_BT
    next_values_BT = jnp.pad(values_BT[:, 1:], ((0, 0), (0, 1)))
    next_mask_BT = jnp.pad(mask_BT[:, 1:], ((0, 0), (0, 1)))
    deltas_BT = rewards_BT + gamma * next_values_BT * next_mask_BT - values_BT

    def back(advantage_B, xs):
        delta_B, next_mask_B = xs
        advantage_B = delta_B + gamma * lam * next_mask_B * advantage_B
        return advantage_B, advantage_B

    _, advantages_TB = jax.lax.scan(
        back, jnp.zeros(rewards_BT.shape[0]), (deltas_BT.T, next_mask_BT.T), reverse=True
    )
    advantages_BT = advantages_TB.T * mask_BT
    return advantages_BT, (advantages_BT + values_BT) * mask_BT


def whiten(x_BT: jax.Array, mask_BT: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Normalise to mean 0, variance 1 over the masked entries (zero elsewhere)."""
    mask_BT = mask_BT.astype(jnp.float32)
    n = jnp.maximum(mask_BT.sum(), 1.0)
    mean = (x_BT * mask_BT).sum() / n
    var = (jnp.square(x_BT - mean) * mask_BT).sum() / n
    return (x_BT - mean) * jax.lax.rsqrt(var + eps) * mask_BT


def adaptive_beta(beta, kl, target: float, horizon: float, batch_size: int):
    """Ziegler et al.'s proportional controller: move β so the measured KL approaches `target`.

    `β ← β · (1 + clip(KL / target - 1, -0.2, 0.2) · batch_size / horizon)`.
    """
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return beta * (1.0 + error * batch_size / horizon)
