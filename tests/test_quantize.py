"""`jaxgpt.quantize`: bfloat16 and int8 weights against the float32 model they came from.

Tolerances, relative to the largest |logit| of the float32 model (O(1) here: weights drawn with
std 0.2 as in conftest's TINY_HF):
* bfloat16 keeps 8 significant bits, a relative rounding error of at most 2^-9 ≈ 0.2 % per
  weight; through two blocks and the head the logits measured 0.5 % off: bound 2 %.
* int8 rounds each weight to the nearest multiple of its channel's scale (max |w| / 127), an error
  of at most 0.4 % of the channel's largest weight; measured 1.8 %: bound 5 %.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.cli import main
from jaxgpt.config import GPTConfig
from jaxgpt.data import corpus_files
from jaxgpt.decode import generate
from jaxgpt.errors import InputError
from jaxgpt.objectives import next_token_loss
from jaxgpt.params import init_params
from jaxgpt.pretrained import load_hf, save_hf
from jaxgpt.quantize import (
    Int8Weight,
    decode_layout,
    quantize_int8,
    quantize_params,
    weight_bytes,
)

RELATIVE_BOUND = {"bfloat16": 0.02, "int8": 0.05}


@pytest.fixture(scope="module")
def tiny(hf_tiny):
    _, path = hf_tiny
    return load_hf(str(path))


def test_int8_rounds_each_weight_to_within_half_its_channel_scale():
    w = jnp.asarray(np.random.RandomState(0).randn(6, 5), jnp.float32).at[:, 2].set(0.0)
    q = quantize_int8(w, axis=-1)
    assert q.q.dtype == jnp.int8 and q.scale.shape == (1, 5)
    assert int(jnp.max(jnp.abs(q.q))) == 127  # the largest weight of each channel maps to ±127
    err = jnp.abs(q.dequantize() - w)
    assert bool(jnp.all(err <= q.scale / 2 + 1e-7))
    assert bool(jnp.all(q.dequantize()[:, 2] == 0.0))  # an all-zero channel stays zero
    rows = quantize_int8(w, axis=0)  # per row, as for the embedding
    assert rows.scale.shape == (6, 1)


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_quantized_logits_close_to_float32_and_fewer_bytes(tiny, tiny_tokens, jit_forward, weights):
    config, params = tiny
    ref = jit_forward(params, tiny_tokens, config)
    quantized = quantize_params(params, weights)
    got = jit_forward(quantized, tiny_tokens, config)
    err = float(jnp.max(jnp.abs(got - ref)))
    scale = float(jnp.max(jnp.abs(ref)))
    assert 0 < err < RELATIVE_BOUND[weights] * scale
    # Pure: the float32 params are untouched; the matmul weights shrink 2x / 4x (biases,
    # LayerNorms and the int8 scales stay float32: 3.7x at this tiny width, 3.9x for GPT-2).
    assert params["wte"].dtype == jnp.float32
    ratio = weight_bytes(params) / weight_bytes(quantized)
    assert 1.9 < ratio <= 2.0 if weights == "bfloat16" else 3.5 < ratio < 4.0
    if weights == "int8":
        kernel = quantized["blocks"][0]["mlp"]["c_fc"]["kernel"]
        assert isinstance(kernel, Int8Weight) and isinstance(quantized["wte"], Int8Weight)


@pytest.fixture(scope="module")
def trained_char_model():
    """A 2-layer, 64-wide character model trained for 150 Adam steps on the bundled play: a
    trained model's predictions are confident, unlike a random one's near-ties."""
    text = corpus_files("shakespeare")[0].read_text(encoding="utf-8")[:20_000]
    chars = sorted(set(text))
    data = np.asarray([chars.index(c) for c in text], np.int32)
    config = GPTConfig(vocab_size=len(chars), block_size=64, n_layer=2, n_head=2, n_embd=64)
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, batch_BT1):
        loss, grads = jax.value_and_grad(next_token_loss)(params, batch_BT1, config, None)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    params = init_params(config, jax.random.key(0))
    opt_state = optimizer.init(params)
    rng = np.random.RandomState(0)
    for _ in range(150):
        starts = rng.randint(0, len(data) - 65, 16)
        batch = np.stack([data[s : s + 65] for s in starts])
        params, opt_state, loss = step(params, opt_state, batch)
    assert float(loss) < 2.6  # it learned something (uniform: ln 61 = 4.1)
    return config, params, data[:8].tolist()


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_greedy_tokens_agree_with_float32_on_a_trained_model(trained_char_model, weights):
    config, params, prompt = trained_char_model
    ref = generate(params, config, prompt, 48, temperature=0.0)
    got = generate(quantize_params(params, weights), config, prompt, 48, temperature=0.0)
    assert got == ref


def test_decode_layout_logits_equal_transformers(hf_tiny, tiny, tiny_tokens, jit_forward):
    torch = pytest.importorskip("torch")
    hf_model, _ = hf_tiny
    config, params = tiny
    flipped = decode_layout(params)
    kernel = params["blocks"][1]["mlp"]["c_fc"]["kernel"]
    kernel_t = flipped["blocks"][1]["mlp"]["c_fc"]["kernel_t"]
    assert "kernel" not in flipped["blocks"][1]["mlp"]["c_fc"]
    np.testing.assert_array_equal(np.asarray(kernel_t), np.asarray(kernel).T)
    with torch.no_grad():
        ref = hf_model(torch.as_tensor(tiny_tokens, dtype=torch.long)).logits.numpy()
    got = np.asarray(jit_forward(flipped, tiny_tokens, config))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert params["blocks"][1]["mlp"]["c_fc"]["kernel"] is kernel  # pure: the input is untouched


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_decode_layout_keeps_every_greedy_token(trained_char_model, weights):
    config, params, prompt = trained_char_model
    quantized = quantize_params(params, weights)
    ref = generate(quantized, config, prompt, 48, temperature=0.0)
    assert generate(decode_layout(quantized), config, prompt, 48, temperature=0.0) == ref
    # Either order: quantizing params already in the decode layout gives the same weights.
    both = quantize_params(decode_layout(params), weights)
    assert generate(both, config, prompt, 48, temperature=0.0) == ref


def test_decode_layout_twice_is_an_error(tiny):
    _, params = tiny
    with pytest.raises(InputError, match="already in the decode layout"):
        decode_layout(decode_layout(params))


def test_quantizing_twice_or_an_unknown_format_is_an_error(tiny):
    _, params = tiny
    with pytest.raises(InputError, match="must be one of float32, bfloat16, int8, got 'int4'"):
        quantize_params(params, "int4")
    with pytest.raises(InputError, match="already quantized"):
        quantize_params(quantize_params(params, "bfloat16"), "int8")
    assert quantize_params(params, "float32") is params


def test_sample_cli_with_int8_weights(capsys, tmp_path):
    config = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)  # GPT-2's vocabulary
    save_hf(config, init_params(config, jax.random.key(0)), tmp_path)
    argv = ["sample", "--model", str(tmp_path), "--prompt", "Hi", "--temperature", "0",
            "--max-new-tokens", "6"]  # fmt: skip
    assert main([*argv, "--weights", "int8"]) == 0
    out_int8, err = capsys.readouterr()
    assert "(int8 weights)" in err and out_int8.startswith("Hi")
    assert main(argv) == 0
    assert capsys.readouterr()[0] == out_int8  # greedy: the same text as float32 here


@pytest.mark.parametrize("command", [["sample", "--model", "tiny"], ["bench", "decode"]])
def test_bad_weights_is_one_line_and_exit_2(capsys, command):
    assert main([*command, "--weights", "int4"]) == 2
    err = capsys.readouterr()[1].strip()
    assert err == (
        f"jaxgpt {command[0]}: error: --weights must be one of float32, bfloat16, int8, got 'int4'"
    )
