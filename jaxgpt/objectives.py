"""Training objectives: the small pure part that differs between stages of the one training loop.

An objective is a pure function

    objective(params, batch, config, key) -> (loss, weight)
                                          or (loss, (weight, {name: scalar metric}))

`batch` is one micro-batch as the stage's data source makes it (an int32 `[B, T+1]` array of
token windows for pretraining; a dict of packed `[B, T+1]` arrays for SFT, see
`jaxgpt.packing`; a dict of preference pairs for DPO, see `jaxgpt.preferences`); `key` is the
dropout key (None: no dropout); `loss` is the mean over the `weight` predictions (or pairs) the
batch trains (a float32 scalar). The train step (`jaxgpt.train.make_train_step`) weighs
micro-batches by `weight`, so gradient accumulation gives the mean over every trained token of the
whole step, however they fall into micro-batches. An objective may also return scalar metrics
(`split_aux`); the loop averages them the same way and logs them beside the loss.

    next_token   pretraining: every next token of every window
    sft          supervised fine-tuning: only the tokens the assistant says (the chat mask),
                 on conversations packed into rows without attending across them
    dpo          direct preference optimisation on chosen/rejected answers, against the
                 reference log-probabilities the batch carries (`dpo_loss`)
    (PPO's clipped surrogate + value loss is `jaxgpt.rlhf.objective`, on rollouts it samples)
    reward       a reward model (`GPTConfig.head == "reward"`) on preference pairs: the
                 Bradley–Terry loss of the scores of the chosen and the rejected answer
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxgpt import heads
from jaxgpt.config import GPTConfig
from jaxgpt.errors import ConfigError
from jaxgpt.eval import logprobs
from jaxgpt.model import forward, hidden_states, output_logits
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


def next_token_loss(
    params: Params, batch_BT1: jax.Array, config: GPTConfig, key: jax.Array | None
) -> jax.Array:
    """The mean next-token cross-entropy alone (`next_token` without its weight), for
    `jax.value_and_grad` in research code and benchmarks."""
    return next_token(params, batch_BT1, config, key)[0]


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
    weights_BT = loss_weights(batch["mask"], segments_BT1)
    loss, count = masked_next_token_loss(logits_BTV, tokens_BT1[:, 1:], weights_BT)
    return loss, count.astype(jnp.float32)


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


def dpo(
    params: Params,
    batch: dict[str, jax.Array],
    config: GPTConfig,
    key: jax.Array | None,
    *,
    beta: float = 0.1,
    nll_weight: float = 0.0,
    first_difference: bool = False,
    freeze_embeddings: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    """DPO on a batch of preference pairs: `dpo_loss` of the sequence log-probabilities.

    `batch` holds `chosen`, `rejected` (int32 `[B, T+1]` conversations), their `*_mask` (1 on
    the final answer's tokens) and `*_reference` (float32 `[B, T+1]`, the frozen reference
    model's log-probability of each token; see `jaxgpt.batches.preference_source`). A sequence
    log-probability is the sum over the answer's tokens, `t` with `mask[t] = 1`, of
    `log p(token t | tokens before it)`. Both sides go through the model as one `[2B, T]` batch.
    DPO runs without dropout (`key` is ignored), so that the policy's log-probabilities are
    computed as the reference's were. `nll_weight` > 0 adds that multiple of the chosen answers'
    mean negative log-likelihood per token (DPO + NLL, "RPO": it keeps DPO from lowering the
    chosen answers' probability along with the rejected ones'). With `first_difference` the
    sequence log-probabilities are those of the first token where the two conversations differ
    alone: both sides share everything before it, so the loss contrasts the two choices made in
    one context and leaves alone what follows the rejected choice (the rest of a wrong answer is
    often right given its mistake; pushing it down would teach the model to unlearn that). The
    NLL term still covers the whole chosen answer. `freeze_embeddings` holds the token
    embedding fixed (no gradient): it is tied to the output layer, so pushing a rejected token
    down would otherwise also move that token's *input* embedding everywhere it is read.
    Returns (mean loss over the B pairs, (B, metrics)).
    """
    del key
    if freeze_embeddings:
        params = {**params, "wte": jax.lax.stop_gradient(params["wte"])}
    B = batch["chosen"].shape[0]
    tokens_2BT1 = jnp.concatenate([batch["chosen"], batch["rejected"]])
    masks_2BT1 = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]]) > 0
    chosen_answer_BT = masks_2BT1[:B, 1:]
    if first_difference:
        first_B = jnp.argmax(batch["chosen"] != batch["rejected"], axis=-1)
        at_first_BT1 = jnp.arange(masks_2BT1.shape[-1]) == first_B[:, None]
        masks_2BT1 = masks_2BT1 & jnp.concatenate([at_first_BT1, at_first_BT1])
    weights_2BT = masks_2BT1[:, 1:]
    reference_2BT = jnp.concatenate([batch["chosen_reference"], batch["rejected_reference"]])
    logp_2BT = logprobs(params, config, tokens_2BT1)
    policy_2B = jnp.where(weights_2BT, logp_2BT, 0.0).sum(-1)
    ref_2B = jnp.where(weights_2BT, reference_2BT[:, 1:], 0.0).sum(-1)
    loss, metrics = dpo_loss(policy_2B[:B], policy_2B[B:], ref_2B[:B], ref_2B[B:], beta)
    # Mean of log π - log π_ref over the chosen answers: how far the policy has moved from the
    # reference on them (its expectation under π would be the KL).
    metrics["logratio_chosen"] = (policy_2B[:B] - ref_2B[:B]).mean()
    chosen_tokens = jnp.maximum(chosen_answer_BT.sum(), 1).astype(jnp.float32)
    logp_BT = jnp.where(chosen_answer_BT, logp_2BT[:B], 0.0)
    metrics["nll_chosen"] = -logp_BT.sum() / chosen_tokens
    metrics["dpo_loss"] = loss
    return loss + nll_weight * metrics["nll_chosen"], (jnp.float32(B), metrics)


OBJECTIVES: dict[str, Objective] = {"next_token": next_token, "sft": sft, "dpo": dpo}


def get_objective(
    name: str,
    *,
    beta: float | None = None,
    nll_weight: float = 0.0,
    first_difference: bool = False,
    freeze_embeddings: bool = False,
    first_difference_weight: float = 0.0,
) -> Objective:
    """The objective registered as `name`; for "dpo", with `beta` (default 0.1), `nll_weight`
    (default 0), `first_difference` and `freeze_embeddings` (default False) bound; for "reward",
    with `nll_weight` and `first_difference_weight` (default 0) bound.

    The same settings give the same function object, so the compiled step is reused.
    """
    if name not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {sorted(OBJECTIVES)}, got {name!r}")
    options = (float(nll_weight), bool(first_difference), bool(freeze_embeddings))
    if name == "reward" and (nll_weight or first_difference_weight):
        return _reward_with(float(nll_weight), float(first_difference_weight))
    if name == "dpo" and (beta is not None or any(options)):
        return _dpo_with(0.1 if beta is None else float(beta), *options)
    return OBJECTIVES[name]


@functools.cache
def _dpo_with(beta: float, nll_weight: float, first_difference: bool, freeze: bool) -> Objective:
    return functools.partial(
        dpo, beta=beta, nll_weight=nll_weight, first_difference=first_difference,
        freeze_embeddings=freeze,
    )  # fmt: skip


@functools.cache
def _reward_with(nll_weight: float, first_difference_weight: float) -> Objective:
    return functools.partial(
        reward, nll_weight=nll_weight, first_difference_weight=first_difference_weight
    )


def split_aux(aux: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """An objective's second output as (weight, metrics): a bare weight has no metrics."""
    if isinstance(aux, tuple):
        weight, metrics = aux
        return weight, dict(metrics)
    return aux, {}


# --------------------------------------------------------------------------- preference losses
# The math of the assistant road's later stages, on per-sequence numbers the model produced.


def pairwise_reward_loss(
    reward_chosen_B: jax.Array, reward_rejected_B: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Bradley–Terry: mean `-log σ(r_chosen - r_rejected)`, and the pairwise accuracy.

    Under the Bradley–Terry model `P(chosen ≻ rejected) = σ(r_c - r_r)`: the loss is the negative
    log-likelihood of the human (or verifier) preference. Ties in reward count as wrong.
    """
    margin_B = (reward_chosen_B - reward_rejected_B).astype(jnp.float32)
    return -jax.nn.log_sigmoid(margin_B).mean(), (margin_B > 0).mean()


def reward(
    params: Params,
    batch: dict[str, jax.Array],
    config: GPTConfig,
    key: jax.Array | None,
    *,
    nll_weight: float = 0.0,
    first_difference_weight: float = 0.0,
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    """A reward model's Bradley–Terry loss on a batch of preference pairs.

    `batch` holds `chosen` and `rejected` (int32 `[B, T+1]` conversations, right-padded) and
    their `*_mask` (1 on the final answer's tokens and its `<|end|>`; see
    `jaxgpt.preferences.get_pair_batch`). Each conversation's reward is the score head read at
    its answer's last token, the `<|end|>` (`heads.last_index` of the mask, as
    `heads.sequence_scores` reads it), on the first T tokens of the row: the model has T
    positions, and the reward model's data is checked to fit them
    (`jaxgpt.reward_model.check_fits`). Both sides go through the model as one `[2B, T]` batch.

    Two optional terms, read from the same pass, help the trunk learn to score (docs/chat.md):
    `first_difference_weight` × the same pairwise loss on the scores at the first token where
    the two conversations differ (`first_difference_loss`), and `nll_weight` × the chosen
    answers' next-token loss through the tied output layer (`nll_chosen`).

    Returns (the loss: the mean `pairwise_reward_loss` over the B pairs plus the weighted terms,
    (B, metrics)): `pairwise_loss` (the Bradley–Terry loss alone), `reward_accuracy` (how often
    the chosen answer scores higher), `reward_margin` (mean r_chosen - r_rejected),
    `reward_chosen` and `reward_rejected`.
    """
    B = batch["chosen"].shape[0]
    tokens_2BT1 = jnp.concatenate([batch["chosen"], batch["rejected"]])
    mask_2BT1 = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    T = tokens_2BT1.shape[1] - 1
    h_2BTD = hidden_states(params, tokens_2BT1[:, :T], config, train=key is not None, key=key)
    scores_2BT = heads.scalar_head(params["score_head"], h_2BTD, config)
    last_2B = jnp.minimum(heads.last_index(mask_2BT1), T - 1)
    r_2B = heads.read_at(scores_2BT, last_2B)
    chosen_B, rejected_B = r_2B[:B], r_2B[B:]
    loss, accuracy = pairwise_reward_loss(chosen_B, rejected_B)
    metrics = {
        "pairwise_loss": loss,
        "reward_accuracy": accuracy,
        "reward_margin": (chosen_B - rejected_B).mean(),
        "reward_chosen": chosen_B.mean(),
        "reward_rejected": rejected_B.mean(),
    }
    if first_difference_weight:
        metrics["first_difference_loss"] = first_difference_loss(scores_2BT, batch)
        loss = loss + first_difference_weight * metrics["first_difference_loss"]
    if nll_weight:
        logits_BTV = output_logits(params, h_2BTD[:B], config)
        targets_BT, answer_BT = batch["chosen"][:, 1:], batch["chosen_mask"][:, 1:]
        metrics["nll_chosen"], _ = masked_next_token_loss(logits_BTV, targets_BT, answer_BT)
        loss = loss + nll_weight * metrics["nll_chosen"]
    return loss, (jnp.float32(B), metrics)


def first_difference_loss(scores_2BT: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """The pairwise loss of the scores read at the first token where chosen and rejected differ.

    `scores_2BT` are the scores after each token of the chosen rows then the rejected ones (as
    `reward` computes them), `batch` the pairs. Both rows share everything before that token, so
    the score there judges that one token in one context. A pair whose token there is outside
    either answer (one side already ended: padding against a token) is left out; the mean is
    over the rest (0 if none).
    """
    B, T = batch["chosen"].shape[0], scores_2BT.shape[1]
    first_B = jnp.argmax(batch["chosen"] != batch["rejected"], axis=-1)
    in_answers_B = (
        heads.read_at(batch["chosen_mask"], first_B)
        * heads.read_at(batch["rejected_mask"], first_B)
    ) > 0
    r_2B = heads.read_at(scores_2BT, jnp.minimum(jnp.concatenate([first_B, first_B]), T - 1))
    loss, _ = masked_mean(-jax.nn.log_sigmoid(r_2B[:B] - r_2B[B:]), in_answers_B)
    return loss


OBJECTIVES["reward"] = reward


def dpo_loss(
    policy_chosen_B: jax.Array,
    policy_rejected_B: jax.Array,
    reference_chosen_B: jax.Array,
    reference_rejected_B: jax.Array,
    beta: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Direct preference optimisation: `-log σ(β[(π_c - ref_c) - (π_r - ref_r)])`, mean over B.

    Each argument is a sequence log-probability `log π(answer | prompt)` summed over the answer's
    tokens. `β · (log π - log π_ref)` is DPO's implicit reward; the metrics report its margin
    between chosen and rejected and how often the margin is positive.
    """
    chosen_B = beta * (policy_chosen_B - reference_chosen_B)
    rejected_B = beta * (policy_rejected_B - reference_rejected_B)
    margin_B = (chosen_B - rejected_B).astype(jnp.float32)
    metrics = {
        "reward_margin": margin_B.mean(),
        "reward_accuracy": (margin_B > 0).mean(),
        "reward_chosen": chosen_B.mean(),
        "reward_rejected": rejected_B.mean(),
    }
    return -jax.nn.log_sigmoid(margin_B).mean(), metrics


def clipped_policy_loss(
    logp_BT: jax.Array,
    logp_old_BT: jax.Array,
    advantages_BT: jax.Array,
    mask_BT: jax.Array,
    clip_eps: float,
) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped surrogate, to minimise: `-min(ρA, clip(ρ, 1-ε, 1+ε)A)` over masked tokens.

    ρ = exp(log π - log π_old) is the probability ratio of each sampled token under the policy
    being updated and the policy that sampled it. Returns (loss, fraction of tokens clipped).
    """
    ratio_BT = jnp.exp(logp_BT - logp_old_BT)
    unclipped_BT = ratio_BT * advantages_BT
    clipped_BT = jnp.clip(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps) * advantages_BT
    loss, _ = masked_mean(-jnp.minimum(unclipped_BT, clipped_BT), mask_BT)
    clip_fraction, _ = masked_mean(
        (jnp.abs(ratio_BT - 1.0) > clip_eps).astype(jnp.float32), mask_BT
    )
    return loss, clip_fraction


def clipped_value_loss(
    values_BT: jax.Array,
    values_old_BT: jax.Array,
    returns_BT: jax.Array,
    mask_BT: jax.Array,
    clip_eps: float,
) -> jax.Array:
    """PPO's value loss, `½ max((V - R)², (V_old + clip(V - V_old, ±ε) - R)²)`, masked mean."""
    clipped_BT = values_old_BT + jnp.clip(values_BT - values_old_BT, -clip_eps, clip_eps)
    worst_BT = jnp.maximum(jnp.square(values_BT - returns_BT), jnp.square(clipped_BT - returns_BT))
    return 0.5 * masked_mean(worst_BT, mask_BT)[0]
