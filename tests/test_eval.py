"""Log-probabilities, strided perplexity and multiple-choice scoring, each against transformers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgpt
from jaxgpt.cli import main
from jaxgpt.config import GPTConfig
from jaxgpt.data import load_tokens, prepare
from jaxgpt.errors import InputError
from jaxgpt.eval import (
    ChoiceItem,
    bucket_length,
    evaluate_choices,
    perplexity,
    read_choices,
    windows,
)
from jaxgpt.params import init_params
from jaxgpt.pretrained import load_hf, save_hf
from jaxgpt.shards import write_shard
from jaxgpt.tokenizer import CharTokenizer, get_tokenizer

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_loaded(hf_tiny):
    return load_hf(hf_tiny[1])


def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    """log p(ids[t+1] | ids[:t+1]) from transformers, written without jaxgpt."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]], dtype=torch.long)).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


# --------------------------------------------------------------------------- logprobs


def test_logprobs_match_transformers(hf_tiny, hf_loaded, tiny_tokens):
    model, _ = hf_tiny
    config, params = hf_loaded
    ours = jax.jit(jaxgpt.logprobs, static_argnames="config")(
        params, config, jnp.asarray(tiny_tokens)
    )
    assert ours.shape == (2, 23) and ours.dtype == jnp.float32
    theirs = np.stack([hf_logprobs(model, list(row)) for row in tiny_tokens])
    assert theirs.min() < -3  # sharp enough distributions for the comparison to mean something
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_minus_mean_logprobs_is_the_training_loss(hf_loaded, tiny_tokens):
    from jaxgpt.objectives import next_token_loss

    config, params = hf_loaded
    tokens = jnp.asarray(tiny_tokens)
    ours = -jax.jit(jaxgpt.logprobs, static_argnames="config")(params, config, tokens).mean()
    training = jax.jit(next_token_loss, static_argnames="config")(params, tokens, config, None)
    np.testing.assert_allclose(ours, training, rtol=1e-5)


# --------------------------------------------------------------------------- perplexity


def test_windows_score_every_token_once_with_context():
    for n, block, stride in [(100, 16, 16), (100, 16, 5), (100, 16, 1), (10, 16, 8), (17, 16, 4)]:
        seen = []
        for start, first, end in windows(n, block, stride):
            assert end - start <= block + 1 and start < first <= end
            seen += range(first, end)
            if start > 0:  # later windows: at least block - stride + 1 tokens of context
                assert first - start >= block - stride + 1
        assert seen == list(range(1, n))
    with pytest.raises(InputError, match="stride"):
        list(windows(100, 16, 17))


def hf_strided_loss(model, ids: list[int], max_len: int, stride: int):
    """The strided recipe of the transformers docs ("Perplexity of fixed-length models"), with
    windows of max_len + 1 tokens (max_len inputs): returns (summed NLL, tokens scored)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_len + 1, len(ids))
        trg_len = min(end - prev_end, end - begin - 1)  # new targets (token 0 has no context)
        nll -= hf_logprobs(model, ids[begin:end])[-trg_len:].sum()
        count += trg_len
        prev_end = end
        if end == len(ids):
            break
    return nll, count


@pytest.fixture(scope="module")
def char_data(tmp_path_factory, tiny_corpus):
    out = tmp_path_factory.mktemp("char_data")
    meta = prepare(tiny_corpus, out, split_chunk=2048, progress=False)
    return out, CharTokenizer(meta["chars"])


@pytest.mark.parametrize("n, stride", [(240, 16), (400, 64), (40, 32)])
def test_perplexity_matches_transformers(hf_tiny, hf_loaded, char_data, n, stride):
    model, _ = hf_tiny
    config, params = hf_loaded
    data_dir, tok = char_data
    tokens = load_tokens(data_dir, "val")[:n]
    ours = perplexity(params, config, tokens, tok, stride=stride, batch_size=3)
    nll, count = hf_strided_loss(model, [int(t) for t in tokens], config.block_size, stride)
    n_bytes = len(tok.decode(tokens[1:]).encode("utf-8"))
    assert ours.tokens == count == n - 1 and ours.bytes == n_bytes
    assert ours.stride == stride and ours.context == config.block_size == 64
    np.testing.assert_allclose(ours.loss, nll / count, rtol=1e-4)
    np.testing.assert_allclose(ours.perplexity, math.exp(nll / count), rtol=1e-4)
    np.testing.assert_allclose(ours.bits_per_byte, nll / math.log(2) / n_bytes, rtol=1e-4)


def test_tokens_outside_the_vocabulary_are_refused(hf_loaded):
    config, params = hf_loaded
    with pytest.raises(InputError, match="token id 320 is outside"):
        perplexity(params, config, np.array([1, 2, 320, 4]), CharTokenizer("abc"))


def test_bits_per_byte_counts_utf8_bytes_of_bpe_tokens():
    enc = get_tokenizer("gpt2")
    text = "naïve café — 東京"
    ids = [*enc.encode_ordinary(text), enc.eot_token]
    assert jaxgpt.eval.utf8_bytes(enc, ids) == len(text.encode("utf-8"))


# --------------------------------------------------------------------------- multiple choice


ALPHABET = "abcdefghij .,"


def generated_items(seed: int, n: int) -> list[ChoiceItem]:
    """Random items over a small alphabet: 2-5 choices of 1-12 characters, varied contexts."""
    rng = np.random.default_rng(seed)

    def text(lo, hi):
        return "".join(rng.choice(list(ALPHABET), size=int(rng.integers(lo, hi))))

    items = []
    for i in range(n):
        k = int(rng.integers(2, 6))
        context = text(90, 100) if i == 0 else text(1, 13)  # item 0 overflows the 64-token window
        choices = tuple(text(1, 13) for _ in range(k))
        items.append(ChoiceItem(context, choices, int(rng.integers(k))))
    return items


def hf_choice_scores(model, tok, item: ChoiceItem, max_len: int) -> list[tuple[float, int]]:
    """(summed log-probability, tokens) per choice: the choice `" " + text` after the context,
    the context cut on the left so the whole fits in `max_len` tokens."""
    scores = []
    for choice in item.choices:
        ending = tok.encode(" " + choice)
        ids = (tok.encode(item.context) + ending)[-max_len:]
        scores.append((float(hf_logprobs(model, ids)[-len(ending) :].sum()), len(ending)))
    return scores


def test_choices_match_transformers(hf_tiny, hf_loaded):
    model, _ = hf_tiny
    config, params = hf_loaded
    tok = CharTokenizer(ALPHABET)
    items = generated_items(0, 10)
    # Batches of 3 rows: three length buckets (16, 32, 65), several batches each.
    result = evaluate_choices(params, config, tok, items, batch_size=3)

    correct, correct_norm = [], []
    for i, item in enumerate(items):
        ref = hf_choice_scores(model, tok, item, config.block_size + 1)
        sums = np.array([s for s, _ in ref])
        counts = np.array([c for _, c in ref])
        np.testing.assert_allclose(result.logprob_sums[i], sums, rtol=1e-4, atol=1e-4)
        assert result.choice_tokens[i] == tuple(counts)
        correct.append(np.argmax(sums) == item.label)
        correct_norm.append(np.argmax(sums / counts) == item.label)
    assert result.items == 10
    assert result.acc == pytest.approx(np.mean(correct))
    assert result.acc_norm == pytest.approx(np.mean(correct_norm))
    p = np.mean(correct)
    assert result.acc_stderr == pytest.approx(math.sqrt(p * (1 - p) / (len(items) - 1)))


def test_bucket_lengths_are_bounded():
    lengths = {bucket_length(n, 1025) for n in range(1, 1026)}
    assert lengths == {16, 32, 64, 128, 256, 512, 1024, 1025}
    assert bucket_length(17, 20) == 20


def write_lines(path, *rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD_HS = {"ctx": "A man is sitting on a roof. he", "endings": ["a", "b", "c", "d"], "label": 3}


def test_read_hellaswag_and_generic(tmp_path):
    path = write_lines(tmp_path / "hs.jsonl", GOOD_HS, "", {**GOOD_HS, "label": "1"})
    items = read_choices(path, "hellaswag")
    assert [it.label for it in items] == [3, 1] and items[0].choices == ("a", "b", "c", "d")
    assert len(read_choices(path, "hellaswag", limit=1)) == 1
    mc = {"context": "2+2 =", "choices": ["4", "5"], "answer": 0}
    path = write_lines(tmp_path / "mc.jsonl", mc)
    assert read_choices(path, "mc") == [ChoiceItem("2+2 =", ("4", "5"), 0)]


def test_choice_rows_are_context_then_spaced_choice():
    enc = get_tokenizer("gpt2")
    item = ChoiceItem("A man <|endoftext|> is on a roof. he", ("is ripping tiles off.", "x"), 0)
    rows = jaxgpt.eval._encode_rows([item], enc, 1025)
    context = enc.encode_ordinary(item.context)  # the special token's text stays text
    assert rows[0] == (context + enc.encode_ordinary(" is ripping tiles off."), 5)
    assert rows[1] == (context + enc.encode_ordinary(" x"), 1)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ({"endings": ["a", "b"], "label": 0}, "missing field 'ctx'"),
        ({**GOOD_HS, "endings": ["only one"], "label": 0}, "need at least 2"),
        ({**GOOD_HS, "label": 4}, "must be an index in [0, 3], got 4"),
        ({**GOOD_HS, "label": -1}, "got -1"),
        ([1, 2], "expected a JSON object"),
        ({**GOOD_HS, "endings": "abcd"}, "must be a list of strings"),
        ({**GOOD_HS, "ctx": ""}, "'ctx' must be a non-empty string"),
    ],
)
def test_bad_items_name_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "hs.jsonl", GOOD_HS, GOOD_HS, bad)
    with pytest.raises(InputError) as err:
        read_choices(path, "hellaswag")
    assert f"{path}:3: " in str(err.value) and message in str(err.value)


def test_untokenizable_item_names_file_and_line(tmp_path, hf_loaded):
    config, params = hf_loaded
    ok = {"context": "abc", "choices": ["a", "b"], "answer": 0}
    path = write_lines(tmp_path / "mc.jsonl", ok, {**ok, "choices": ["a", "Z"]})
    with pytest.raises(InputError, match=f"{path}:2: characters \\['Z'\\]"):
        evaluate_choices(params, config, CharTokenizer(ALPHABET), read_choices(path, "mc"))


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def gpt2_model_dir(tmp_path_factory):
    """A tiny random GPT-2 with the full BPE vocabulary, saved as a Hugging Face directory."""
    config = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)
    path = tmp_path_factory.mktemp("eval_model")
    save_hf(config, init_params(config, jax.random.key(0)), path)
    return path


def test_cli_data_and_task_write_json(tmp_path, capsys, gpt2_model_dir, tiny_documents):
    data = tmp_path / "bpe"
    prepare(tiny_documents, data, tokenizer="gpt2", workers=1, progress=False)
    out = tmp_path / "ppl.json"
    argv = ["eval", "--model", str(gpt2_model_dir), "--data", str(data), "--stride", "8",
            "--max-tokens", "100", "--json", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "bits per byte" in capsys.readouterr().out
    record = json.loads(out.read_text())
    config, params = load_hf(gpt2_model_dir)
    expected = perplexity(params, config, load_tokens(data, "val")[:100], get_tokenizer(), stride=8)
    assert record["tokens"] == 99 and record["split"] == "val"
    assert record["loss"] == pytest.approx(expected.loss, rel=1e-6)

    task = write_lines(tmp_path / "hs.jsonl", GOOD_HS, {**GOOD_HS, "label": 0})
    out = tmp_path / "hs.json"
    argv = ["eval", "--model", str(gpt2_model_dir), "--task", "hellaswag", str(task),
            "--json", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "acc_norm" in capsys.readouterr().out
    record = json.loads(out.read_text())
    expected = evaluate_choices(params, config, get_tokenizer(), read_choices(task, "hellaswag"))
    assert record["items"] == 2 and record["task"] == "hellaswag"
    assert record["acc"] == expected.acc and record["acc_norm"] == expected.acc_norm


def test_cli_reads_llmc_shards(tmp_path, capsys, gpt2_model_dir):
    enc = get_tokenizer()
    tokens = enc.encode_ordinary("It was the best of times, it was the worst of times. " * 6)
    write_shard(tmp_path / "val_000000.bin", tokens)
    out = tmp_path / "shard.json"
    argv = ["eval", "--model", str(gpt2_model_dir), "--data", str(tmp_path / "val_000000.bin"),
            "--json", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    config, params = load_hf(gpt2_model_dir)
    record = json.loads(out.read_text())
    expected = perplexity(params, config, np.array(tokens), enc)
    assert record["tokens"] == len(tokens) - 1 and record["split"] is None
    assert record["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert record["bytes"] == len(enc.decode(tokens[1:]).encode("utf-8"))
    capsys.readouterr()
    (tmp_path / "cut.bin").write_bytes((tmp_path / "val_000000.bin").read_bytes()[:-2])
    assert main(["eval", "--model", str(gpt2_model_dir), "--data", str(tmp_path / "cut.bin")]) == 2
    assert "truncated body" in capsys.readouterr().err


def test_cli_checks_json_path_and_numbers_first(tmp_path, capsys):
    task = write_lines(tmp_path / "hs.jsonl", GOOD_HS)
    cases = [
        (["--json", str(tmp_path / "no" / "r.json")], "does not exist"),
        (["--json", str(tmp_path)], "is a directory"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ]
    for extra, message in cases:
        # The model does not exist: these errors must come before any loading.
        code = main(["eval", "--model", str(tmp_path / "nope"), "--task", "hellaswag", str(task),
                     *extra])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1


def run_cli(*argv):
    return subprocess.run(
        [sys.executable, "-m", "jaxgpt", "eval", *argv], capture_output=True, text=True, timeout=120
    )


def test_cli_bad_jsonl_line_exits_2(tmp_path):
    task = write_lines(tmp_path / "mc.jsonl", {"context": "x", "choices": ["a", "b"], "answer": 1},
                       {"context": "x", "choices": ["a", "b"]})  # fmt: skip
    proc = run_cli("--model", "tiny", "--task", "mc", str(task))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"jaxgpt eval: error: {task}:2: missing field 'answer'"


def test_cli_data_of_another_tokenizer_exits_2(gpt2_model_dir, char_data):
    data_dir, _ = char_data
    proc = run_cli("--model", str(gpt2_model_dir), "--data", str(data_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxgpt eval: error: ") and f"{data_dir / 'meta.json'}" in last
    assert "'char'" in last and "'gpt2'" in last
