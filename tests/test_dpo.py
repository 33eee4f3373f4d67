"""DPO: the objective against an independent NumPy computation on transformers' log-probs, and
short DPO runs of the one training loop (it learns, resumes exactly, refuses bad setups)."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from jaxgpt import arithmetic, dpo
from jaxgpt.cli.common import load_model
from jaxgpt.errors import ConfigError
from jaxgpt.experiment import apply_overrides, load_experiment
from jaxgpt.objectives import get_objective
from jaxgpt.plot import read_metrics
from jaxgpt.preferences import reference_logprobs
from jaxgpt.pretrained import load_hf
from jaxgpt.train import run
from tests.conftest import TINY_HF

# --------------------------------------------------------------------------- the objective


def _torch_token_logprobs(model, tokens_BT1: np.ndarray) -> np.ndarray:
    """transformers' log-softmax of each next token: `[B, T]` (the target of position t is
    token t + 1)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor(tokens_BT1[:, :-1], dtype=torch.long)).logits
        logp = torch.log_softmax(logits.double(), dim=-1)
        target = torch.tensor(tokens_BT1[:, 1:], dtype=torch.long)[..., None]
        return logp.gather(-1, target)[..., 0].numpy()


def _numpy_dpo(pol_c, pol_r, ref_c, ref_r, beta):
    margin = beta * ((pol_c - ref_c) - (pol_r - ref_r))
    return float(np.mean(np.log1p(np.exp(-margin)))), float(np.mean(margin > 0))


def test_dpo_objective_equals_numpy_on_transformers_logprobs(hf_tiny, tmp_path):
    """Policy: the tiny Hugging Face model as jaxgpt loads it; reference: another tiny model
    (other weights), whose per-token log-probs reach the batch through `reference_logprobs`.
    The loss and reward accuracy equal a NumPy DPO on transformers' log-softmax values."""
    import torch
    import transformers

    policy_hf, policy_dir = hf_tiny
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(**TINY_HF, bos_token_id=0, eos_token_id=0)
    reference_hf = transformers.GPT2LMHeadModel(cfg).eval()
    reference_hf.save_pretrained(tmp_path / "ref")
    config, params = load_hf(policy_dir)
    ref_config, ref_params = load_hf(tmp_path / "ref")

    rng = np.random.default_rng(0)
    B, T1, V = 3, 20, TINY_HF["vocab_size"]
    batch = {}
    spans = [(8, 20), (5, 14), (11, 17)]  # each row's answer; after it the row is padding
    for side in ("chosen", "rejected"):
        tokens = rng.integers(0, V, (B, T1)).astype(np.int32)
        mask = np.zeros((B, T1), np.int32)
        for b, (start, stop) in enumerate(spans):
            if side == "rejected":  # the same prompt and first two answer tokens, then not
                tokens[b, : start + 2] = batch["chosen"][b, : start + 2]
                tokens[b, start + 2] = (batch["chosen"][b, start + 2] + 1) % V
            mask[b, start:stop] = 1
            tokens[b, stop:] = 0
        batch[side], batch[f"{side}_mask"] = tokens, mask
        batch[f"{side}_reference"] = reference_logprobs(ref_params, ref_config)(tokens)

    beta = 0.5
    loss, (weight, metrics) = jax.jit(get_objective("dpo", beta=beta), static_argnums=2)(
        params, batch, config, None
    )

    def seq(model, side):  # Σ over the answer's targets, in float64 NumPy
        logp_BT = _torch_token_logprobs(model, batch[side])
        return (logp_BT * batch[f"{side}_mask"][:, 1:]).sum(-1)

    want_loss, want_acc = _numpy_dpo(
        seq(policy_hf, "chosen"), seq(policy_hf, "rejected"),
        seq(reference_hf, "chosen"), seq(reference_hf, "rejected"), beta,
    )  # fmt: skip
    assert float(weight) == B
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-4, atol=1e-5)
    assert float(metrics["reward_accuracy"]) == pytest.approx(want_acc)
    assert abs(want_loss - np.log(2)) > 1e-2  # the two models differ: a non-trivial value
    # DPO + NLL: plus the chosen answers' negative log-likelihood per answer token.
    with_nll, _ = jax.jit(get_objective("dpo", beta=beta, nll_weight=0.3), static_argnums=2)(
        params, batch, config, None
    )
    nll = -seq(policy_hf, "chosen").sum() / batch["chosen_mask"][:, 1:].sum()
    np.testing.assert_allclose(float(with_nll), want_loss + 0.3 * nll, rtol=1e-4)

    # first_difference: only the first token where the two rows differ (answer token 2).
    def first(model, side):
        logp_BT = _torch_token_logprobs(model, batch[side])
        return np.array([logp_BT[b, start + 1] for b, (start, _) in enumerate(spans)])

    want_first, _ = _numpy_dpo(
        first(policy_hf, "chosen"), first(policy_hf, "rejected"),
        first(reference_hf, "chosen"), first(reference_hf, "rejected"), beta,
    )  # fmt: skip
    objective = get_objective("dpo", beta=beta, first_difference=True)
    got_first, _ = jax.jit(objective, static_argnums=2)(params, batch, config, None)
    np.testing.assert_allclose(float(got_first), want_first, rtol=1e-4, atol=1e-5)
    assert abs(want_first - want_loss) > 1e-3


def test_freeze_embeddings_gives_the_token_embedding_no_gradient():
    from jaxgpt.config import GPTConfig
    from jaxgpt.params import init_params

    config = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    batch = {}
    for side in ("chosen", "rejected"):
        batch[side] = rng.integers(0, 16, (2, 9)).astype(np.int32)
        batch[f"{side}_mask"] = np.array([[0] * 4 + [1] * 5] * 2, np.int32)
        batch[f"{side}_reference"] = rng.normal(size=(2, 9)).astype(np.float32)
    grads = {}
    for freeze in (False, True):
        objective = get_objective("dpo", freeze_embeddings=freeze)
        _, grads[freeze] = jax.value_and_grad(objective, has_aux=True)(params, batch, config, None)
    assert not np.asarray(grads[True]["wte"]).any() and np.asarray(grads[False]["wte"]).any()
    np.testing.assert_array_equal(grads[True]["wpe"], grads[False]["wpe"])


# --------------------------------------------------------------------------- DPO runs

SFT_EXPERIMENT = """
from jaxgpt.experiment import *

EXPERIMENT = Experiment(
    name="tiny_sft",
    model=ModelSection(n_layer=2, n_head=2, n_embd=32, block_size=64),
    data=DataSection(dataset="tiny_chat", format="chat", source={source!r}, tokenizer="char",
                     batch_size=8, val_fraction=0.1),
    optim=OptimSection(lr=1e-2, weight_decay=0.0),
    schedule=ScheduleSection(max_steps=40, warmup_steps=5),
    eval=EvalSection(interval=40, batches=1, log_interval=10, sample_tokens=0),
    checkpoint=CheckpointSection(interval=40, keep=1),
)
"""

DPO_EXPERIMENT = """
from jaxgpt.experiment import *

EXPERIMENT = Experiment(
    name="tiny_dpo",
    model=ModelSection(n_layer=2, n_head=2, n_embd=32, block_size=64, init={init!r}),
    data=DataSection(dataset="tiny_pairs", format="preference", source={source!r},
                     tokenizer="char", batch_size=8, val_fraction=0.2),
    optim=OptimSection(lr=2e-3, weight_decay=0.0),
    schedule=ScheduleSection(max_steps=40, warmup_steps=2),
    eval=EvalSection(interval=20, batches=4, log_interval=1, sample_tokens=0),
    checkpoint=CheckpointSection(interval=20, keep=2),
    dpo=DPOSection(beta=0.5),
)
"""


def _pairs(n: int) -> list[dict]:
    """Arithmetic prompts; chosen: the worked answer; rejected: the worked answer of another
    problem (its first operand miscopied) — a preference a small model can learn quickly."""
    rng = np.random.default_rng(3)
    out = []
    for a, b in arithmetic.draw_pairs(rng, n, held_out=False):
        other = (a + 1 + int(rng.integers(98))) % 100
        out.append({"prompt": arithmetic.question(a, b), "chosen": arithmetic.answer(a, b),
                    "rejected": arithmetic.answer(other, b)})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(root, the DPO experiment file): a tiny 40-step SFT run and 200 preference pairs."""
    root = tmp_path_factory.mktemp("dpo")
    source = root / "chat.jsonl"
    arithmetic.write_jsonl(source, arithmetic.training_conversations(300, seed=5))
    (root / "sft.py").write_text(SFT_EXPERIMENT.format(source=str(source)))
    run(load_experiment(str(root / "sft.py")), run_dir=root / "sft", data_root=root / "data",
        progress=False, sample=False)  # fmt: skip
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in _pairs(200)))
    (root / "dpo.py").write_text(DPO_EXPERIMENT.format(init=str(root / "sft"), source=str(pairs)))
    return root


def _train_rows(run_dir):
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_a_short_dpo_run_learns_the_preferences(world):
    exp = load_experiment(str(world / "dpo.py"))
    result = run(exp, run_dir=world / "dpo", data_root=world / "data", progress=False)
    rows = _train_rows(result.run_dir)
    # Step 1 uses the weights of the reference itself: every margin is 0, the loss is log 2.
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert abs(rows[0]["reward_margin"]) < 1e-4
    assert np.mean([r["loss"] for r in rows[-10:]]) < np.log(2) - 0.1
    # The fixed evaluation batches: the training pairs are learnt, and it carries over to the
    # val pairs, whose prompts no step trained on.
    evals = [r for r in read_metrics(result.run_dir) if r["kind"] == "eval"]
    assert evals[-1]["train_loss"] < 0.5 and evals[-1]["train_reward_accuracy"] > 0.7
    assert evals[-1]["val_loss"] < np.log(2) - 0.05 and evals[-1]["val_reward_margin"] > 0.2
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["stage"] == "dpo" and report["dpo"]["beta"] == 0.5
    assert report["dpo"]["val_reward_accuracy"] == evals[-1]["val_reward_accuracy"]


def test_held_out_kl_is_zero_for_the_reference_and_positive_after_dpo(world):
    sft = load_model(str(world / "sft"))
    exp = load_experiment(str(world / "dpo.py"))
    reference = dpo.load_reference(exp, sft.tokenizer)
    same = dpo.held_out_kl(sft.params, sft.config, sft.tokenizer, reference, n=20)
    assert same["mean"] == pytest.approx(0.0, abs=1e-5) and same["n"] == 20
    if not (world / "dpo" / "report.json").is_file():
        pytest.skip("needs the DPO run of test_a_short_dpo_run_learns_the_preferences")
    policy = load_model(str(world / "dpo"))
    moved = dpo.held_out_kl(policy.params, policy.config, policy.tokenizer, reference, n=20)
    assert moved["mean"] > 1e-3


def test_dpo_resumes_exactly_and_on_the_fly_equals_precomputed(world, tmp_path):
    exp = apply_overrides(load_experiment(str(world / "dpo.py")), ["schedule.max_steps=12",
                          "checkpoint.interval=6", "eval.interval=6"])  # fmt: skip
    straight = run(exp, run_dir=tmp_path / "a", data_root=world / "data", progress=False,
                   sample=False)  # fmt: skip
    resumed = tmp_path / "b"
    shutil.copytree(straight.run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "12")
    run(exp, run_dir=resumed, data_root=world / "data", progress=False, sample=False)

    def losses(run_dir):
        return [(r["step"], r["loss"], r["reward_margin"]) for r in _train_rows(run_dir)]

    assert losses(resumed) == losses(straight.run_dir) and len(losses(resumed)) == 12
    a, b = (load_model(str(d)).params for d in (straight.run_dir, resumed))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    fly = apply_overrides(exp, ["dpo.reference_logprobs=on_the_fly"])
    on_the_fly = run(fly, run_dir=tmp_path / "c", data_root=world / "data", progress=False,
                     sample=False)  # fmt: skip
    np.testing.assert_allclose(
        [r[1] for r in losses(on_the_fly.run_dir)], [r[1] for r in losses(straight.run_dir)],
        rtol=1e-5,
    )  # fmt: skip


def test_bad_dpo_setups_are_refused_before_any_work(world, tmp_path):
    exp = load_experiment(str(world / "dpo.py"))
    with pytest.raises(ConfigError, match="needs a reference model"):
        run(apply_overrides(exp, ["model.init=scratch"]), run_dir=tmp_path / "r1",
            data_root=world / "data", progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="not a jaxgpt run directory"):
        run(apply_overrides(exp, [f"dpo.reference={tmp_path}"]), run_dir=tmp_path / "r2",
            data_root=world / "data", progress=False)  # fmt: skip
    # A reference trained on other characters: its ids would mean other text.
    other = world / "sft_other"
    if not other.exists():
        shutil.copytree(world / "sft", other)
        spec = json.loads((other / "tokenizer.json").read_text())
        spec["chars"] = spec["chars"].replace("W", "Z")
        (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=r"the DPO reference \(dpo.reference\) .* different"):
        run(apply_overrides(exp, [f"dpo.reference={other}"]), run_dir=tmp_path / "r3",
            data_root=world / "data", progress=False)  # fmt: skip
    assert not (tmp_path / "r3" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="dpo.beta"):
        apply_overrides(exp, ["dpo.beta=0"])


# --------------------------------------------------------------------------- jaxgpt pairs


def _answer(text, score, finished=True):
    from jaxgpt.pairing import Answer

    return Answer(text, score, finished)


def test_pairing_rule_worked_examples():
    from jaxgpt.pairing import pair_answers

    ok, ok2, bad, worse = (_answer("so 5", 1.0), _answer("=5 so 5", 1.0), _answer("so 6", 0.0),
                           _answer("so 60", -1.0))  # fmt: skip
    # All the same score (all right, or all wrong): a tie, no pair.
    assert pair_answers([ok, ok2, ok], 2) == []
    assert pair_answers([bad, _answer("so 7", 0.0)], 2) == []
    # Mixed: best answers paired with lower ones, worst first; no answer twice; at most K.
    assert pair_answers([ok, bad, ok2, worse], 2) == [(ok, worse), (ok2, bad)]
    assert pair_answers([ok, bad, ok2, worse], 1) == [(ok, worse)]
    assert pair_answers([ok, ok, bad, bad], 2) == [(ok, bad)]  # duplicates count once
    # An answer cut off by the token limit is never chosen, whatever it scores.
    cut = _answer("so 5 and", 1.0, finished=False)
    assert pair_answers([cut, bad], 2) == [(bad, cut)]


def test_arithmetic_prompts_are_seeded_and_never_held_out():
    from jaxgpt.pairing import arithmetic_prompts, check_prompts

    prompts = arithmetic_prompts(300, seed=4)
    assert prompts == arithmetic_prompts(300, seed=4) != arithmetic_prompts(300, seed=5)
    check_prompts(prompts, "arithmetic")
    for p in prompts:
        assert not arithmetic.is_held_out(*arithmetic.operands(p[0]["content"]))
    with pytest.raises(Exception, match="prompt 2: .*held-out problem 14 \\+ 7"):
        check_prompts([prompts[0], [{"role": "user", "content": "What is 14 + 7?"}]],
                      "arithmetic")  # fmt: skip


def test_pairs_command_samples_scores_and_writes_preferences(world, tmp_path, monkeypatch, capsys):
    """With a scorer that prefers longer answers (the tiny model rarely adds right), the
    written pairs follow the rule, read back as preference data, and depend only on the seed."""
    from jaxgpt import pairing
    from jaxgpt.cli import main
    from jaxgpt.preferences import read_preferences

    monkeypatch.setitem(pairing.SCORERS, "length", lambda prompt, reply: float(len(reply)))
    argv = ["pairs", "--model", str(world / "sft"), "--n-prompts", "12", "--samples", "3",
            "--scorer", "length", "--max-new-tokens", "30", "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "a.jsonl")]) == 0
    out = capsys.readouterr().out
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert f"wrote {len(lines)} pairs" in out and "of 12 prompts gave pairs" in out
    assert lines and all(len(x["chosen"]) > len(x["rejected"]) or x["scores"][1] is None
                         for x in lines)  # fmt: skip
    assert len(read_preferences(tmp_path / "a.jsonl")) == len(lines)
    assert main([*argv, "--out", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    # --greedy: each prompt's greedy answer joins its samples (here the longest usually wins).
    assert main([*argv, "--greedy", "--out", str(tmp_path / "c.jsonl")]) == 0
    assert len(read_preferences(tmp_path / "c.jsonl")) >= 1
