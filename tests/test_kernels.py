"""The Pallas kernels and the attention backend switch, against the reference XLA path.

On CPU the kernels run in the Pallas interpreter (the same kernel bodies GPUs and TPUs compile),
so shapes are tiny and blocks are 16 wide to get several blocks per sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.attention import multi_head_attention, reference_attention, resolve_backend
from jaxgpt.config import get_preset
from jaxgpt.errors import ConfigError
from jaxgpt.kernels import BlockSizes, DecodeBlocks, decode_attention, flash_attention
from jaxgpt.model import forward, forward_cached, init_cache
from jaxgpt.params import param_shapes

BLOCKS = BlockSizes(16, 16)
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def random_qkv(shape_q, S, dtype, seed=0):
    rng = np.random.RandomState(seed)
    B, H, T, D = shape_q
    q = jnp.asarray(rng.randn(B, H, T, D), dtype)
    k = jnp.asarray(rng.randn(B, H, S, D), dtype)
    v = jnp.asarray(rng.randn(B, H, S, D), dtype)
    cotangent = jnp.asarray(rng.randn(B, H, T, D), dtype)
    return q, k, v, cotangent


def value_and_grads(attend, q, k, v, cotangent):
    """(out, (dq, dk, dv)) of `attend`, the gradients of <out, cotangent>, in one compile."""

    def loss(q, k, v):
        out = attend(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


# (B, H, T, S, D), q_offset, kv_start_B, dtype
CASES = {
    "one-block-head128": ((1, 1, 16, 16, 128), 0, None, "float32"),
    "cache-offset-ragged": ((2, 3, 9, 37, 16), 28, [0, 5], "float32"),
    # Row 0 plain causal, row 1 left-padded: 3 blocks of 16 with a partial tail block.
    "many-blocks-tail-left-padded": ((2, 2, 40, 40, 16), 0, [0, 21], "float32"),
    "bf16-head64": ((2, 2, 33, 33, 64), 0, [3, 0], "bfloat16"),
}


@pytest.mark.parametrize("case", CASES)
def test_flash_attention_matches_reference_forward_and_backward(case):
    (B, H, T, S, D), q_offset, kv_start, dtype = CASES[case]
    q, k, v, cotangent = random_qkv((B, H, T, D), S, dtype)
    kv_start_B = None if kv_start is None else jnp.asarray(kv_start, jnp.int32)
    kw = dict(q_offset=q_offset, kv_start_B=kv_start_B)

    out, grads = value_and_grads(
        functools.partial(flash_attention, block_sizes=BLOCKS, **kw), q, k, v, cotangent
    )
    ref_out, ref_grads = value_and_grads(
        lambda q, k, v: reference_attention(q, k, v, **kw)[0], q, k, v, cotangent
    )
    tol = TOLERANCE[dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    for name, x, ref_x in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        # Values reach a few units and bf16 rounding is relative: scale the bound by the largest.
        scale = max(1.0, float(jnp.max(jnp.abs(ref_x.astype(jnp.float32)))))
        assert max_err(x, ref_x) < tol * scale, name


def test_decode_kernel_matches_reference_for_ragged_rows():
    """One query per row at slot 95 of a 100-slot cache; rows start at 0, 30 and 90, and one
    row (start 97 > 95) has no valid key at all: the reference's uniform average."""
    q, k, v, _ = random_qkv((4, 2, 1, 16), 100, "float32", seed=1)
    kv_start_B = jnp.asarray([0, 30, 90, 97], jnp.int32)
    decode = jax.jit(
        lambda q, k, v, offset: decode_attention(
            q, k, v, q_offset=offset, kv_start_B=kv_start_B, blocks=DecodeBlocks(32, 16)
        )
    )
    for offset in (95, 40):  # a traced offset: one compile serves every decode step
        out = decode(q, k, v, offset)
        ref, _ = reference_attention(q, k, v, q_offset=offset, kv_start_B=kv_start_B)
        assert max_err(out, ref) < 1e-5


def test_pallas_backend_routes_single_queries_with_a_cache_to_the_decode_kernel():
    q, k, v, _ = random_qkv((2, 2, 1, 16), 48, "float32", seed=2)
    kv_start_B = jnp.asarray([0, 7], jnp.int32)
    jaxpr = jax.make_jaxpr(
        lambda q, k, v: multi_head_attention(
            q, k, v, backend="pallas", q_offset=20, kv_start_B=kv_start_B
        )
    )(q, k, v)
    assert "jaxgpt_decode_attention" in str(jaxpr)
    assert "jaxgpt_flash_forward" not in str(jaxpr)


@pytest.fixture(scope="module")
def tiny_model():
    """(tiny config, random params, tokens [2, 24]).

    Parameters are drawn with numpy in the layout of `param_shapes` (eager `init_params` is slow
    on a busy CPU), std 0.2 rather than GPT-2's 0.02 (as conftest's TINY_HF) so that attention
    is far from uniform.
    """
    config = get_preset("tiny")
    shapes = param_shapes(config)
    rng = np.random.RandomState(0)

    def draw(path, leaf):
        if "scale" in jax.tree_util.keystr(path):  # LayerNorm gains
            return jnp.asarray(1.0 + 0.1 * rng.randn(*leaf.shape), leaf.dtype)
        return jnp.asarray(0.2 * rng.randn(*leaf.shape), leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    tokens = np.random.RandomState(3).randint(0, config.vocab_size, (2, 24)).astype(np.int32)
    return config, params, tokens


def test_whole_model_logits_and_gradients_equal_across_backends(tiny_model):
    config, params, tokens = tiny_model

    def loss(params, config):
        logits = forward(params, tokens, config)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean(), logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (loss_x, logits_x), grads_x = step(params, config)
    (loss_p, logits_p), grads_p = step(params, config.replace(attention="pallas"))
    assert max_err(logits_p, logits_x) < 1e-4
    assert abs(float(loss_p - loss_x)) < 1e-5
    errors = []
    for g_p, g_x in zip(jax.tree_util.tree_leaves(grads_p), jax.tree_util.tree_leaves(grads_x)):
        # float32 rounding differs between a tiled and an untiled softmax: compare relative
        # to each leaf's largest entry.
        errors.append(max_err(g_p, g_x) / max(1.0, float(jnp.max(jnp.abs(g_x)))))
    assert max(errors) < 1e-5, errors


def test_pallas_backend_rejects_attention_dropout_in_training(tiny_model):
    config, params, tokens = tiny_model
    config = config.replace(attention="pallas", attn_dropout=0.1)
    with pytest.raises(ConfigError, match="attention dropout.*only implemented by the 'xla'"):
        jax.eval_shape(
            lambda p: forward(p, tokens, config, train=True, key=jax.random.PRNGKey(0)), params
        )


def test_auto_resolves_to_xla_on_cpu_and_pallas_is_always_available():
    assert jax.default_backend() == "cpu"
    assert resolve_backend("auto") == "xla"
    assert resolve_backend("auto", "bfloat16") == "xla"
    assert resolve_backend("pallas") == "pallas"
    assert resolve_backend("xla") == "xla"


def test_cudnn_on_cpu_is_a_clear_error():
    q, k, v, _ = random_qkv((1, 1, 4, 16), 4, "bfloat16")
    with pytest.raises(ConfigError, match="'cudnn' needs an NVIDIA GPU.*running on 'cpu'"):
        multi_head_attention(q, k, v, backend="cudnn")


def test_unknown_backend_is_a_clear_error():
    q, k, v, _ = random_qkv((1, 1, 4, 16), 4, "float32")
    with pytest.raises(ConfigError, match="must be one of"):
        multi_head_attention(q, k, v, backend="flash")


@pytest.mark.parametrize("bad", [0, 12, 4, "64"])
def test_block_sizes_must_be_powers_of_two(bad):
    with pytest.raises(ConfigError, match="BlockSizes.block_q must be a power of two"):
        BlockSizes(block_q=bad)


def test_decode_blocks_are_validated():
    with pytest.raises(ConfigError, match="chunk .* must be >= block_k"):
        DecodeBlocks(chunk=16, block_k=64)
    q, k, v, _ = random_qkv((1, 1, 2, 16), 8, "float32")
    with pytest.raises(ConfigError, match="one query per row"):
        decode_attention(q, k, v, q_offset=0)


def test_cached_decode_step_equals_across_backends(tiny_model):
    """forward_cached with left-padded prompts: after an XLA prefill, one decode step through the
    pallas backend (the decode kernel) gives the XLA path's logits."""
    config, params, tokens = tiny_model
    kv_start_B = jnp.asarray([0, 4], jnp.int32)
    step = jax.jit(forward_cached, static_argnums=2)
    _, cache = step(params, tokens[:, :10], config, init_cache(config, 2, 24), 0, kv_start_B)
    next_BT = tokens[:, 10:11]
    ref, _ = step(params, next_BT, config, cache, 10, kv_start_B)
    out, _ = step(params, next_BT, config.replace(attention="pallas"), cache, 10, kv_start_B)
    assert max_err(out, ref) < 1e-4


def test_bench_lists_the_backends_this_platform_has():
    from jaxgpt.bench.attention import attention_flops, available_backends

    assert available_backends("float32") == ["xla", "pallas"]
    assert available_backends("bfloat16") == ["xla", "pallas"]
    # Forward: QKᵀ and PV, 2·T·T·K each per (row, head); fwd+bwd is 3.5× that.
    assert attention_flops(2, 3, 8, 16, backward=False) == 4 * 2 * 3 * 8 * 8 * 16
    assert attention_flops(2, 3, 8, 16, backward=True) == 3.5 * 4 * 2 * 3 * 8 * 8 * 16


@pytest.mark.parametrize("target", ["cuda", "tpu"])
def test_kernels_lower_for_gpu_and_tpu(monkeypatch, target):
    """Without a GPU or TPU we can still lower (not run) the kernels: Pallas emits Triton IR
    (CUDA) or Mosaic IR (TPU) at lowering time, so a construct the backend cannot express fails
    here. The final compile to machine code happens only on the device."""
    from jax import export
    from jax._src.pallas.mosaic import tpu_info  # private: which TPU to lower for

    from jaxgpt.kernels import platform as plat

    monkeypatch.setattr(plat, "platform", lambda: "gpu" if target == "cuda" else "tpu")
    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    q = jax.ShapeDtypeStruct((1, 2, 40, 64), jnp.bfloat16)
    q1 = jax.ShapeDtypeStruct((1, 2, 1, 64), jnp.bfloat16)
    starts = jax.ShapeDtypeStruct((1,), jnp.int32)

    def train(q, k, v, s):
        loss = lambda q, k, v: flash_attention(q, k, v, kv_start_B=s).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    def packed(q, k, v, s):  # segment ids (packed sequences) as blocked kernel inputs
        seg = jnp.broadcast_to(jnp.arange(40) // 13, (1, 40))
        attend = lambda q, k, v: flash_attention(q, k, v, kv_start_B=s, segment_ids_BS=seg)
        loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    def decode(q, k, v, s):
        return decode_attention(q, k, v, q_offset=30, kv_start_B=s)

    kernel_call = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[target]
    checks = [export.DisabledSafetyCheck.custom_call(kernel_call)]
    for fn, args in (
        (train, (q, q, q, starts)),
        (packed, (q, q, q, starts)),
        (decode, (q1, q, q, starts)),
    ):
        exported = export.export(jax.jit(fn), platforms=[target], disabled_checks=checks)(*args)
        assert kernel_call in exported.mlir_module()
