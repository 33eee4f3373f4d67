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


def _numpy_auxiliary_terms(params, batch, config):
    """`reward`'s two optional terms written out in NumPy: the Bradley–Terry loss of the scores
    read at the first token where chosen and rejected differ (pairs where either side is outside
    its answer there left out), and the chosen answers' mean next-token loss through the tied
    embedding."""
    head = params["score_head"]
    w_D, b = np.asarray(head["kernel"])[:, 0], float(head["bias"][0])
    trunk = {k: v for k, v in params.items() if k != "score_head"}
    lm = config.replace(head="lm")
    h = {}
    for side in ("chosen", "rejected"):
        T = batch[side].shape[1] - 1
        h[side] = np.asarray(hidden_states(trunk, batch[side][:, :T], lm), np.float64)
    losses = []
    for i, (c, r) in enumerate(zip(batch["chosen"], batch["rejected"])):
        t = int(np.nonzero(c != r)[0][0])
        if batch["chosen_mask"][i, t] and batch["rejected_mask"][i, t]:
            margin = (h["chosen"][i, t] - h["rejected"][i, t]) @ w_D
            losses.append(np.log1p(np.exp(-margin)))
    wte = np.asarray(params["wte"], np.float64)
    nll = []
    for i, c in enumerate(batch["chosen"]):
        for t in np.nonzero(batch["chosen_mask"][i, 1:])[0]:
            logits = h["chosen"][i, t] @ wte.T
            top = logits.max()
            nll.append(top + np.log(np.exp(logits - top).sum()) - logits[c[t + 1]])
    del b  # the bias cancels in a difference
    return np.mean(losses), len(losses), np.mean(nll)


def test_reward_objective_auxiliary_terms_equal_numpy(prepared):
    data_dir, tok = prepared
    config = CONFIG.replace(vocab_size=tok.n_vocab)
    params = init_params(config, jax.random.key(3))
    params["score_head"]["kernel"] = params["score_head"]["kernel"] * 50
    batch = {k: v[0] for k, v in get_pair_batch(load_pairs(data_dir, "train"), 6, 40, 0, 0).items()}
    plain, _ = objectives.reward(params, batch, config, None)
    want_first, pairs, want_nll = _numpy_auxiliary_terms(params, batch, config)
    assert pairs >= 4 and want_first > 0.05 and want_nll > 1.0  # both terms mean something
    objective = objectives.get_objective("reward", nll_weight=0.5, first_difference_weight=2.0)
    assert objective is objectives.get_objective(
        "reward", nll_weight=0.5, first_difference_weight=2.0
    )  # the same settings reuse the compiled step
    loss, (_, metrics) = jax.jit(objective, static_argnums=2)(params, batch, config, None)
    np.testing.assert_allclose(float(metrics["pairwise_loss"]), float(plain), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["first_difference_loss"]), want_first, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["nll_chosen"]), want_nll, rtol=1e-4)
    np.testing.assert_allclose(
        float(loss), float(plain) + 0.5 * want_nll + 2.0 * want_first, rtol=1e-4
    )


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


# --------------------------------------------------------------------------- a reward-model run

RM_EXPERIMENT = """
from jaxgpt.experiment import *

EXPERIMENT = Experiment(
    name="tiny_rm",
    model=ModelSection(n_layer=2, n_head=2, n_embd=32, block_size=48, head="reward"),
    data=DataSection(dataset="tiny_pairs", format="preference", source={source!r},
                     tokenizer="char", batch_size=8, val_fraction=0.25),
    optim=OptimSection(lr=3e-3, weight_decay=0.0),
    schedule=ScheduleSection(max_steps=30, warmup_steps=2),
    eval=EvalSection(interval=15, batches=4, log_interval=1, sample_tokens=0),
    checkpoint=CheckpointSection(interval=15, keep=2),
)
"""


@pytest.fixture(scope="module")
def rm_world(tmp_path_factory):
    """(root, experiment file, the finished 30-step run) on 96 polite/shouting pairs."""
    from jaxgpt.experiment import load_experiment
    from jaxgpt.train import run

    root = tmp_path_factory.mktemp("rm")
    pairs = polite_pairs(root / "pairs.jsonl", n=96, seed=1)
    (root / "rm.py").write_text(RM_EXPERIMENT.format(source=str(pairs)))
    exp = load_experiment(str(root / "rm.py"))
    result = run(exp, run_dir=root / "rm", data_root=root / "data", progress=False)
    return root, exp, result


def _rows(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / checkpoint.METRICS_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_a_short_reward_model_run_learns_the_preferences(rm_world):
    _, _, result = rm_world
    train = _rows(result.run_dir, "train")
    assert {"reward_accuracy", "reward_margin"} <= train[0].keys()
    assert train[0]["loss"] == pytest.approx(np.log(2), abs=0.15)  # a fresh head: scores ~0
    assert np.mean([r["loss"] for r in train[-5:]]) < 0.2
    evals = _rows(result.run_dir, "eval")
    assert evals[-1]["val_reward_accuracy"] > 0.95 and evals[-1]["val_reward_margin"] > 1.0
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["stage"] == "reward" and "held_out" not in report
    val = report["reward"]["val_pairs"]
    assert val["n"] >= 10 and val["accuracy"] > 0.95 and val["margin"] > 1.0
    assert result.sample is None  # a reward model writes no text


def test_score_cli_equals_sequence_scores(rm_world, tmp_path, capsys):
    from jaxgpt.cli import main
    from jaxgpt.preferences import Preference

    _, _, result = rm_world
    lines = [
        {"prompt": "Say maple7.", "chosen": "please, maple7!", "rejected": "maple7?!"},
        {"prompt": "Say ocean5.", "chosen": "ocean5?!", "rejected": "please, ocean5!"},
        {"messages": [{"role": "user", "content": "Say cedar1."},
                      {"role": "assistant", "content": "please, cedar1!"}]},
    ]  # fmt: skip
    source, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "scores.jsonl"
    argv = ["--model", str(result.run_dir), "--input", str(source), "--output", str(out)]
    assert main(["score", *argv, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "2 pairs: pairwise accuracy 0.5000" in printed and "1 answers" in printed
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert scored[0]["chosen_wins"] and not scored[1]["chosen_wins"]
    config, params, tok, _ = checkpoint.load_run_for_inference(result.run_dir)

    def direct(messages):
        ids, _ = chat.render_conversation(messages, tok)
        last = np.array([len(ids) - 1])
        return float(heads.sequence_scores(params, np.array([ids]), last, config)[0])

    for line, row in zip(lines[:2], scored):
        pref = Preference(({"role": "user", "content": line["prompt"]},), line["chosen"],
                          line["rejected"])  # fmt: skip
        assert row["chosen_score"] == pytest.approx(direct(pref.conversation("chosen")), abs=1e-5)
        assert row["rejected_score"] == pytest.approx(
            direct(pref.conversation("rejected")), abs=1e-5
        )
        assert row["margin"] == pytest.approx(row["chosen_score"] - row["rejected_score"])
    assert scored[2]["score"] == pytest.approx(direct(lines[2]["messages"]), abs=1e-5)
    assert scored[2]["messages"] == lines[2]["messages"]  # the input line is kept


def test_reward_model_run_resumes_exactly(rm_world, tmp_path):
    import shutil

    from jaxgpt.experiment import apply_overrides
    from jaxgpt.train import run

    root, exp, _ = rm_world
    exp = apply_overrides(exp, ["schedule.max_steps=8", "checkpoint.interval=4",
                                "eval.interval=4", "optim.grad_accum=2"])  # fmt: skip
    straight = run(exp, run_dir=tmp_path / "a", data_root=root / "data", progress=False)
    resumed = tmp_path / "b"
    shutil.copytree(straight.run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")
    run(exp, run_dir=resumed, data_root=root / "data", progress=False)

    def losses(run_dir):
        return [(r["step"], r["loss"], r["reward_accuracy"]) for r in _rows(run_dir, "train")]

    assert losses(resumed) == losses(straight.run_dir) and len(losses(resumed)) == 8
    a, b = (checkpoint.load_run_for_inference(d)[1] for d in (straight.run_dir, resumed))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_reward_model_setups_are_refused_before_any_work(rm_world, tmp_path):
    from jaxgpt.errors import ConfigError
    from jaxgpt.experiment import apply_overrides
    from jaxgpt.train import run

    root, exp, _ = rm_world
    with pytest.raises(InputError, match="reads at most 24"):
        run(apply_overrides(exp, ["model.block_size=24"]), run_dir=tmp_path / "r1",
            data_root=root / "data", progress=False)  # fmt: skip
    assert not (tmp_path / "r1" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="model.head='reward' trains a reward model"):
        apply_overrides(exp, ["data.format=chat"])
