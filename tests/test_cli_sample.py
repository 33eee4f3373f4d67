"""`jaxgpt sample` through `jaxgpt.cli.main`: output, seeding, and one-line errors (exit code 2)."""

import jax
import pytest

from jaxgpt.cli import main
from jaxgpt.config import GPTConfig
from jaxgpt.params import init_params
from jaxgpt.pretrained import save_hf


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
        (["--max-new-tokens", "40"], "block_size 32"),
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
