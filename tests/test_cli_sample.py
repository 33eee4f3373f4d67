"""`jaxgpt sample` through `jaxgpt.cli.main`: output, seeding, streaming, the sliding window
beyond the context, and one-line errors (exit code 2)."""

import io

import jax
import numpy as np
import pytest

from jaxgpt.cli import main
from jaxgpt.cli.sample import print_stream
from jaxgpt.config import GPTConfig
from jaxgpt.decode import generate
from jaxgpt.params import init_params
from jaxgpt.pretrained import load_hf, save_hf
from jaxgpt.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GPT-2 with the full 50257-token vocabulary, saved as a Hugging Face dir."""
    config = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)
    path = tmp_path_factory.mktemp("cli_model")
    save_hf(config, init_params(config, jax.random.key(0)), path)
    return str(path)


def sample(capsys, *argv):
    code = main(["sample", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prints_prompt_and_continuation(capsys, hf_dir):
    code, out, err = sample(capsys, "--model", hf_dir, "--prompt", "Hello world", "--seed", "1",
                            "--max-new-tokens", "8")  # fmt: skip
    assert code == 0
    assert out.startswith("Hello world") and len(out) > len("Hello world\n")
    assert "tokens/s" in err
    # Same seed, same text; another seed, other text.
    assert sample(capsys, "--model", hf_dir, "--prompt", "Hello world", "--seed", "1",
                  "--max-new-tokens", "8")[1] == out  # fmt: skip
    assert sample(capsys, "--model", hf_dir, "--prompt", "Hello world", "--seed", "2",
                  "--max-new-tokens", "8")[1] != out  # fmt: skip


def test_num_samples_and_prompt_file(capsys, hf_dir, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Once upon")
    code, out, _ = sample(capsys, "--model", hf_dir, "--prompt-file", str(prompt_file),
                          "--num-samples", "2", "--max-new-tokens", "8", "--top-k", "50",
                          "--top-p", "0.9")  # fmt: skip
    assert code == 0
    assert out.count("sample 1 of 2") == 1 and out.count("sample 2 of 2") == 1
    assert out.count("Once upon") == 2


def test_top_k_and_top_p_change_what_is_sampled(capsys, hf_dir):
    """The tiny random model's next-token distribution is nearly flat over 50257 tokens, so a
    plain sample almost surely differs from greedy; top-k 1, or a top-p below the largest
    probability, keeps only the most likely token and must reproduce greedy exactly."""

    def text(*extra):
        code, out, _ = sample(capsys, "--model", hf_dir, "--prompt", "Hello", "--seed", "3",
                              "--max-new-tokens", "12", *extra)  # fmt: skip
        assert code == 0
        return out

    greedy = text("--temperature", "0")
    plain = text()
    assert plain != greedy
    assert text("--top-k", "1") == greedy
    assert text("--top-p", "1e-6") == greedy
    # And a wider filter samples something else again, still not greedy.
    assert text("--top-k", "2") not in (greedy, plain)


def test_preset_says_random_weights(capsys):
    code, out, err = sample(capsys, "--model", "mini", "--prompt", "Hi", "--max-new-tokens", "2",
                            "--temperature", "0")  # fmt: skip
    assert code == 0 and out.startswith("Hi")
    assert "RANDOM weights" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-k", "0"], "top_k"),
        (["--top-p", "1.5"], "top_p"),
        (["--top-p", "0"], "top_p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--num-samples", "0"], "--num-samples"),
        (["--prompt", ""], "prompt is empty"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, hf_dir, args, message):
    code, _, err = sample(capsys, "--model", hf_dir, *args)
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_missing_model_exits_2(capsys, tmp_path):
    code, _, err = sample(capsys, "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 2 and "does not exist" in err
    a_file = tmp_path / "weights.txt"
    a_file.write_text("not a model")
    code, _, err = sample(capsys, "--model", str(a_file), "--prompt", "x")
    assert code == 2 and err.startswith("jaxgpt sample: error:") and "is a file" in err


def test_longer_than_the_context_slides_the_window(capsys, hf_dir):
    """62 new tokens from a model with a 32-token context (windows of 30, 16 and 16 new tokens):
    the documented sliding-window policy (`generate(..., slide=True)`), streamed or not."""
    argv = ["--model", hf_dir, "--prompt", "Hello world", "--temperature", "0",
            "--max-new-tokens", "62"]  # fmt: skip
    code, out, err = sample(capsys, *argv)
    assert code == 0, err
    assert "exceed the context of 32 tokens" in err
    enc = get_tokenizer("gpt2")
    config, params = load_hf(hf_dir)
    prompt = enc.encode("Hello world")
    expected = generate(params, config, prompt, 62, temperature=0, eos_id=enc.eot_token, slide=True)
    assert len(expected) > 32  # the window did slide (no early EOS)
    assert out == enc.decode(expected) + "\n"
    assert sample(capsys, *argv, "--no-stream")[1] == out


def test_print_stream_writes_each_chunk_as_it_arrives(monkeypatch):
    """Each chunk is on stdout before the next is asked for; a character split across two
    byte-level tokens ("ñ" = c3 b1) is printed once complete; the text equals decode()."""
    enc = get_tokenizer("gpt2")
    stdout = io.StringIO()
    monkeypatch.setattr("sys.stdout", stdout)
    prompt = enc.encode("Hola")
    chunks = [[enc.encode(" ma")[0]], [enc.encode_single_token(b"\xc3")],
              [enc.encode_single_token(b"\xb1"), enc.encode("ana")[0]]]  # fmt: skip
    seen = []

    def stream():
        for chunk in chunks:
            seen.append(stdout.getvalue())
            yield np.asarray([chunk])

    n_new = print_stream(enc, prompt, stream())
    assert seen == ["Hola", "Hola ma", "Hola ma"]  # the lone c3 byte waits for its partner
    new = [t for chunk in chunks for t in chunk]
    assert stdout.getvalue() == enc.decode(prompt + new) + "\n" == "Hola mañana\n"
    assert n_new == 4
