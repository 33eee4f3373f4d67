"""RLHF with PPO: the training loop's stage that learns from a reward instead of from data.

Each step of `jaxgpt.train.run` with `data.format="prompts"` is

    rollout   `data.batch_size` RL prompts of step s (arithmetic problems, never held-out ones)
              → one sampled answer each from the current policy (`jaxgpt.decode.decode_padded`:
              KV cache, batched, jitted; the key is fold_in(seed, s), so the rollout is a
              function of (seed, step, params) and a resumed run repeats it exactly)
    score     the frozen reward model reads each prompt + answer (`heads.sequence_scores` at the
              answer's last token) — or, with `rl.reward="arithmetic"`, the verifier says 1 or 0
    advantage one pass of the policy (log-probabilities, values) and of the frozen reference
              (SFT) policy: per-token KL penalty, GAE, whitening (`jaxgpt.ppo`)
    update    ONE jitted function: `rl.epochs` × `rl.minibatches` steps of the shared train step
              (`jaxgpt.train.make_train_step`) on the clipped surrogate + value loss (`objective`)

Rows are `[B, T]` with T = P + N: the prompt left-padded to P tokens, then N = `rl.gen_tokens`
sampled tokens (the end-of-turn token after the answer's `<|end|>`). Arrays over actions are
`[B, T-1]`: entry i is about token i+1 (its log-probability given tokens 0..i, the value V(0..i)),
and `mask` marks the answer's tokens up to and including its `<|end|>`. Left padding gets
segment 0 and the rest segment 1, and positions count from the prompt's first token, so each
row computes what it would alone.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt import arithmetic, chat, checkpoint, heads, ppo, reward_model, sharding
from jaxgpt.config import GPTConfig
from jaxgpt.decode import decode_padded, left_pad
from jaxgpt.errors import ConfigError
from jaxgpt.experiment import Experiment, OptimSection, RLSection, ScheduleSection
from jaxgpt.model import forward
from jaxgpt.objectives import clipped_policy_loss, clipped_value_loss, masked_mean
from jaxgpt.optim import make_optimizer
from jaxgpt.params import Params
from jaxgpt.sampling import make_sampler
from jaxgpt.tokenizer import Tokenizer

PROMPT_SEED = 2  # RL prompts: rng([data.seed, PROMPT_SEED, step]), apart from SFT data and eval


# --------------------------------------------------------------------------- prompts and rollouts


def rl_problems(seed: int, step: int, n: int) -> list[tuple[int, int, int]]:
    """The `n` problems (a, b, phrasing) of step `step`: training pairs only (A ≢ B mod 7)."""
    rng = np.random.default_rng([seed, PROMPT_SEED, step])
    pairs = arithmetic.draw_pairs(rng, n, held_out=False)
    return [(a, b, int(rng.integers(len(arithmetic.PHRASINGS)))) for a, b in pairs]


def prompt_length(tokenizer: Tokenizer) -> int:
    """P: the longest RL prompt (two-digit operands, every phrasing); all are padded to it."""
    problems = [(99, 98, p) for p in range(len(arithmetic.PHRASINGS))]
    return max(len(p) for p in arithmetic.reply_prompts(problems, tokenizer))


def padded_prompts(prompts: list[list[int]], length: int, pad_id: int):
    """(tokens `[B, length]` left-padded, kv_start `[B]`)."""
    tokens_BT, kv_start_B = left_pad(prompts, pad_id)
    extra = length - tokens_BT.shape[1]
    tokens_BT = np.pad(tokens_BT, ((0, 0), (extra, 0)), constant_values=pad_id)
    return tokens_BT, kv_start_B + extra


@functools.partial(jax.jit, static_argnames="end_id")
def rollout_rows(
    prompt_BP: jax.Array, kv_start_B: jax.Array, new_BN: jax.Array, *, end_id: int
) -> dict[str, jax.Array]:
    """Prompt + answer rows: tokens, positions, segments `[B, T]` and the answer mask `[B, T-1]`."""
    B, P_ = prompt_BP.shape
    tokens_BT = jnp.concatenate([prompt_BP, new_BN], axis=1)
    T = tokens_BT.shape[1]
    slot_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    # An answer token counts until (and including) the first <|end|>.
    ended_BN = jnp.cumsum(new_BN == end_id, axis=1) - (new_BN == end_id)
    answer_BN = (ended_BN == 0).astype(jnp.float32)
    return {
        "tokens": tokens_BT,
        "positions": jnp.maximum(slot_BT - kv_start_B[:, None], 0),
        "segments": (slot_BT >= kv_start_B[:, None]).astype(jnp.int32),
        "mask": jnp.concatenate([jnp.zeros((B, P_ - 1)), answer_BN], axis=1),
    }


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array, temperature) -> tuple:
    """(log p of each target `[B, T]`, entropy of each distribution `[B, T]`) at `temperature`."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32) / temperature, axis=-1)
    logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    entropy_BT = -(jnp.exp(logp_BTV) * logp_BTV).sum(axis=-1)
    return logp_BT, entropy_BT


def policy_pass(params, rows, config, temperature, key=None):
    """The policy on a batch of rows: (logp `[B, T-1]`, entropy `[B, T-1]`, values `[B, T-1]`)."""
    tokens_BT = rows["tokens"]
    logits_BTV, values_BT = heads.logits_and_values(
        params, tokens_BT[:, :-1], config, positions_BT=rows["positions"][:, :-1],
        segment_ids_BT=rows["segments"][:, :-1], train=key is not None, key=key,
    )  # fmt: skip
    logp_BT, entropy_BT = token_logprobs(logits_BTV, tokens_BT[:, 1:], temperature)
    return logp_BT, entropy_BT, values_BT


@functools.partial(jax.jit, static_argnames=("config", "ref_config", "gamma", "lam"))
def advantages(
    params, ref_params, rows, score_B, beta, temperature, *, config, ref_config, gamma, lam
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The rollout's training batch (rows + old log-probs, values, advantages, returns) and its
    figures: mean reward (score), KL to the reference per answer, entropy, answer length."""
    mask_BT = rows["mask"]
    logp_BT, entropy_BT, values_BT = policy_pass(params, rows, config, temperature)
    ref_logits_BTV = forward(
        ref_params, rows["tokens"][:, :-1], ref_config, positions_BT=rows["positions"][:, :-1],
        segment_ids_BT=rows["segments"][:, :-1],
    )  # fmt: skip
    ref_logp_BT, _ = token_logprobs(ref_logits_BTV, rows["tokens"][:, 1:], temperature)
    rewards_BT, kl_B = ppo.kl_penalized_rewards(score_B, logp_BT, ref_logp_BT, mask_BT, beta)
    advantages_BT, returns_BT = ppo.gae(rewards_BT, values_BT, mask_BT, gamma, lam)
    batch = {
        **rows, "logp": logp_BT, "values": values_BT * mask_BT,
        "advantages": ppo.whiten(advantages_BT, mask_BT), "returns": returns_BT,
    }  # fmt: skip
    figures = {
        "reward": score_B.mean(), "kl": kl_B.mean(), "entropy": masked_mean(entropy_BT, mask_BT)[0],
        "answer_tokens": mask_BT.sum(axis=1).mean(),
    }  # fmt: skip
    return batch, figures


@functools.partial(jax.jit, static_argnames="config")
def reward_model_scores(rm_params, rows, *, config) -> jax.Array:
    """The reward model's score of each row `[B]`, read at the answer's last token."""
    last_B = heads.last_index(rows["mask"]) + 1  # action i is token i + 1
    return heads.sequence_scores(
        rm_params, rows["tokens"], last_B, config, positions_BT=rows["positions"],
        segment_ids_BT=rows["segments"],
    )  # fmt: skip


def answers(new_BN: np.ndarray, tokenizer: Tokenizer, end_id: int) -> list[str]:
    """The text of each sampled answer (up to its `<|end|>`)."""
    rows = [row[: row.index(end_id)] if end_id in row else row for row in new_BN.tolist()]
    return [tokenizer.decode(row) for row in rows]


def verifier_scores(texts: list[str], problems: list[tuple[int, int, int]]) -> np.ndarray:
    """1.0 for an answer whose last integer is the sum (`arithmetic.verify`), else 0.0."""
    return np.array([arithmetic.verify(t, a, b) for t, (a, b, _) in zip(texts, problems)],
                    np.float32)  # fmt: skip


# Rewards computed from the answers' text on the host: name → f(texts, problems) -> scores [B].
# `rl.reward` is "model" (the reward model) or one of these.
REWARDS = {"arithmetic": verifier_scores}


# --------------------------------------------------------------------------- the update


def objective(
    params: Params, batch: dict[str, jax.Array], config: GPTConfig, key: jax.Array | None, *,
    rl: RLSection,
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:  # fmt: skip
    """PPO's loss on one minibatch of a rollout: clipped surrogate + value_coef · value loss.

    Returns (loss, (answer tokens, {policy_loss, value_loss, clip_fraction, approx_kl})) (see
    `jaxgpt.objectives.split_aux`); approx_kl
    is the mean log-ratio of the policy that sampled to the policy now (how far an update went).
    """
    mask_BT = batch["mask"]
    logp_BT, _, values_BT = policy_pass(params, batch, config, rl.temperature, key)
    policy_loss, clip_fraction = clipped_policy_loss(
        logp_BT, batch["logp"], batch["advantages"], mask_BT, rl.clip
    )
    value_loss = clipped_value_loss(
        values_BT, batch["values"], batch["returns"], mask_BT, rl.value_clip
    )
    approx_kl, count = masked_mean(batch["logp"] - logp_BT, mask_BT)
    figures = {"policy_loss": policy_loss, "value_loss": value_loss,
               "clip_fraction": clip_fraction, "approx_kl": approx_kl}  # fmt: skip
    return policy_loss + rl.value_coef * value_loss, (count, figures)


def make_ppo_step(config: GPTConfig, optimizer: optax.GradientTransformation, rl: RLSection):
    """The pure `ppo_step(state, batch, key) -> (state, metrics)` on one rollout batch.

    `rl.epochs` passes over the batch, each in `rl.minibatches` shuffled minibatches, every one a
    step of the shared `make_train_step` on `objective` — all in one `lax.scan`. The state's step
    counts rollouts (one per call); the optimiser counts its updates. Metrics: the updates' mean
    loss and figures, and the rollout's figures (`batch["figures"]`).
    """
    from jaxgpt.train import make_train_step

    train_step = make_train_step(config, optimizer, functools.partial(objective, rl=rl))

    def ppo_step(state, batch: dict[str, Any], key: jax.Array):
        rollout = {k: v for k, v in batch.items() if k != "figures"}
        B = rollout["tokens"].shape[0]
        step_key = jax.random.fold_in(key, state.step)

        def order(epoch: jax.Array) -> jax.Array:
            perm = jax.random.permutation(jax.random.fold_in(step_key, epoch), B)
            return perm.reshape(rl.minibatches, B // rl.minibatches)

        orders_UM = jax.vmap(order)(jnp.arange(rl.epochs)).reshape(-1, B // rl.minibatches)

        def update(state, rows_M):
            minibatch = jax.tree.map(lambda x: x[rows_M][None], rollout)  # A = 1 micro-batch
            return train_step(state, minibatch, step_key)

        new_state, metrics_U = jax.lax.scan(update, state, orders_UM)
        metrics = jax.tree.map(lambda x: x.mean(), metrics_U)
        # The rollout's figures first: a NaN there (say the KL) is what the error names.
        return new_state.replace(step=state.step + 1), {**batch["figures"], **metrics}

    return ppo_step


def compiled_ppo_step(config: GPTConfig, exp: Experiment, mesh: Mesh):
    """(optimizer, jitted `make_ppo_step`, state shardings), cached like
    `jaxgpt.train.compiled_step`: runs that differ only in what the update does not read (the
    frozen models, β, the rollout) compile once."""
    update = {name: getattr(exp.rl, name) for name in UPDATE_FIELDS}
    return _compiled_ppo_step(config, exp.optim, exp.schedule, RLSection(**update), mesh)


UPDATE_FIELDS = ("epochs", "minibatches", "clip", "value_clip", "value_coef", "temperature")


@functools.lru_cache(maxsize=4)
def _compiled_ppo_step(
    config: GPTConfig, optim: OptimSection, schedule: ScheduleSection, rl: RLSection, mesh: Mesh
):
    from jaxgpt.train import abstract_train_state, jit_train_step

    optimizer = ppo_optimizer(optim, schedule, rl)
    state_shardings = sharding.tree_shardings(abstract_train_state(config, optimizer), mesh)
    replicated = NamedSharding(mesh, P())
    step_fn = jit_train_step(
        make_ppo_step(config, optimizer, rl),
        in_shardings=(state_shardings, replicated, replicated),
        out_shardings=(state_shardings, replicated),
    )
    return optimizer, step_fn, state_shardings


def ppo_optimizer(
    optim: OptimSection, schedule: ScheduleSection, rl: RLSection
) -> optax.GradientTransformation:
    """The experiment's optimiser, its schedule stretched to epochs × minibatches updates a step
    (so the learning rate at step s is the schedule's value at s)."""
    per_step = rl.epochs * rl.minibatches
    stretched = ScheduleSection(
        max_steps=schedule.max_steps * per_step, warmup_steps=schedule.warmup_steps * per_step,
        min_lr_ratio=schedule.min_lr_ratio, seed=schedule.seed,
    )  # fmt: skip
    return make_optimizer(optim, stretched)


# --------------------------------------------------------------------------- frozen models


def load_frozen(path: str, key: str, heads_allowed: tuple[str, ...]) -> tuple[Any, Any, Any]:
    """(config, params, tokenizer) of a frozen model's run directory named by `rl.<key>`.

    A reference must be a language model (a PPO run's value head is dropped); a reward model must
    have the "reward" head.
    """
    if not checkpoint.is_run_dir(path):
        raise ConfigError(f"rl.{key} {path!r} is not a jaxgpt run directory (no model.json)")
    config, params, tokenizer, _ = checkpoint.load_run_for_inference(path)
    if config.head not in heads_allowed:
        wanted = " or ".join(heads.WHAT[h] for h in heads_allowed)
        raise ConfigError(
            f"rl.{key} {path!r} is {heads.WHAT[config.head]}; it must be {wanted} "
            f"(model.head={heads_allowed[0]!r})"
        )
    if config.head == "lm+value":
        config, params = heads.with_head(config, params, "lm", jax.random.key(0))
    return config, params, tokenizer


# --------------------------------------------------------------------------- the stage


def ppo_stage(exp: Experiment, mesh: Mesh):
    """The PPO stage of `jaxgpt.train.run` (see `jaxgpt.train.Stage`)."""
    from jaxgpt.train import Stage, held_out_accuracy

    if jax.process_count() > 1:
        raise ConfigError("PPO (data.format='prompts') runs in a single process")
    rl, B, N = exp.rl, exp.data.batch_size, exp.rl.gen_tokens
    if rl.reward != "model" and rl.reward not in REWARDS:
        raise ConfigError(
            f"rl.reward must be 'model' (rl.reward_model) or one of {sorted(REWARDS)}, got "
            f"{rl.reward!r}"
        )
    ref_config, ref_params, tokenizer = load_frozen(rl.reference, "reference", ("lm", "lm+value"))
    if rl.reward == "model":
        rm_config, rm_params, rm_tokenizer = load_frozen(rl.reward_model, "reward_model",
                                                         ("reward",))  # fmt: skip
        where = f"the rollouts (tokens of rl.reference {rl.reference!r})"
        reward_model.check_tokenizer(rm_tokenizer, tokenizer, where)
    end_id = chat.chat_tokens(tokenizer).end
    P_ = prompt_length(tokenizer)
    if ref_config.block_size < P_ + N - 1:
        raise ConfigError(
            f"a prompt ({P_} tokens) and rl.gen_tokens={N} do not fit the reference's context "
            f"({ref_config.block_size} tokens): lower rl.gen_tokens"
        )
    sampler = make_sampler(rl.temperature)
    sample_key = jax.random.fold_in(jax.random.key(exp.schedule.seed), 3)
    replicated = NamedSharding(mesh, P())
    beta = {"value": float(rl.beta)}  # adapted after each rollout when rl.target_kl > 0
    last: dict[str, Any] = {}  # the latest rollout, for the evaluation's figures

    def compile(config: GPTConfig):
        return compiled_ppo_step(config, exp, mesh)

    def batch(step: int, state, config: GPTConfig) -> dict[str, Any]:
        problems = rl_problems(exp.data.seed, step, B)
        prompts = arithmetic.reply_prompts(problems, tokenizer)
        prompt_BP, kv_start_B = padded_prompts(prompts, P_, end_id)
        keys_N = jax.random.split(jax.random.fold_in(sample_key, step), N)
        new_BN = decode_padded(
            state.params, jnp.asarray(prompt_BP), jnp.asarray(kv_start_B), keys_N, sampler,
            np.int32(end_id), np.int32(end_id), config=config, max_new_tokens=N,
        )  # fmt: skip
        rows = rollout_rows(jnp.asarray(prompt_BP), jnp.asarray(kv_start_B), new_BN, end_id=end_id)
        if rl.reward == "model":
            score_B = reward_model_scores(rm_params, rows, config=rm_config)
        else:
            texts = answers(np.asarray(new_BN), tokenizer, end_id)
            score_B = jnp.asarray(REWARDS[rl.reward](texts, problems))
        used = beta["value"]
        out, figures = advantages(
            state.params, ref_params, rows, score_B, np.float32(used), np.float32(rl.temperature),
            config=config, ref_config=ref_config, gamma=float(rl.gamma), lam=float(rl.lam),
        )  # fmt: skip
        figures = {**figures, "beta": jnp.float32(used)}
        if rl.target_kl > 0:  # one host sync per step: the controller needs the KL
            kl = float(figures["kl"])
            beta["value"] = float(ppo.adaptive_beta(used, kl, rl.target_kl, rl.kl_horizon, B))
        last.update(figures=figures, new_BN=new_BN, problems=problems)
        return jax.device_put({**out, "figures": figures}, replicated)

    def evaluate(params: Params, config: GPTConfig) -> dict[str, Any]:
        """Held-out accuracy (greedy, 200 problems); the latest rollout's reward, KL, share of
        answers the verifier accepts, and its first three answers (what the policy now says)."""
        out: dict[str, Any] = {"held_out_acc": held_out_accuracy(params, config, tokenizer)}
        if last:
            out.update({f"rollout_{k}": float(last["figures"][k]) for k in ("reward", "kl")})
            texts = answers(np.asarray(last["new_BN"]), tokenizer, end_id)
            correct = verifier_scores(texts, last["problems"])
            out["rollout_correct"] = float(correct.mean())
            out["rollout_examples"] = [
                f"{arithmetic.question(a, b, p)} → {t}"
                for (a, b, p), t in zip(last["problems"][:3], texts)
            ]
        return out

    T = P_ + N

    def struct(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    rows_struct = {k: struct((B, T), jnp.int32) for k in ("tokens", "positions", "segments")}
    float_struct = {
        k: struct((B, T - 1), jnp.float32)
        for k in ("mask", "logp", "values", "advantages", "returns")
    }
    figures_struct = {
        k: struct((), jnp.float32)
        for k in ("reward", "kl", "entropy", "answer_tokens", "beta")
    }  # fmt: skip
    stage = Stage(
        tokenizer=tokenizer,
        tokens_per_step=B * T,
        compile=compile,
        batch_struct={**rows_struct, **float_struct, "figures": figures_struct},
        batch=batch,
        evaluate=evaluate,
        report="ppo",
        loader_state=lambda: {"beta": beta["value"]},
        restore=lambda loader: beta.update(value=float(loader.get("beta", rl.beta))),
        bar=("reward", "kl"),
    )
    return stage
