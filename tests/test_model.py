"""The forward pass: parity with Hugging Face GPT-2, causality, dropout, dtypes and bad input."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import get_preset
from jaxgpt.errors import InputError
from jaxgpt.model import forward, forward_cached, init_cache
from jaxgpt.params import init_params
from jaxgpt.pretrained import load_hf


@pytest.fixture(scope="module")
def tiny():
    config = get_preset("tiny")
    return config, init_params(config, jax.random.key(0))


@pytest.fixture(scope="module")
def hf_loaded(hf_tiny):
    _, path = hf_tiny
    return load_hf(path)


def test_logits_match_transformers(hf_tiny, hf_loaded, tiny_tokens, jit_forward):
    torch = pytest.importorskip("torch")
    model, _ = hf_tiny
    config, params = hf_loaded
    ours = np.asarray(jit_forward(params, jnp.asarray(tiny_tokens), config))
    with torch.no_grad():
        theirs = model(torch.tensor(tiny_tokens, dtype=torch.long)).logits.numpy()
    assert ours.shape == theirs.shape == (2, 24, 320)
    assert ours.dtype == np.float32
    assert np.abs(theirs).max() > 1.0  # a meaningful comparison, not two near-zero tensors
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_causality(tiny, jit_forward):
    config, params = tiny
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (1, 16)).astype(np.int32)
    changed = tokens.copy()
    changed[0, 10] = (changed[0, 10] + 1) % config.vocab_size
    a = np.asarray(jit_forward(params, jnp.asarray(tokens), config))
    b = np.asarray(jit_forward(params, jnp.asarray(changed), config))
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert np.abs(a[:, 10:] - b[:, 10:]).max() > 0


def test_causality_by_gradient(tiny):
    """The logit at position t has zero gradient with respect to embeddings after t."""
    config, params = tiny
    tokens = jnp.arange(12, dtype=jnp.int32)[None]

    def logit_at_5(wpe):
        return forward({**params, "wpe": wpe}, tokens, config)[0, 5].sum()

    grad_wpe = jax.grad(logit_at_5)(params["wpe"])
    assert jnp.abs(grad_wpe[6:12]).max() == 0
    assert jnp.abs(grad_wpe[:6]).max() > 0


def test_dropout_only_in_training(tiny, jit_forward):
    config, params = tiny
    config = config.replace(embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
    tokens = jnp.zeros((2, 8), jnp.int32)
    evals = [jit_forward(params, tokens, config) for _ in range(2)]
    np.testing.assert_array_equal(evals[0], evals[1])
    t1 = jit_forward(params, tokens, config, train=True, key=jax.random.key(1))
    t1b = jit_forward(params, tokens, config, train=True, key=jax.random.key(1))
    t2 = jit_forward(params, tokens, config, train=True, key=jax.random.key(2))
    np.testing.assert_array_equal(t1, t1b)
    assert np.abs(np.asarray(t1 - t2)).max() > 0
    assert np.abs(np.asarray(t1 - evals[0])).max() > 0
    with pytest.raises(InputError, match="key"):
        forward(params, tokens, config, train=True)


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot_general in a jaxpr, nested jaxprs (scan, remat) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_operand_dtypes(sub)
    return found


def test_bfloat16_compute_runs_in_bfloat16(tiny):
    """Every matmul of the bfloat16 model takes bfloat16 operands (float32 ones in float32)."""
    config, params = tiny
    tokens = jnp.zeros((2, 16), jnp.int32)
    for dtype in ("bfloat16", "float32"):
        run = functools.partial(forward, config=config.replace(dtype=dtype))
        dots = _dot_operand_dtypes(jax.make_jaxpr(run)(params, tokens).jaxpr)
        # Per block: c_attn, QK^T, PV, attention c_proj, c_fc, MLP c_proj; then the unembedding.
        assert len(dots) >= 6 + 1
        assert all(d == (dtype, dtype) for d in dots), dots


def test_bfloat16_compute_close_to_float32(tiny, jit_forward):
    config, params = tiny
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, config.vocab_size, (2, 16)), jnp.int32)
    f32 = jit_forward(params, tokens, config)
    bf16 = jit_forward(params, tokens, config.replace(dtype="bfloat16"))
    assert bf16.dtype == jnp.float32
    err = float(jnp.abs(f32 - bf16).max())
    scale = float(jnp.abs(f32).max())
    # bfloat16 keeps 8 significant bits: each matmul operand is rounded by up to 2^-9 (0.2 %)
    # relative. The logits pass through 2 blocks of 4 rounded matmuls (whose errors add, and
    # LayerNorm rescales) and the unembedding: a few percent of the logit scale at most. A model
    # that ignored the dtype would give an error of 0 (float32 rounding is ~1e-7 of the scale).
    assert 1e-4 * scale < err < 0.03 * scale, (err, scale)


def test_capture_recomputes_logits(tiny, jit_forward):
    config, params = tiny
    tokens = jnp.arange(10, dtype=jnp.int32)[None]
    logits, captured = jit_forward(params, tokens, config, capture=True)
    # A different compiled program (it materialises the attention weights): equal to rounding.
    np.testing.assert_allclose(logits, jit_forward(params, tokens, config), atol=1e-6)
    assert len(captured["layers"]) == config.n_layer
    att = captured["layers"][0]["att"]
    assert att.shape == (1, config.n_head, 10, 10)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-6)
    assert float(jnp.triu(att[0, 0], k=1).max()) == 0.0


def test_cached_forward_equals_forward(tiny, jit_forward):
    """Prefill then one-token steps through the KV cache reproduce the full forward's logits."""
    config, params = tiny
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, config.vocab_size, (2, 12)), jnp.int32)
    full = jit_forward(params, tokens, config)
    cache = init_cache(config, batch=2, max_len=16)
    start = jnp.zeros((2,), jnp.int32)
    prefill, cache = forward_cached(params, tokens[:, :8], config, cache, 0, start)
    np.testing.assert_allclose(prefill, full[:, :8], atol=1e-5)
    for t in range(8, 12):
        step, cache = forward_cached(params, tokens[:, t : t + 1], config, cache, t, start)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


def test_cached_forward_checks_its_inputs(tiny):
    """forward_cached refuses what would otherwise be clamped or silently wrong."""
    config, params = tiny
    cache = init_cache(config, batch=1, max_len=8)
    start = jnp.zeros((1,), jnp.int32)
    ok = jnp.zeros((1, 4), jnp.int32)
    cases = [
        (dict(q_offset=5), "q_offset 5 \\+ 4 tokens does not fit the cache of 8 slots"),
        (dict(q_offset=-1), "q_offset -1"),
        (dict(tokens=jnp.zeros((1, 9), jnp.int32), q_offset=0), "exceeds .* 8"),
        (dict(tokens=jnp.full((1, 4), 512, jnp.int32)), "token id 512"),
        (dict(tokens=jnp.zeros((4,), jnp.int32)), "rank 2"),
        (dict(tokens=jnp.zeros((1, 4), jnp.float32)), "integer dtype"),
        (dict(tokens=jnp.zeros((2, 4), jnp.int32)), "cache arrays must have shape"),
        (dict(cache=cache[:1]), "one \\(k, v\\) pair per layer \\(2\\), got 1"),
        (dict(start=jnp.zeros((3,), jnp.int32)), "kv_start_B must have shape"),
    ]
    for change, message in cases:
        args = dict(tokens=ok, cache=cache, q_offset=0, start=start) | change
        with pytest.raises(InputError, match=message):
            forward_cached(
                params, args["tokens"], config, args["cache"], args["q_offset"], args["start"]
            )
    # Under jit the offset is traced: the shape checks still run (T against the cache length).
    jitted = jax.jit(forward_cached, static_argnames="config")
    with pytest.raises(InputError, match="exceeds"):
        jitted(params, jnp.zeros((1, 9), jnp.int32), config, cache, 0, start)
    logits, _ = jitted(params, ok, config, cache, jnp.int32(4), start)
    assert logits.shape == (1, 4, config.vocab_size)


@pytest.mark.parametrize(
    "tokens,message",
    [
        (np.zeros((4,), np.int32), "rank 2"),
        (np.zeros((1, 4), np.float32), "integer dtype"),
        (np.zeros((1, 65), np.int32), "block_size 64"),
        (np.full((1, 4), 512, np.int32), "token id 512 is outside the vocabulary"),
        (np.full((1, 4), -1, np.int32), "token id -1"),
        (np.zeros((1, 0), np.int32), "empty"),
        ([[1, 2]], "integer array"),
    ],
)
def test_bad_tokens(tiny, tokens, message):
    config, params = tiny
    with pytest.raises(InputError, match=message):
        forward(params, tokens, config)


def test_params_that_do_not_match_the_config(tiny):
    config, params = tiny
    with pytest.raises(InputError, match="wte"):
        forward({**params, "wte": params["wte"][:10]}, jnp.zeros((1, 4), jnp.int32), config)
    with pytest.raises(InputError, match="missing"):
        forward(params, jnp.zeros((1, 4), jnp.int32), config.replace(n_layer=3))
