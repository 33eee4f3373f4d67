"""`jaxgpt trace`: captured intermediates, attention, report, figures and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.cli import main
from jaxgpt.config import GPTConfig
from jaxgpt.errors import InputError
from jaxgpt.model import unembed
from jaxgpt.params import param_shapes
from jaxgpt.pretrained import save_hf
from jaxgpt.sampling import make_sampler
from jaxgpt.tokenizer import get_tokenizer
from jaxgpt.trace import format_report, token_piece, trace

SPANISH = "Hola mundo. Esta es una prueba de tokenización real."
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    """A tiny model with GPT-2's vocabulary, drawn with numpy (faster than compiling `init_params`
    for a 50257-row embedding). Weights have std 0.16, 8× GPT-2's init, so attention is far from
    uniform and the checks below compare distinct numbers; LayerNorms start at (1, 0)."""
    config = GPTConfig(vocab_size=50257, n_layer=2, n_head=2, n_embd=32, block_size=32)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if len(leaf.shape) == 2:
            return jnp.asarray(rng.normal(0.0, 0.16, leaf.shape), jnp.float32)
        fill = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
        return jnp.full(leaf.shape, fill, jnp.float32)

    return config, jax.tree_util.tree_map_with_path(draw, param_shapes(config))


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def spanish(model, tokenizer):
    config, params = model
    return trace(params, config, tokenizer, SPANISH, layer=1, head=1, token=17, top_k=5)


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory):
    config, params = model
    return save_hf(config, params, tmp_path_factory.mktemp("trace_model"))


def test_intermediates_recompute_the_logits(model, spanish, tokenizer):
    config, params = model
    cap = spanish.captured
    ids = tokenizer.encode(SPANISH)
    wte, wpe = np.asarray(params["wte"]), np.asarray(params["wpe"])
    np.testing.assert_array_equal(cap["x_embed"][0], wte[ids] + wpe[: len(ids)])
    x = cap["x_embed"]
    for lay in cap["layers"]:
        np.testing.assert_array_equal(lay["x_in"], x)
        np.testing.assert_array_equal(lay["x_mid"], lay["x_in"] + lay["attn_out"])
        np.testing.assert_array_equal(lay["x_out"], lay["x_mid"] + lay["mlp_out"])
        assert lay["mlp_hidden"].shape == (1, 20, 4 * config.n_embd)
        x = lay["x_out"]
    # The last block's output through ln_f + the tied unembedding is the logits, bit for bit.
    recomputed = jax.jit(unembed, static_argnames="config")(params, jnp.asarray(x), config)
    np.testing.assert_array_equal(np.asarray(recomputed), cap["logits"])
    assert cap["logits"].shape == (1, 20, 50257)
    assert np.abs(cap["logits"]).max() > 1.0  # not a comparison of near-zero numbers


def test_attention_is_causal_softmax_of_the_captured_q_k(model, spanish):
    config, _ = model
    T, K = spanish.T, config.head_dim
    upper = np.triu(np.ones((T, T), bool), 1)
    for lay in spanish.captured["layers"]:
        att = lay["att"][0].astype(np.float64)  # [H, T, T]
        np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-6)
        assert (att[:, upper] == 0.0).all()  # a token never attends to a later one
        # An independent naive softmax(Q Kᵀ / √K) with the causal mask, in float64.
        q, k, v = (lay[name][0].astype(np.float64) for name in "qkv")
        scores = np.einsum("htk,hsk->hts", q, k) / np.sqrt(K)
        scores[:, upper] = -np.inf
        naive = np.exp(scores - scores.max(-1, keepdims=True))
        naive /= naive.sum(-1, keepdims=True)
        np.testing.assert_allclose(att, naive, atol=1e-5)
        np.testing.assert_allclose(lay["heads"][0], att @ v, atol=1e-5)
    # The scaled weights give a non-uniform pattern, so the checks above have teeth.
    row = spanish.captured["layers"][1]["att"][0, 1, 17, :18]
    assert row.max() > 2 * row.min()


def test_report_lists_the_tokens_with_tiktoken_ids(spanish, tokenizer):
    ids = tokenizer.encode(SPANISH)
    assert len(ids) == 20
    assert spanish.token_ids == tuple(ids)
    assert spanish.pieces == tuple(token_piece(tokenizer, i) for i in ids)
    assert "".join(tokenizer.decode([i]) for i in ids[:3]) == "Hola mund"
    report = format_report(spanish)
    assert "1. Tokenization — 20 tokens, token ids shape [1, 20]" in report
    section = report.split("1. Tokenization")[1].split("2. Embeddings")[0]
    rows = [line.split() for line in section.strip().splitlines()[2:]]
    assert [int(r[0]) for r in rows] == list(range(20))
    assert [int(r[-1]) for r in rows] == ids
    for heading in ("2. Embeddings", "3. Transformer blocks", "4. Residual", "5. Output"):
        assert heading in report
    assert "x [1, 20, 32]" in report and "mlp_hidden [1, 20, 128]" in report
    assert "logits = ln_f(x) · wteᵀ [1, 20, 50257]" in report
    assert "seed 0" in report


def test_weighted_sum_and_sampling_come_from_the_pass(spanish):
    lay = spanish.captured["layers"][1]
    weights = lay["att"][0, 1, 17, :18]
    mixed = (weights[:, None] * lay["v"][0, 1, :18]).sum(0)
    np.testing.assert_allclose(mixed, lay["heads"][0, 1, 17], atol=1e-6)
    logits_1V = jnp.asarray(spanish.captured["logits"][:, -1])
    picks = {p.strategy: p for p in spanish.picks}
    assert picks["greedy"].token_id == int(np.argmax(logits_1V[0])) == spanish.top_ids[0]
    top_k_pick = picks["temperature 0.8, top-k 5"]
    assert top_k_pick.candidates == 5 and top_k_pick.token_id in spanish.top_ids
    expected = make_sampler(0.8, top_k=5)(logits_1V, jax.random.key(0))
    assert top_k_pick.token_id == int(expected[0])
    # The logit lens of the last block reads the final distribution.
    assert spanish.lens[-1].top_ids == spanish.top_ids
    assert [row.name for row in spanish.lens] == ["embeddings", "block 0", "block 1"]
    np.testing.assert_allclose(spanish.top_probs, sorted(spanish.top_probs, reverse=True))


def test_negative_token_counts_from_the_end(model, tokenizer, spanish):
    config, params = model
    from_end = trace(params, config, tokenizer, SPANISH, layer=1, head=1, token=-3, top_k=5)
    assert spanish.T == 20 and from_end.token == spanish.token == 17


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer=2), "layer 2 is out of range: the model has 2 layers"),
        (dict(layer=-1), "layer -1 is out of range"),
        (dict(head=2), "head 2 is out of range: each layer has 2 heads"),
        (dict(token=20), "token 20 is out of range: the prompt has 20 tokens"),
        (dict(token=-21), "token -21 is out of range: the prompt has 20 tokens .or -20 to -1"),
        (dict(top_k=0), "top_k must be an integer from 1 to 100"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
        (dict(top_p=1.5), "top_p must be in"),
        (
            dict(prompt=" hola" * 40),
            r"prompt is \d+ tokens long, more than the model.s block_size 32",
        ),
        (dict(prompt=""), "prompt must be a non-empty string"),
    ],
)
def test_bad_input_is_a_clear_error(model, tokenizer, kwargs, message):
    config, params = model
    kwargs = {"prompt": SPANISH, **kwargs}
    with pytest.raises(InputError, match=message):
        trace(params, config, tokenizer, kwargs.pop("prompt"), **kwargs)


def test_cli_writes_report_png_and_html(hf_dir, tmp_path, capsys):
    out = tmp_path / "trace"
    argv = ["trace", "--model", str(hf_dir), "--prompt", SPANISH, "--layer", "1", "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "1. Tokenization — 20 tokens" in stdout
    assert "block 1\n" in stdout and "head 0, token 19" in stdout
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [
        "attention_layer1_head0.png", "attention_layer1_heads.png",
        "attention_layers_mean.png", "top_k.png",
    ]  # fmt: skip
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
    page = (out / "trace.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4
    assert "5. Output" in page and "&#x27; mund&#x27;" in page
    assert stdout.startswith((out / "report.txt").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--head", "7"], "head 7 is out of range"),
        (["--token", "99"], "token 99 is out of range"),
        (["--prompt", " hola" * 40], "tokens long, more than the model"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(hf_dir, capsys, extra, message):
    assert main(["trace", "--model", str(hf_dir), "--prompt", SPANISH, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxgpt trace: error:") and message in err[0]
