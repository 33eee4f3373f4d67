"""RLHF with PPO (`jaxgpt.rlhf`): rollouts, the advantage pass against the worked pieces of
`jaxgpt.ppo` and an independent log-probability, the update, and short runs in the loop."""

from __future__ import annotations

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import arithmetic, checkpoint, heads, ppo, rlhf, sharding
from jaxgpt.eval import logprobs
from jaxgpt.experiment import load_experiment
from jaxgpt.objectives import masked_mean
from jaxgpt.train import TrainingDiverged, init_train_state, initial_params, run
from tests.conftest import TINY_PPO_EXPERIMENT, write_tiny_run

SEVENS = ("rl.reward=sevens", "optim.lr=3e-3", "data.batch_size=16", "rl.beta=0.01",
          "rl.target_kl=2.0", "rl.kl_horizon=100", "eval.log_interval=1")  # fmt: skip
INTERRUPT = {"at_call": None, "calls": 0}


def toy_reward(texts, problems):
    """Reward the digit 7: the share of an answer's characters that are '7'. Sends Ctrl-C to
    this process at call `INTERRUPT["at_call"]` (a run stopped mid-way)."""
    INTERRUPT["calls"] += 1
    if INTERRUPT["calls"] == INTERRUPT["at_call"]:
        os.kill(os.getpid(), signal.SIGINT)
    return np.array([t.count("7") / max(len(t), 1) for t in texts], np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random reference run and reward model, and a writer of PPO experiment files."""
    w = tmp_path_factory.mktemp("rlhf")
    ref = write_tiny_run(w / "ref", "lm", seed=0)
    rm = write_tiny_run(w / "rm", "reward", seed=1)
    write_tiny_run(w / "ref_nan", "lm", nan=True)

    def experiment(steps: int, *overrides: str):
        path = w / f"ppo_{steps}.py"
        path.write_text(TINY_PPO_EXPERIMENT.format(ref=str(ref), rm=str(rm), steps=steps))
        return load_experiment(str(path), list(overrides))

    rlhf.REWARDS["sevens"] = toy_reward
    yield w, experiment
    del rlhf.REWARDS["sevens"]


@pytest.fixture(scope="module")
def stage_and_state(world):
    """(exp, stage, policy config, a fresh train state) of the runs below."""
    _, experiment = world
    exp = experiment(16, *SEVENS)  # the runs' settings: the compiled functions are shared
    stage = rlhf.ppo_stage(exp, sharding.make_mesh(""))
    config, params = initial_params(exp, stage.tokenizer)
    optimizer, _, _ = stage.compile(config)
    return exp, stage, config, init_train_state(params, optimizer)


def test_rollout_rows_by_hand():
    end = 9
    prompt_BP = jnp.array([[0, 0, 5, 6], [5, 6, 7, 8]])  # row 0: two pad slots
    new_BN = jnp.array([[1, 2, end, end], [3, end, end, end]])
    rows = rlhf.rollout_rows(prompt_BP, jnp.array([2, 0]), new_BN, end_id=end)
    np.testing.assert_array_equal(rows["tokens"][0], [0, 0, 5, 6, 1, 2, end, end])
    np.testing.assert_array_equal(rows["positions"][0], [0, 0, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(rows["segments"][0], [0, 0, 1, 1, 1, 1, 1, 1])
    # mask[i] is about token i + 1: the answer's tokens up to and including the first <|end|>
    np.testing.assert_array_equal(rows["mask"][0], [0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(rows["mask"][1], [0, 0, 0, 1, 1, 0, 0])
    assert int(heads.last_index(rows["mask"])[0]) + 1 == 6  # the RM reads the <|end|>


def test_rl_prompts_are_never_held_out():
    problems = [p for step in range(200) for p in rlhf.rl_problems(0, step, 16)]
    assert not any(arithmetic.is_held_out(a, b) for a, b, _ in problems)
    assert rlhf.rl_problems(0, 3, 16) == rlhf.rl_problems(0, 3, 16) != rlhf.rl_problems(0, 4, 16)


def test_rollout_is_a_function_of_seed_step_and_params(stage_and_state):
    _, stage, config, state = stage_and_state
    a, b = stage.batch(3, state, config), stage.batch(3, state, config)
    for k in ("tokens", "mask", "logp", "advantages"):
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    other = stage.batch(4, state, config)
    assert not np.array_equal(np.asarray(a["tokens"]), np.asarray(other["tokens"]))
    assert np.asarray(a["mask"]).sum(axis=1).min() >= 1  # every answer has a token


def test_advantages_are_the_worked_pieces_on_unpadded_rows(stage_and_state):
    """The jitted pass over left-padded rows equals, row by row, `jaxgpt.logprobs` on the row
    alone (no padding), composed with `ppo.kl_penalized_rewards`, `ppo.gae` and `ppo.whiten`."""
    exp, stage, config, state = stage_and_state
    ref_config, ref_params, _ = rlhf.load_frozen(exp.rl.reference, "reference", ("lm",))
    batch = stage.batch(1, state, config)
    rows = {k: batch[k] for k in ("tokens", "positions", "segments", "mask")}
    score_B = jnp.linspace(-1.0, 1.0, rows["tokens"].shape[0])
    beta = 0.3
    out, figures = rlhf.advantages(
        state.params, ref_params, rows, score_B, beta, 1.0, config=config,
        ref_config=ref_config, gamma=1.0, lam=0.9,
    )  # fmt: skip
    tokens, mask = np.asarray(rows["tokens"]), np.asarray(rows["mask"])
    kv_start = (np.asarray(rows["segments"]) == 0).sum(axis=1)
    # Each row moved to start at slot 0 (right-padded): plain causal attention, no positions or
    # segments, and what follows a row's end cannot change its earlier log-probabilities.
    T = tokens.shape[1]
    right = np.stack([np.roll(row, -start) for row, start in zip(tokens, kv_start)])
    lm_config, lm_params = heads.with_head(config, state.params, "lm", jax.random.key(0))
    jit_logprobs = jax.jit(logprobs, static_argnames="config")
    jit_values = jax.jit(lambda p, t: heads.logits_and_values(p, t, config)[1])
    logp_r = np.asarray(jit_logprobs(lm_params, lm_config, jnp.asarray(right)))
    ref_logp_r = np.asarray(jit_logprobs(ref_params, ref_config, jnp.asarray(right)))
    values_r = np.asarray(jit_values(state.params, jnp.asarray(right[:, :-1])))
    logp, ref_logp, values = (np.zeros(mask.shape, np.float32) for _ in range(3))
    for b, start in enumerate(kv_start):
        n = T - 1 - start
        logp[b, start:], ref_logp[b, start:], values[b, start:] = (
            logp_r[b, :n],
            ref_logp_r[b, :n],
            values_r[b, :n],
        )
    m = mask > 0
    np.testing.assert_allclose(np.asarray(out["logp"])[m], logp[m], atol=2e-5)
    np.testing.assert_allclose(np.asarray(out["values"])[m], values[m], atol=2e-5)
    rewards, kl = ppo.kl_penalized_rewards(score_B, logp, ref_logp, mask, beta)
    adv, returns = ppo.gae(rewards, values, mask, 1.0, 0.9)
    np.testing.assert_allclose(np.asarray(out["advantages"]), ppo.whiten(adv, mask), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["returns"]), returns, atol=1e-4)
    np.testing.assert_allclose(float(figures["kl"]), float(kl.mean()), atol=1e-5)
    assert float(figures["reward"]) == pytest.approx(0.0, abs=1e-6)


def test_objective_at_the_sampling_policy(stage_and_state):
    """Before any update the ratio is 1: nothing is clipped, the log-ratio is 0 and the policy
    loss is minus the mean advantage."""
    exp, stage, config, state = stage_and_state
    batch = {k: v for k, v in stage.batch(2, state, config).items() if k != "figures"}
    objective = jax.jit(lambda p, b: rlhf.objective(p, b, config, None, rl=exp.rl))
    loss, (count, figures) = objective(state.params, batch)
    mean_adv, n = masked_mean(batch["advantages"], batch["mask"])
    assert float(count) == float(n) > 0
    assert float(figures["clip_fraction"]) == 0.0
    assert abs(float(figures["approx_kl"])) < 1e-5
    np.testing.assert_allclose(float(figures["policy_loss"]), -float(mean_adv), atol=1e-5)
    expected = float(figures["policy_loss"]) + exp.rl.value_coef * float(figures["value_loss"])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_short_ppo_run_raises_its_reward_and_resumes_exactly(world):
    """16 steps raise the toy reward; a run stopped by Ctrl-C after step 6 and resumed ends
    with the same weights, the same adaptive β and the same logged rows, bit for bit."""
    w, experiment = world
    exp = experiment(16, *SEVENS)
    result = run(exp, run_dir=w / "straight", progress=False, sample=False)
    assert result.step == 16 and not result.interrupted
    train = train_rows(w / "straight")
    first, last = train[0]["reward"], np.mean([r["reward"] for r in train[-3:]])
    assert last > first + 0.1, [r["reward"] for r in train]
    assert {"kl", "entropy", "clip_fraction", "value_loss", "beta", "approx_kl"} <= set(train[-1])
    assert len({r["beta"] for r in train}) > 1  # the controller moved β
    report = json.loads((w / "straight" / "report.json").read_text())
    assert report["stage"] == "ppo" and report["held_out"]["n"] == 500
    assert 0.0 <= report["ppo"]["rollout_correct"] <= 1.0  # the verifier on the last rollout
    assert len(report["ppo"]["rollout_examples"]) == 3

    INTERRUPT.update(calls=0, at_call=6)  # Ctrl-C during step 6's rollout: it stops after it
    stopped = run(exp, run_dir=w / "resumed", progress=False, sample=False)
    assert stopped.interrupted and stopped.step == 6
    INTERRUPT.update(at_call=None)
    run(exp, run_dir=w / "resumed", progress=False, sample=False)
    for a, b in zip(final_params(w / "straight"), final_params(w / "resumed")):
        np.testing.assert_array_equal(a, b)
    assert train_rows(w / "resumed") == train


def train_rows(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timing = ("elapsed_s", "tok_per_s", "mfu")
    return [{k: v for k, v in r.items() if k not in timing} for r in rows if r["kind"] == "train"]


def final_params(run_dir):
    _, params, _, _ = checkpoint.load_run_for_inference(run_dir)
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_a_kl_that_becomes_nan_stops_the_run(world):
    """A reference whose log-probabilities are NaN: the first logged step names the KL, and no
    checkpoint from after it is kept."""
    w, experiment = world
    exp = experiment(16, *SEVENS, f"rl.reference={w / 'ref_nan'}")
    with pytest.raises(TrainingDiverged, match="kl became nan .* at step 1"):
        run(exp, run_dir=w / "nan", progress=False, sample=False)
    assert checkpoint.latest_step(w / "nan") is None


def test_reward_model_scores_each_answer_at_its_end(world, stage_and_state):
    """With rl.reward=model the score of a left-padded row is the reward model's score of the
    row alone, read at the answer's last token (its <|end|>, or the last sampled token)."""
    _, experiment = world
    _, _, config, state = stage_and_state
    exp = experiment(16, *SEVENS, "rl.reward=model")
    stage = rlhf.ppo_stage(exp, sharding.make_mesh(""))
    batch = stage.batch(0, state, config)
    rm_config, rm_params, _ = rlhf.load_frozen(exp.rl.reward_model, "reward_model", ("reward",))
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"])
    start_B = (np.asarray(batch["segments"]) == 0).sum(axis=1)
    last_B = np.asarray(heads.last_index(mask)) + 1 - start_B  # in the row moved to slot 0
    right = np.stack([np.roll(row, -s) for row, s in zip(tokens, start_B)])
    alone = heads.sequence_scores(rm_params, jnp.asarray(right), jnp.asarray(last_B), rm_config)
    rows = {k: batch[k] for k in ("tokens", "positions", "segments", "mask")}
    scores = rlhf.reward_model_scores(rm_params, rows, config=rm_config)
    np.testing.assert_allclose(np.asarray(scores), np.asarray(alone), atol=1e-5)
    assert float(batch["figures"]["reward"]) == pytest.approx(float(np.mean(alone)), abs=1e-5)
