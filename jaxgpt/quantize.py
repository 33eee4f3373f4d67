"""Weights for inference: in fewer bytes (bfloat16, or int8 with one float32 scale per output),
and laid out for decoding (`decode_layout`).

Batch-1 decoding reads every weight once per token, so its speed is bounded by bytes of weights ÷
memory bandwidth; storing them in bfloat16 halves the bytes, int8 quarters them.

    quantize_params(params, "bfloat16")   every matmul weight (the four kernels per block and the
                                          tied wte) cast to bfloat16
    quantize_params(params, "int8")       the same weights as `Int8Weight`: int8 values q and a
                                          float32 scale per output channel, w ≈ q · scale

Biases, LayerNorms and wpe (≈ 0.1 % and 0.6 % of GPT-2's bytes; wpe is read one row per token)
stay float32. The token embedding `wte [V, D]` is quantized too: it is 31 % of GPT-2's matmul
weights (the tied output projection), so leaving it float32 would cap int8's byte saving at
2.1× instead of 3.9×. Its scale is per row, i.e. per vocabulary entry, which is at once the
output channel of the logits and the unit the embedding lookup reads, so one scale serves both.

int8 is symmetric and per output channel: scale_j = max_i |w_ij| / 127, q = round(w / scale),
so each weight's error is at most scale_j / 2. The model dequantizes inside the matmul
(`jaxgpt.model.linear`: `(x @ q) · scale`, exact since the scale is per output column); nothing
is dequantized ahead of time, so the bytes a step reads are the int8 ones.

    decode_layout(params)                 every block's kernel stored transposed, `kernel_t
                                          [out, in]`, in whatever format it has

Batch-1 decoding multiplies one row by each kernel. With the kernel stored `[out, in]` the
product runs along the kernel's contiguous axis, as the logits already do against `wte [V, D]`;
on XLA:CPU that reads the weights faster (GPT-2 124M, batch 1, idle 2-core Xeon: 81.8 % of the
weight-read bound against 76.1 % for `[in, out]`, docs/benchmarks.md). Training keeps
`[in, out]` (its matmuls are matrix–matrix products, and checkpoints and Hugging Face exports use
that layout); the commands that decode one row at a time (`jaxgpt sample`, `chat`, `explore`,
`bench decode`) lay the weights out once when they load them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxgpt.errors import InputError

WEIGHT_FORMATS = ("float32", "bfloat16", "int8")

Params = dict[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """An int8 matrix and its float32 scales, w ≈ q · scale.

    `scale` broadcasts against `q`: `[1, out]` for a kernel `[in, out]` (per output column),
    `[V, 1]` for the embedding `[V, D]` (per row).
    """

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def dtype(self) -> jnp.dtype:
        return self.q.dtype

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        return self.q.astype(dtype) * self.scale.astype(dtype)


def quantize_int8(w: jax.Array, axis: int) -> Int8Weight:
    """Symmetric int8 with one scale per index of `axis` (the reduction runs over the others)."""
    w = jnp.asarray(w, jnp.float32)
    other = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
    amax = jnp.max(jnp.abs(w), axis=other, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)  # an all-zero channel stays exactly zero
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return Int8Weight(q=q, scale=scale)


def is_quantized(params: Params) -> bool:
    """Whether any weight is already bfloat16 or int8 (quantizing twice would compound errors)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight))
    return any(isinstance(x, Int8Weight) or x.dtype == jnp.bfloat16 for x in leaves)


def check_weights(weights: str) -> None:
    """Raise an InputError naming the choices unless `weights` is one of WEIGHT_FORMATS."""
    if weights not in WEIGHT_FORMATS:
        raise InputError(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")


def quantize_params(params: Params, weights: str) -> Params:
    """A copy of `params` with the matmul weights stored in `weights` ("float32" returns
    `params` itself). Pure: the input is not modified. See the module docstring for what is
    quantized and how."""
    check_weights(weights)
    if weights == "float32":
        return params
    if is_quantized(params):
        raise InputError("params are already quantized; quantize the float32 params instead")

    def convert(w: jax.Array, out_axis: int) -> jax.Array | Int8Weight:
        if weights == "bfloat16":
            return jnp.asarray(w, jnp.bfloat16)
        return quantize_int8(w, out_axis)

    def linear(p: Params) -> Params:
        if "kernel_t" in p:  # the decode layout: [out, in]
            return {**p, "kernel_t": convert(p["kernel_t"], 0)}
        return {**p, "kernel": convert(p["kernel"], -1)}

    blocks = [
        {
            **block,
            "attn": {name: linear(p) for name, p in block["attn"].items()},
            "mlp": {name: linear(p) for name, p in block["mlp"].items()},
        }
        for block in params["blocks"]
    ]
    return {**params, "wte": convert(params["wte"], 0), "blocks": blocks}


def decode_layout(params: Params) -> Params:
    """A copy of `params` with every block's `kernel [in, out]` stored as `kernel_t [out, in]`
    (an `Int8Weight` keeps its per-output scales, as `[out, 1]`). Everything else is shared, not
    copied. `jaxgpt.model.linear` computes the same product from either layout; why this one
    decodes faster is in the module docstring."""

    def transposed(p: Params) -> Params:
        if "kernel" not in p:
            raise InputError("params are already in the decode layout (no `kernel` to transpose)")
        rest = {name: x for name, x in p.items() if name != "kernel"}
        kernel = p["kernel"]
        if isinstance(kernel, Int8Weight):
            return {**rest, "kernel_t": Int8Weight(q=_contiguous_t(kernel.q), scale=kernel.scale.T)}
        return {**rest, "kernel_t": _contiguous_t(kernel)}

    blocks = [
        {
            **block,
            "attn": {name: transposed(p) for name, p in block["attn"].items()},
            "mlp": {name: transposed(p) for name, p in block["mlp"].items()},
        }
        for block in params["blocks"]
    ]
    return {**params, "blocks": blocks}


def _contiguous_t(w: jax.Array) -> jax.Array:
    # Materialised once, here: a transpose inside the decoder's jit would be folded back into
    # the dot by XLA, which would then read the `[in, out]` layout again.
    return jax.block_until_ready(jnp.transpose(w))


def weight_bytes(params: Params) -> int:
    """Bytes a decode step reads for weights: everything but the position embedding."""
    return sum(x.nbytes for x in jax.tree.leaves(params)) - params["wpe"].nbytes
