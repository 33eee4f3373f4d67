"""SFT end to end on a tiny model, then `jaxgpt chat`: streaming, the KV cache across turns,
the batch mode and its bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxgpt import arithmetic, chat
from jaxgpt.chat_data import describe_mask, load_documents
from jaxgpt.cli import main
from jaxgpt.cli.common import load_model
from jaxgpt.conversation import Conversation
from jaxgpt.decode import generate
from jaxgpt.errors import InputError
from jaxgpt.experiment import apply_overrides, load_experiment
from jaxgpt.packing import Documents
from jaxgpt.plot import read_metrics
from jaxgpt.train import run

SFT_EXPERIMENT = """
from jaxgpt.experiment import *

EXPERIMENT = Experiment(
    name="tiny_sft",
    model=ModelSection(n_layer=2, n_head=2, n_embd=32, block_size=128),
    data=DataSection(dataset="tiny_chat", format="chat", source={source!r}, tokenizer="char",
                     batch_size=4, val_fraction=0.1),
    optim=OptimSection(lr=1e-2, weight_decay=0.0),
    schedule=ScheduleSection(max_steps=30, warmup_steps=5),
    eval=EvalSection(interval=15, batches=2, log_interval=5, sample_tokens=20,
                     sample_prompt="What is 1 + 2?", temperature=0.0),
    checkpoint=CheckpointSection(interval=15, keep=1),
)
"""


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A finished 30-step SFT run on 400 arithmetic conversations: (result, root)."""
    root = tmp_path_factory.mktemp("sft")
    source = root / "train.jsonl"
    arithmetic.write_jsonl(source, arithmetic.training_conversations(400, seed=5))
    exp_file = root / "tiny_sft.py"
    exp_file.write_text(SFT_EXPERIMENT.format(source=str(source)))
    exp = load_experiment(str(exp_file))
    result = run(exp, run_dir=root / "run", data_root=root / "data", progress=False)
    return result, root


def test_sft_run_trains_only_the_assistant_and_reports(sft_run):
    result, root = sft_run
    rows = [r for r in read_metrics(result.run_dir) if r["kind"] == "train"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["stage"] == "sft" and report["steps"] == 30
    assert result.sample.startswith("user: What is 1 + 2?\nassistant: ")
    docs = load_documents(root / "data" / "tiny_chat", "train")
    # Every trained token lies inside an assistant turn: header and user text are never trained.
    tok = load_model(str(result.run_dir)).tokenizer
    ids = chat.chat_tokens(tok)
    tokens, mask = np.asarray(docs.tokens), np.asarray(docs.mask)
    assert mask[np.isin(tokens, [ids.bos, ids.user, ids.assistant, ids.system])].sum() == 0
    assert mask[tokens == ids.end].mean() == pytest.approx(0.5, abs=0.05)  # user <|end|>s are 0


def test_mask_all_ones_or_zeros_is_refused():
    tokens = np.arange(6, dtype=np.int32)
    for value in (0, 1):
        docs = Documents(tokens, np.full(6, value, np.uint8), np.array([0, 3, 6]))
        with pytest.raises(InputError, match="all zeros" if value == 0 else "all ones"):
            describe_mask(docs, 16, "test data")


def test_greedy_prompt_is_deterministic_and_equals_generate(sft_run, capsys):
    result, _ = sft_run
    argv = ["chat", "--model", str(result.run_dir), "--prompt", "What is 3 + 4?",
            "--temperature", "0", "--max-new-tokens", "30"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first
    model = load_model(str(result.run_dir))
    prompt = chat.render_prompt([{"role": "user", "content": "What is 3 + 4?"}], model.tokenizer)
    end = chat.chat_tokens(model.tokenizer).end
    out = generate(model.params, model.config, prompt, 30, temperature=0.0, eos_id=end)
    assert first == model.tokenizer.decode([t for t in out[len(prompt) :] if t != end]) + "\n"


def test_conversation_streams_and_reuses_the_cache(sft_run):
    result, _ = sft_run
    model = load_model(str(result.run_dir))
    session = Conversation(model.params, model.config, model.tokenizer, temperature=0.0,
                           max_new_tokens=30)  # fmt: skip
    pieces = list(session.reply("What is 3 + 4?"))
    assert "".join(pieces) == session.messages[-1]["content"]
    assert len(pieces) == session.turn_stats[0].generated > 1  # one piece per token: streamed
    second = "".join(session.reply("What is 10 + 20?"))
    stats = session.turn_stats[1]
    assert not stats.restarted and stats.prefilled < stats.without_reuse
    # The user's turn and the carried last token only, never the first turn again.
    user_turn = chat.render_prompt([{"role": "user", "content": "What is 10 + 20?"}],
                                   model.tokenizer)[1:]  # fmt: skip
    assert stats.prefilled in (len(user_turn) + 1, len(user_turn) + 2)
    # Reusing the cache answers exactly what a fresh prefill of the whole conversation does.
    end = chat.chat_tokens(model.tokenizer).end
    whole = chat.render_prompt(session.messages[:-1], model.tokenizer)
    out = generate(model.params, model.config, whole, 30, temperature=0.0, eos_id=end)
    assert second == model.tokenizer.decode([t for t in out[len(whole) :] if t != end])


def test_input_output_batch_mode(sft_run, tmp_path):
    result, _ = sft_run
    questions = ["What is 3 + 4?", "Add 10 and 20.", "What is 55 + 12?"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "id": i})
                           + "\n" for i, q in enumerate(questions)))  # fmt: skip
    out = tmp_path / "out.jsonl"
    argv = ["chat", "--model", str(result.run_dir), "--input", str(src), "--output", str(out),
            "--temperature", "0", "--max-new-tokens", "30", "--batch-size", "2"]  # fmt: skip
    assert main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [0, 1, 2]
    model = load_model(str(result.run_dir))
    session = Conversation(model.params, model.config, model.tokenizer, temperature=0.0,
                           max_new_tokens=30)  # fmt: skip
    assert lines[0]["messages"][-1] == {
        "role": "assistant",
        "content": "".join(session.reply(questions[0])),
    }


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--input", "/no/such.jsonl", "--output", "OUT"], "is not a file"),
        (["--input", "BADJSON", "--output", "OUT"], "not valid JSON"),
        (["--input", "NOUSER", "--output", "OUT"], "must end with a user turn"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["--input", "BADJSON"], "go together"),
    ],
)
def test_bad_input_is_one_line(sft_run, tmp_path, extra, message):
    result, _ = sft_run
    (tmp_path / "bad.jsonl").write_text('{"messages": [}\n')
    nouser = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    (tmp_path / "nouser.jsonl").write_text(json.dumps(nouser) + "\n")
    names = {"BADJSON": tmp_path / "bad.jsonl", "NOUSER": tmp_path / "nouser.jsonl",
             "OUT": tmp_path / "out.jsonl"}  # fmt: skip
    extra = [str(names.get(x, x)) for x in extra]
    proc = subprocess.run(
        [sys.executable, "-m", "jaxgpt", "chat", "--model", str(result.run_dir), *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.jsonl").exists()


def test_a_model_without_chat_tokens_says_how_to_get_one(trained_pretraining_run):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxgpt", "chat", "--model", str(trained_pretraining_run),
         "--prompt", "hi"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "no chat tokens" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def trained_pretraining_run(tmp_path_factory, tiny_corpus):
    from tests.conftest import TINY_EXPERIMENT

    root = tmp_path_factory.mktemp("pre")
    path = root / "tiny.py"
    path.write_text(TINY_EXPERIMENT.format(source=str(tiny_corpus), steps=6, eval_interval=6,
                                           ckpt_interval=6))  # fmt: skip
    run(load_experiment(str(path)), run_dir=root / "run", data_root=root / "data",
        progress=False, sample=False)  # fmt: skip
    return root / "run"


def test_held_out_evaluation_scores_replies(sft_run):
    result, _ = sft_run
    model = load_model(str(result.run_dir))
    scored = arithmetic.evaluate_model(model.params, model.config, model.tokenizer, n=20,
                                       batch_size=8)  # fmt: skip
    assert scored["n"] == 20 and 0.0 <= scored["accuracy"] <= 1.0
    for example in scored["examples"]:
        a, b = (int(x) for x in arithmetic._LAST_INTEGER.findall(example["question"]))
        assert example["correct"] == arithmetic.verify(example["reply"], a, b)


def test_eval_arithmetic_scores_a_chat_model(sft_run, tmp_path, capsys):
    result, _ = sft_run
    out = tmp_path / "acc.json"
    argv = ["eval", "--model", str(result.run_dir), "--arithmetic", "12", "--json", str(out)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    model = load_model(str(result.run_dir))
    direct = arithmetic.evaluate_model(model.params, model.config, model.tokenizer, n=12)
    assert record["accuracy"] == direct["accuracy"] and record["n"] == 12
    assert "held-out arithmetic (12 problems" in capsys.readouterr().out


def test_a_reply_read_in_part_keeps_the_conversation_consistent(sft_run):
    """Ctrl-C while a reply streams: the turn is kept as far as it was made, and the next turn
    answers exactly what a fresh prefill of the recorded conversation gives."""
    result, _ = sft_run
    model = load_model(str(result.run_dir))
    session = Conversation(model.params, model.config, model.tokenizer, temperature=0.0,
                           max_new_tokens=20, chunk=3)  # fmt: skip
    stream = session.reply("What is 3 + 4?")
    next(stream)
    stream.close()  # the reader stops after the first piece
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    second = "".join(session.reply("Add 10 and 20."))
    end = chat.chat_tokens(model.tokenizer).end
    whole = chat.render_prompt(session.messages[:-1], model.tokenizer)
    out = generate(model.params, model.config, whole, 20, temperature=0.0, eos_id=end)
    assert second == model.tokenizer.decode([t for t in out[len(whole) :] if t != end])


def test_prepare_chat_shows_what_is_trained(tmp_path, capsys):
    src = tmp_path / "chats.jsonl"
    arithmetic.write_jsonl(src, arithmetic.training_conversations(40, seed=2))
    assert main(["prepare", str(src), str(tmp_path / "data"), "--format", "chat", "--quiet"]) == 0
    out = capsys.readouterr().out
    shown = out.splitlines()[1]
    first = json.loads(src.read_text().splitlines()[0])["messages"]
    answer = next(m["content"] for m in first if m["role"] == "assistant")
    # The assistant's words and its <|end|> are bracketed; the user's question is not.
    assert f"[{answer}<|end|>]" in shown
    question = next(m["content"] for m in first if m["role"] == "user")
    assert f"<|user|>{question}<|end|>" in shown
    assert "train and" in out.splitlines()[-1] and "said by the assistant" in out


def test_sft_resumes_exactly(sft_run, tmp_path):
    """The one loop's exact resume holds for the SFT objective too: packed batches are a pure
    function of (seed, step), so a run resumed from checkpoint 10 logs the same losses and ends
    with the same parameters, bit for bit — with dropout on."""
    _, root = sft_run
    exp = apply_overrides(load_experiment(str(root / "tiny_sft.py")), [
        "schedule.max_steps=20", "checkpoint.interval=10", "checkpoint.keep=2",
        "eval.interval=10", "model.dropout=0.1",
    ])  # fmt: skip
    reference = run(exp, run_dir=tmp_path / "ref", data_root=root / "data", progress=False,
                    sample=False)  # fmt: skip
    resumed = tmp_path / "resumed"
    shutil.copytree(reference.run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "20")
    result = run(exp, run_dir=resumed, data_root=root / "data", progress=False, sample=False)
    assert result.step == 20

    def losses(run_dir):
        return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["kind"] == "train"]

    assert losses(resumed) == losses(reference.run_dir) and len(losses(resumed)) == 4
    ours = load_model(str(resumed)).params
    theirs = load_model(str(reference.run_dir)).params
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
