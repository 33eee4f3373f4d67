"""Scalar heads on the GPT-2 trunk: a reward model's score and a PPO policy's value.

    "reward"    score_head  h_D → r        the reward model: one score per position, read at the
                                           last token of the answer (`sequence_scores`)
    "lm+value"  value_head  h_D → V(s_t)   PPO's critic: a value per position, next to the
                                           policy's logits from the same pass (`logits_and_values`)

Both heads are a `[D, 1]` linear layer reading the final LayerNorm's output
(`jaxgpt.model.hidden_states`), the same vector the tied output layer reads for the logits.
Which head a model has is `GPTConfig.head`; `init_params` creates it and `check_params` checks
it, so checkpoints, sharding and the training loop treat it like any other parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig
from jaxgpt.errors import ConfigError, InputError
from jaxgpt.model import hidden_states, linear, output_logits
from jaxgpt.params import SCALAR_HEADS, Params, check_params, init_scalar_head

WHAT = {
    "lm": "a language model (policy)",
    "reward": "a reward model",
    "lm+value": "a PPO policy with a value head",
}


def scalar_head(head: Params, h_BTD: jax.Array, config: GPTConfig) -> jax.Array:
    """A `[D, 1]` head applied at every position: `[B, T, D]` → float32 `[B, T]`."""
    return linear(head, h_BTD, config.compute_dtype)[..., 0].astype(jnp.float32)


def scores(
    params: Params,
    tokens_BT: jax.Array,
    config: GPTConfig,
    *,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
    train: bool = False,
    key: jax.Array | None = None,
) -> jax.Array:
    """A reward model's score after each token, float32 `[B, T]` (`config.head == "reward"`)."""
    require_head(config, ("reward",), "scores")
    h_BTD = hidden_states(
        params, tokens_BT, config, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
        train=train, key=key,
    )  # fmt: skip
    return scalar_head(params["score_head"], h_BTD, config)


def sequence_scores(
    params: Params, tokens_BT: jax.Array, last_B: jax.Array, config: GPTConfig, **kwargs
) -> jax.Array:
    """The reward of each row, float32 `[B]`: the score read at index `last_B` (the answer's last
    token, e.g. its `<|end|>`; see `last_index`). Keyword arguments as for `scores`."""
    return read_at(scores(params, tokens_BT, config, **kwargs), last_B)


def read_at(values_BT: jax.Array, index_B: jax.Array) -> jax.Array:
    """`values_BT[b, index_B[b]]` for each row b: `[B, T]` → `[B]`."""
    return jnp.take_along_axis(values_BT, index_B[:, None].astype(jnp.int32), axis=1)[:, 0]


def last_index(mask_BT: jax.Array) -> jax.Array:
    """Index of the last nonzero entry of each row, int32 `[B]` (0 for an all-zero row)."""
    T = mask_BT.shape[-1]
    positions_BT = jnp.where(mask_BT.astype(bool), jnp.arange(T), -1)
    return jnp.maximum(positions_BT.max(axis=-1), 0).astype(jnp.int32)


def logits_and_values(
    params: Params,
    tokens_BT: jax.Array,
    config: GPTConfig,
    *,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
    train: bool = False,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One pass of a PPO policy (`config.head == "lm+value"`): the float32 logits `[B, T, V]`
    and the value after each token `[B, T]`."""
    require_head(config, ("lm+value",), "logits_and_values")
    h_BTD = hidden_states(
        params, tokens_BT, config, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
        train=train, key=key,
    )  # fmt: skip
    return output_logits(params, h_BTD, config), scalar_head(params["value_head"], h_BTD, config)


def with_head(
    config: GPTConfig, params: Params, head: str, key: jax.Array, *, source: str = "the model"
) -> tuple[GPTConfig, Params]:
    """`params` of a model with `config.head`, turned into a model with `head`.

    A language model ("lm") starts a reward model or a PPO policy: the trunk is kept and the
    new scalar head is drawn N(0, 0.02) with a zero bias. A PPO policy gives back its language
    model by dropping the value head. A reward model's trunk was trained to score, not to
    predict tokens, so it cannot become a policy: that, and any other change, is an error.
    """
    check_params(params, config)
    if head == config.head:
        return config, params
    trunk = {k: v for k, v in params.items() if k not in SCALAR_HEADS.values()}
    if config.head == "lm" and head in SCALAR_HEADS:
        new = init_scalar_head(key, config.n_embd)
        return config.replace(head=head), {**trunk, SCALAR_HEADS[head]: new}
    if config.head == "lm+value" and head == "lm":
        return config.replace(head="lm"), trunk
    raise ConfigError(
        f"{source} is {WHAT[config.head]}; it cannot start {WHAT[head]} (model.head={head!r})"
    )


def require_head(config: GPTConfig, allowed: tuple[str, ...], use: str) -> None:
    """Refuse a model whose head does not fit `use` (e.g. a reward model asked for text)."""
    if config.head not in allowed:
        wanted = " or ".join(WHAT[h] for h in allowed)
        raise InputError(f"{use} needs {wanted}, but the model is {WHAT[config.head]}")
