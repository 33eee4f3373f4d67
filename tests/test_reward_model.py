"""The reward model: its Bradley–Terry objective, a short training run, and `jaxgpt score`."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt import chat, checkpoint, heads, objectives, reward_model
from jaxgpt.config import GPTConfig
from jaxgpt.errors import ChatFormatError, InputError
from jaxgpt.experiment import Experiment
from jaxgpt.model import hidden_states
from jaxgpt.optim import make_optimizer
from jaxgpt.params import grow_vocab, init_params
from jaxgpt.preferences import get_pair_batch, load_pairs, prepare_preferences, tokenizer_from_meta
from jaxgpt.tokenizer import Tokenizer
from jaxgpt.train import init_train_state

WORDS = ["apple", "river", "stone", "cloud", "ember", "maple", "tiger", "lemon", "ocean", "pearl",
         "cedar", "flame", "grape", "honey", "ivory", "jelly"]  # fmt: skip


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def polite_pairs(path: Path, n: int = 64, seed: int = 0) -> Path:
    """Pairs a tiny model can learn in a few steps: the chosen answer repeats the word politely
    ("please, X!"), the rejected one shouts it ("X?!"), in random order across prompts."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        word = WORDS[i % len(WORDS)] + str(int(rng.integers(100)))
        records.append(
            {"prompt": f"Say {word}.", "chosen": f"please, {word}!", "rejected": f"{word}?!"}
        )
    return _write(path, records)


def reward_run_from(lm_run: Path, out: Path, *, seed: int = 0) -> Path:
    """A run directory holding a reward model started from `lm_run` (a language model, with the
    chat tokens added when it has none): as `jaxgpt train` leaves it before any step."""
    config, params, tokenizer, _ = checkpoint.load_run_for_inference(lm_run)
    tokenizer = chat.with_chat_tokens(tokenizer)
    if config.vocab_size < tokenizer.n_vocab:
        config, params = grow_vocab(config, params, tokenizer.n_vocab, jax.random.key(seed))
    config, params = heads.with_head(config, params, "reward", jax.random.key(seed + 1))
    exp = Experiment.from_dict(checkpoint.read_json(lm_run / checkpoint.EXPERIMENT_FILE))
    optimizer = make_optimizer(exp.optim, exp.schedule)
    out.mkdir(parents=True)
    checkpoint.write_run_files(out, exp.to_dict(), config, tokenizer)
    manager = checkpoint.open_manager(out)
    try:
        checkpoint.save(manager, 0, init_train_state(params, optimizer), {"seed": 0, "step": 0})
    finally:
        manager.close()
    return out


# --------------------------------------------------------------------------- the objective

CONFIG = GPTConfig(vocab_size=0 + 64, block_size=64, n_layer=2, n_head=2, n_embd=32, head="reward")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Tokenizer]:
    tmp = tmp_path_factory.mktemp("rm_pairs")
    meta = prepare_preferences(polite_pairs(tmp / "pairs.jsonl"), tmp / "data", progress=False)
    return tmp / "data", tokenizer_from_meta(meta)


def _numpy_reward_loss(params, batch, config):
    """The objective written out: trunk vectors from `hidden_states`, the head and the loss in
    NumPy (score at the last index where the mask is 1, `-log σ(margin)` via log1p(exp))."""
    head = params["score_head"]
    w_D, b = np.asarray(head["kernel"])[:, 0], float(head["bias"][0])
    trunk = {k: v for k, v in params.items() if k != "score_head"}
    r = {}
    for side in ("chosen", "rejected"):
        tokens_BT1, mask_BT1 = batch[side], batch[f"{side}_mask"]
        T = tokens_BT1.shape[1] - 1
        h_BTD = np.asarray(hidden_states(trunk, tokens_BT1[:, :T], config.replace(head="lm")))
        last_B = [int(np.nonzero(m)[0].max()) for m in mask_BT1]
        r[side] = np.array([h_BTD[i, t] @ w_D + b for i, t in enumerate(last_B)], np.float64)
    margin = r["chosen"] - r["rejected"]
    return np.mean(np.log1p(np.exp(-margin))), np.mean(margin > 0), np.mean(margin)


def test_reward_objective_equals_a_numpy_computation(prepared):
    data_dir, tok = prepared
    config = CONFIG.replace(vocab_size=tok.n_vocab)
    params = init_params(config, jax.random.key(0))
    # A larger head than the init's N(0, 0.02), so the margins are O(1) and the check means more.
    params["score_head"]["kernel"] = params["score_head"]["kernel"] * 50
    batch = {k: v[0] for k, v in get_pair_batch(load_pairs(data_dir, "train"), 6, 40, 0, 0).items()}
    loss, (weight, metrics) = jax.jit(objectives.reward, static_argnums=2)(
        params, batch, config, None
    )
    want_loss, want_acc, want_margin = _numpy_reward_loss(params, batch, config)
    assert want_loss > 0.05 and abs(want_margin) > 0.0  # not a degenerate batch
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward_accuracy"]), want_acc)
    np.testing.assert_allclose(float(metrics["reward_margin"]), want_margin, rtol=1e-4, atol=1e-6)
    assert float(weight) == 6
    assert objectives.get_objective("reward") is objectives.reward


# --------------------------------------------------------------------------- scoring


def test_score_conversations_equals_sequence_scores_row_by_row(prepared):
    _, tok = prepared
    config = CONFIG.replace(vocab_size=tok.n_vocab)
    params = init_params(config, jax.random.key(2))
    params["score_head"]["kernel"] = params["score_head"]["kernel"] * 50
    conversations = [
        [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": a}]
        for w in WORDS[:5]
        for a in (f"please, {w}!", f"{w}?!")
    ]
    got = reward_model.score_conversations(params, config, tok, conversations, batch_size=4)
    for conversation, score in zip(conversations, got):
        ids, _ = chat.render_conversation(conversation, tok)
        assert ids[-1] == chat.chat_tokens(tok).end
        want = heads.sequence_scores(params, np.array([ids]), np.array([len(ids) - 1]), config)
        np.testing.assert_allclose(score, float(want[0]), rtol=1e-5, atol=1e-6)
    assert len(set(np.round(got, 6))) == len(got)  # the answers do get different scores


def test_score_refuses_what_it_cannot_read(prepared):
    _, tok = prepared
    config = CONFIG.replace(vocab_size=tok.n_vocab)
    params = init_params(config, jax.random.key(2))
    with pytest.raises(ChatFormatError, match="conversation 1: the last message is a user turn"):
        reward_model.score_conversations(params, config, tok, [[{"role": "user", "content": "a"}]])
    too_long = [{"role": "user", "content": "a" * 60}, {"role": "assistant", "content": "b"}]
    with pytest.raises(InputError, match="conversation 1 has 66 tokens"):
        reward_model.score_conversations(params, config, tok, [too_long])
    lm = CONFIG.replace(vocab_size=tok.n_vocab, head="lm")
    with pytest.raises(InputError, match="needs a reward model, but the model is a language"):
        reward_model.score_ids(init_params(lm, jax.random.key(0)), lm, [[1, 2]])
    other = chat.with_chat_tokens(type(tok)("xyz"))
    with pytest.raises(InputError, match="another table"):
        reward_model.check_tokenizer(tok, other, "the rollouts")
    reward_model.check_tokenizer(tok, tok, "the rollouts")  # the same table passes
