"""`jaxgpt trace --model A --compare B ...`: one answer's log-probabilities under several models,
side by side, with the SFT mask — against `jaxgpt.logprobs` and `chat.render_conversation`."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import chat, logprobs
from jaxgpt.cli import main
from jaxgpt.cli.common import LoadedModel
from jaxgpt.config import GPTConfig
from jaxgpt.errors import InputError
from jaxgpt.params import init_params
from jaxgpt.tokenizer import get_tokenizer
from jaxgpt.trace_answers import compare_answers

MESSAGES = [
    {"role": "user", "content": "What is 45 + 38?"},
    {"role": "assistant", "content": "45 + 38 = 83"},
]


@pytest.fixture(scope="module")
def models():
    """Three tiny random-weight chat models ("stages") with one tokenizer: name → LoadedModel."""
    tokenizer = chat.with_chat_tokens(get_tokenizer("gpt2"))
    config = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, vocab_size=tokenizer.n_vocab)
    return {
        name: LoadedModel(config, init_params(config, jax.random.key(seed)), tokenizer, name)
        for seed, name in enumerate(["base", "sft", "dpo"])
    }


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
    """The models as Hugging Face directories (with the chat tokens): name → path."""
    from jaxgpt.pretrained import save_hf

    root = tmp_path_factory.mktemp("stages")
    return {
        name: save_hf(m.config, m.params, root / name, m.tokenizer) for name, m in models.items()
    }


def test_values_are_logprobs_and_marks_are_the_sft_mask(models):
    cmp = compare_answers(list(models.items()), MESSAGES)
    ids, mask = chat.render_conversation(MESSAGES, models["base"].tokenizer)
    assert cmp.ids == tuple(ids) and cmp.mask == tuple(mask) and cmp.names == ("base", "sft", "dpo")
    for row, m in zip(cmp.logprobs_MT, models.values()):
        direct = np.asarray(logprobs(m.params, m.config, jnp.asarray([ids])))[0]
        np.testing.assert_allclose(row, direct, rtol=0, atol=1e-5)
    assert len(set(map(tuple, cmp.logprobs_MT))) == 3  # three different models
    trained = np.asarray(mask[1:], bool)
    np.testing.assert_allclose(cmp.trained_sums(), cmp.logprobs_MT[:, trained].sum(1), rtol=1e-6)


def test_cli_table_and_html(models, saved, tmp_path, capsys):
    html = tmp_path / "answer.html"
    argv = ["trace", "--model", str(saved["base"]), "--compare", str(saved["sft"]),
            str(saved["dpo"]), "--prompt", MESSAGES[0]["content"], "--answer",
            MESSAGES[1]["content"], "--html", str(html)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    cmp = compare_answers(list(models.items()), MESSAGES)
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+  ", line)]
    assert len(rows) == len(cmp.ids)
    for t, line in enumerate(rows):
        assert line.split()[0] == str(t)
        numbers = re.findall(r"-?\d+\.\d{4}", line)
        if t == 0:
            assert numbers == []  # <|bos|>: nothing before it to predict it from
        else:
            np.testing.assert_allclose([float(x) for x in numbers[-3:]],
                                       cmp.logprobs_MT[:, t - 1], atol=6e-5)  # fmt: skip
    marked = [t for t, line in enumerate(rows) if re.match(r"\s+\d+  .*?\s\*\s", line)]
    assert marked == [t for t, m in enumerate(cmp.mask) if m]
    page = html.read_text()
    assert page.count('<tr class="trained">') == sum(cmp.mask)
    assert page.count('<tr class="context">') == len(cmp.ids) - sum(cmp.mask)
    assert page.count("background:hsl(") == 3 * (len(cmp.ids) - 1)

    # The same conversation from a JSON file gives the same table.
    conversation = tmp_path / "conv.json"
    conversation.write_text(json.dumps({"messages": MESSAGES}))
    argv = ["trace", "--model", str(saved["base"]), "--compare", str(saved["sft"]),
            str(saved["dpo"]), "--conversation", str(conversation)]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == out.split("\n\nwrote")[0].strip()


def test_models_must_share_a_tokenizer(models, saved, tmp_path, capsys):
    from jaxgpt.pretrained import save_hf

    config = GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32)
    plain = save_hf(config, init_params(config, jax.random.key(0)), tmp_path / "plain",
                    get_tokenizer("gpt2"))  # fmt: skip
    html = tmp_path / "x.html"
    argv = ["trace", "--model", str(saved["sft"]), "--compare", str(plain), "--prompt", "hi",
            "--answer", "yo", "--html", str(html)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another tokenizer" in err and "gpt2 + 5 added tokens" in err
    assert not html.exists()
    with pytest.raises(InputError, match="another tokenizer"):
        other = LoadedModel(config, None, get_tokenizer("gpt2"), "plain")
        compare_answers([("sft", models["sft"]), ("plain", other)], MESSAGES)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "hi"], "needs --prompt (the user's message) and --answer"),
        (["--prompt", "hi", "--answer", "yo", "--out", "somewhere"], "--html FILE"),
        (["--conversation", "nope.json"], "cannot read --conversation"),
        (["--prompt", "hi", "--answer", "yo", "--html", "x.png"], "unknown file type"),
    ],
)
def test_bad_compare_input_is_one_line(saved, extra, message, capsys):
    argv = ["trace", "--model", str(saved["sft"]), "--compare", str(saved["dpo"]), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
