"""The GPT-2 forward pass as pure functions over the params pytree (see `jaxgpt.params`).

Read top to bottom, this file follows a prompt through the model:

    tokens [B, T]
      → embed: token + position embeddings              x_BTD
      → per block:  LayerNorm → causal self-attention → residual add
                    LayerNorm → MLP (4×, GELU)         → residual add
      → final LayerNorm
      → logits over the vocabulary (tied to the token embedding)   logits_BTV

Attention is written for one head and `jax.vmap`ped, the MLP for one position (see
`jaxgpt.attention`). The residual stream is kept in float32; matmuls run in `config.dtype`;
LayerNorm statistics and the softmax always run in float32.

The same block functions serve training (`forward`), the KV-cache decoder (`forward_cached`,
used by `jaxgpt.decode`) and the trace (`forward(..., capture=True)`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxgpt.attention import multi_head_attention, reference_attention
from jaxgpt.config import GPTConfig
from jaxgpt.errors import InputError
from jaxgpt.matmul import lowp_matmul
from jaxgpt.params import Params, check_params
from jaxgpt.quantize import Int8Weight
from jaxgpt.sharding import BATCH_AXES, constrain

# Per layer (k_NSK, v_NSK): N = B·H rows, row b·H + h holding head h of sequence b (see
# `init_cache` for why the batch and head axes are one).
KVCache = list[tuple[jax.Array, jax.Array]]


# --------------------------------------------------------------------------- building blocks


def linear(p: Params, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`x @ kernel + bias` computed in `dtype`.

    The kernel may be stored in bfloat16 or as an int8 `Int8Weight` (`jaxgpt.quantize`); int8 is
    dequantized inside the matmul as `(x @ q) · scale`, exact because the scale is per column.
    In a half-precision `dtype` the product goes through `jaxgpt.matmul.lowp_matmul`. `x` may
    have any leading axes. `p` holds either `kernel [in, out]` (how params are trained and saved)
    or `kernel_t [out, in]` (the decode layout of `jaxgpt.quantize.decode_layout`).
    """
    if "kernel_t" in p:
        y = _linear_transposed(p["kernel_t"], x, dtype)
    else:
        y = _linear_kernel(p["kernel"], x, dtype)
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def _linear_kernel(kernel: jax.Array | Int8Weight, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`x @ kernel` for a kernel stored `[in, out]` (the training layout)."""
    if isinstance(kernel, Int8Weight):
        return jnp.matmul(x.astype(dtype), kernel.q.astype(dtype)) * kernel.scale[0].astype(dtype)
    if jnp.dtype(dtype).itemsize < 4:
        # bfloat16 / float16: float32 accumulation and a backward that stays in `dtype`.
        return lowp_matmul(x, kernel, jnp.dtype(dtype), jnp.dtype(dtype))
    return jnp.matmul(x.astype(dtype), kernel.astype(dtype))


def _linear_transposed(w_OI: jax.Array | Int8Weight, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`x @ w_OIᵀ` for a kernel stored `[out, in]` (the decode layout,
    `jaxgpt.quantize.decode_layout`): the contraction runs along the kernel's contiguous axis."""
    if isinstance(w_OI, Int8Weight):  # scale [out, 1]: per output row
        y = jnp.einsum("...i,oi->...o", x.astype(dtype), w_OI.q.astype(dtype))
        return y * w_OI.scale[:, 0].astype(dtype)
    if jnp.dtype(dtype).itemsize < 4:
        return lowp_matmul(x, w_OI, jnp.dtype(dtype), jnp.dtype(dtype), True)
    return jnp.einsum("...i,oi->...o", x.astype(dtype), w_OI.astype(dtype))


def layer_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32; returns float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"]
    if "bias" in p:
        y = y + p["bias"]
    return y


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `key` is None or the rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# --------------------------------------------------------------------------- 1. embeddings


def embed(params: Params, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
    """Token embedding + position embedding: the initial residual stream x_BTD (float32)."""
    # Under an FSDP mesh the tables are sharded along D: gather them whole before the lookup, so
    # the looked-up rows come out split by batch like the tokens (a no-op without a mesh).
    wpe_TD = constrain(params["wpe"], P())
    if isinstance(params["wte"], Int8Weight):  # int8 rows times their per-row scale
        wte = params["wte"]
        return wte.q[tokens_BT].astype(jnp.float32) * wte.scale[tokens_BT] + wpe_TD[positions_BT]
    wte_VD = constrain(params["wte"], P())
    return wte_VD[tokens_BT] + wpe_TD[positions_BT]


# --------------------------------------------------------------------------- 2. attention


def project_qkv(
    p: Params, x_BTD: jax.Array, config: GPTConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Q, K, V for every head of every sequence: three `[B, H, T, K]` arrays.

    The projections are fused as `c_attn` `[D, 3D]` whose columns are grouped by head: head h's
    Q, K and V weights are the contiguous columns `[h·3K, (h+1)·3K)`, i.e. `[D, H, 3, K]` (so a
    tensor-parallel split of the columns is a split of whole heads; `jaxgpt.pretrained` converts
    from GPT-2's Q | K | V order). It is one `[D, 3D]` matmul whose *output* is then split into
    heads: a per-head einsum against the kernel viewed as `[D, H, 3, K]` made XLA:CPU transpose
    the whole kernel on every call — in the decode loop, on every token.
    """
    B, T, _ = x_BTD.shape
    H, K = config.n_head, config.head_dim
    qkv_BTH3K = linear(p["c_attn"], x_BTD, config.compute_dtype).reshape(B, T, H, 3, K)
    q_BHTK, k_BHTK, v_BHTK = qkv_BTH3K.transpose(3, 0, 2, 1, 4)
    return q_BHTK, k_BHTK, v_BHTK


def causal_self_attention(
    p: Params,
    x_BTD: jax.Array,
    config: GPTConfig,
    *,
    q_offset: jax.Array | int = 0,
    kv_start_B: jax.Array | None = None,
    segment_ids_BS: jax.Array | None = None,
    cache: tuple[jax.Array, jax.Array] | None = None,
    key: jax.Array | None = None,
    capture: dict | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Multi-head causal self-attention of a block; returns (out_BTD, updated cache).

    With a cache `(k_NSK, v_NSK)` (N = B·H, see `init_cache`), this call's keys and values are
    written at slots `q_offset ... q_offset + T - 1` and the queries attend over the whole
    cache. With `segment_ids_BS` (packed sequences) a query attends only within its own segment.
    """
    B, T, D = x_BTD.shape
    H, K = config.n_head, config.head_dim
    q_BHTK, k_BHTK, v_BHTK = project_qkv(p, x_BTD, config)
    # The attention runs over R rows of h heads: (R, h) = (B, H) without a cache, (B·H, 1) with
    # one, each (sequence, head) pair a row of its own (see the comment on the cache below).
    q_RhTK, k_RhSK, v_RhSK = q_BHTK, k_BHTK, v_BHTK
    kv_start_R, segment_ids_RS = kv_start_B, segment_ids_BS
    if cache is not None:
        # Write this call's keys and values into the cache in place, then attend over the updated
        # cache. Measured on XLA:CPU (docs/benchmarks.md): attending over the old cache beside
        # the update (e.g. through a select for the new slot) made copy insertion keep two copies
        # of every layer's whole cache per generated token (batch-8 decode: 203 tokens/s with
        # them, 290 without). A select that *writes* the cache avoids them too, but rewrites the
        # whole cache every step where the in-place update writes one slot: on accelerators
        # with long contexts that doubles the cache traffic.
        # The cache is `[B·H, S, K]` and the attention reads it as B·H rows of one head,
        # `[B·H, 1, S, K]`: the shape the decode loop carries, up to a size-1 axis. Read as
        # `[B, H, S, K]` at batch 1 (or, from the flat cache, at batch > 1), XLA:CPU turned that
        # read into a second in-place update and copied the whole cache four times per layer
        # and token (docs/benchmarks.md).
        k_cache, v_cache = cache
        start = (0, q_offset, 0)
        k_NSK = jax.lax.dynamic_update_slice(
            k_cache, k_BHTK.reshape(B * H, T, K).astype(k_cache.dtype), start
        )
        v_NSK = jax.lax.dynamic_update_slice(
            v_cache, v_BHTK.reshape(B * H, T, K).astype(v_cache.dtype), start
        )
        cache = (k_NSK, v_NSK)
        q_RhTK, k_RhSK, v_RhSK = q_BHTK.reshape(B * H, 1, T, K), k_NSK[:, None], v_NSK[:, None]
        if kv_start_B is not None:
            kv_start_R = jnp.repeat(kv_start_B, H)
        if segment_ids_BS is not None:
            segment_ids_RS = jnp.repeat(segment_ids_BS, H, axis=0)

    R, h, S = q_RhTK.shape[0], q_RhTK.shape[1], k_RhSK.shape[2]
    keep_RhTS = None
    if key is not None and config.attn_dropout > 0.0:
        keep_RhTS = jax.random.bernoulli(key, 1.0 - config.attn_dropout, (B, H, T, S)).reshape(
            R, h, T, S
        )

    if capture is not None:
        # The trace needs the attention weights, which only the reference path materialises.
        out_RhTK, probs_RhTS = reference_attention(
            q_RhTK, k_RhSK, v_RhSK, q_offset=q_offset, kv_start_B=kv_start_R,
            segment_ids_BS=segment_ids_RS, keep_BHTS=keep_RhTS, dropout_rate=config.attn_dropout,
        )  # fmt: skip
        probs_BHTS = probs_RhTS.reshape(B, H, T, S)
        capture.update(q=q_BHTK, k=k_BHTK, v=v_BHTK, att=probs_BHTS,
                       heads=out_RhTK.reshape(B, H, T, K))  # fmt: skip
    else:
        out_RhTK = multi_head_attention(
            q_RhTK, k_RhSK, v_RhSK, backend=config.attention, q_offset=q_offset,
            kv_start_B=kv_start_R, segment_ids_BS=segment_ids_RS, keep_BHTS=keep_RhTS,
            dropout_rate=config.attn_dropout,
        )  # fmt: skip
    out_BHTK = out_RhTK.reshape(B, H, T, K)
    # Concatenate the heads back into the residual width, then mix them with c_proj.
    out_BTD = out_BHTK.transpose(0, 2, 1, 3).reshape(B, T, D)
    return linear(p["c_proj"], out_BTD, config.compute_dtype), cache


# --------------------------------------------------------------------------- 3. MLP


def mlp_position(p: Params, x_D: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """The feed-forward network at one position: D → 4D (GELU, tanh form as in GPT-2) → D.

    Returns the output `[D]` and the hidden activation `[4D]`.
    """
    h_F = jax.nn.gelu(linear(p["c_fc"], x_D, dtype), approximate=True)
    return linear(p["c_proj"], h_F, dtype), h_F


def mlp(p: Params, x_BTD: jax.Array, config: GPTConfig) -> tuple[jax.Array, jax.Array]:
    """`mlp_position` at every position; returns (out_BTD, hidden_BTF).

    Positions are independent, so this is the one-position function on the whole `[B, T, D]`
    array (`linear` takes any leading axes) — what `jax.vmap` over batch and positions computes,
    without batching `lowp_matmul`'s custom VJP (see `jaxgpt.matmul`).
    """
    return mlp_position(p, x_BTD, config.compute_dtype)


# --------------------------------------------------------------------------- 4. a block


def block(
    p: Params,
    x_BTD: jax.Array,
    config: GPTConfig,
    *,
    q_offset: jax.Array | int = 0,
    kv_start_B: jax.Array | None = None,
    segment_ids_BS: jax.Array | None = None,
    cache: tuple[jax.Array, jax.Array] | None = None,
    key: jax.Array | None = None,
    capture: dict | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One transformer block (pre-LayerNorm): x + attn(ln_1(x)), then + mlp(ln_2(x))."""
    k_attn, k_resid1, k_resid2 = jax.random.split(key, 3) if key is not None else (None,) * 3
    eps = config.layer_norm_epsilon

    h_BTD = layer_norm(p["ln_1"], x_BTD, eps)
    attn_BTD, cache = causal_self_attention(
        p["attn"], h_BTD, config, q_offset=q_offset, kv_start_B=kv_start_B,
        segment_ids_BS=segment_ids_BS, cache=cache, key=k_attn, capture=capture,
    )  # fmt: skip
    attn_BTD = dropout(attn_BTD, config.resid_dropout, k_resid1)
    x_mid_BTD = x_BTD + attn_BTD.astype(jnp.float32)

    h2_BTD = layer_norm(p["ln_2"], x_mid_BTD, eps)
    mlp_BTD, hidden_BTF = mlp(p["mlp"], h2_BTD, config)
    mlp_BTD = dropout(mlp_BTD, config.resid_dropout, k_resid2)
    x_out_BTD = x_mid_BTD + mlp_BTD.astype(jnp.float32)

    if capture is not None:
        capture.update(
            x_in=x_BTD, ln_1=h_BTD, attn_out=attn_BTD, x_mid=x_mid_BTD, ln_2=h2_BTD,
            mlp_hidden=hidden_BTF, mlp_out=mlp_BTD, x_out=x_out_BTD,
        )  # fmt: skip
    return x_out_BTD, cache


# --------------------------------------------------------------------------- 5. logits


def unembed(params: Params, x_BTD: jax.Array, config: GPTConfig) -> jax.Array:
    """Final LayerNorm, then logits over the vocabulary with the tied token embedding (float32)."""
    return output_logits(
        params, layer_norm(params["ln_f"], x_BTD, config.layer_norm_epsilon), config
    )


def output_logits(params: Params, h_BTD: jax.Array, config: GPTConfig) -> jax.Array:
    """Logits (float32) of the final LayerNorm's output `h_BTD` through the tied embedding."""
    dtype = config.compute_dtype
    wte = params["wte"]
    quantized = isinstance(wte, Int8Weight)
    if not quantized and dtype.itemsize < 4:
        return lowp_matmul(h_BTD, wte, dtype, jnp.dtype(jnp.float32), True)
    # Contract directly against wte [V, D]: no transposed copy of the embedding.
    logits_BTV = jnp.einsum(
        "btd,vd->btv", h_BTD.astype(dtype), (wte.q if quantized else wte).astype(dtype),
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    return logits_BTV * wte.scale[:, 0] if quantized else logits_BTV


# --------------------------------------------------------------------------- the whole model


def check_tokens(tokens: Any, config: GPTConfig, *, max_len: int | None = None) -> None:
    """Raise a clear error for tokens of the wrong rank, dtype, length or range.

    Values are checked only when they are concrete (not inside `jit`).
    """
    if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
        raise InputError(f"tokens must be an integer array of shape [B, T], got {type(tokens)}")
    if len(tokens.shape) != 2:
        raise InputError(f"tokens must have shape [B, T] (rank 2), got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise InputError(f"tokens must have an integer dtype, got {tokens.dtype}")
    limit = config.block_size if max_len is None else max_len
    if tokens.shape[1] > limit:
        raise InputError(
            f"sequence length {tokens.shape[1]} exceeds the model's block_size {limit}; "
            f"truncate the input to its last {limit} tokens"
        )
    if tokens.shape[1] == 0:
        raise InputError("tokens is empty: at least one token per sequence is needed")
    if not isinstance(tokens, jax.core.Tracer):
        values = np.asarray(tokens)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(
                f"token id {bad} is outside the vocabulary [0, {config.vocab_size - 1}]"
            )


def check_packing(name: str, ids: Any, shape: tuple[int, ...], limit: int | None = None) -> None:
    """A clear error for `positions_BT` / `segment_ids_BT` not shaped like the tokens, not integer,
    or (positions, when concrete) outside `[0, limit)`."""
    if tuple(getattr(ids, "shape", ())) != shape or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise InputError(
            f"{name} must be an integer array shaped like the tokens {list(shape)}, got "
            f"shape {getattr(ids, 'shape', None)} and dtype {getattr(ids, 'dtype', None)}"
        )
    if limit is not None and not isinstance(ids, jax.core.Tracer):
        lo, hi = int(np.min(ids)), int(np.max(ids))
        if lo < 0 or hi >= limit:
            raise InputError(f"{name} must lie in [0, {limit - 1}] (block_size), got {lo}..{hi}")


def forward(
    params: Params,
    tokens_BT: jax.Array,
    config: GPTConfig,
    *,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
    train: bool = False,
    key: jax.Array | None = None,
    capture: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """GPT-2: int tokens `[B, T]` → float32 logits `[B, T, V]`.

    Args:
      params: the pytree from `init_params` / `load_hf`.
      tokens_BT: token ids, T ≤ config.block_size.
      config: the model's `GPTConfig` (static under `jit`).
      positions_BT: position of each token (None: 0 … T-1 in every row). Rows packing several
        sequences restart the positions at each sequence.
      segment_ids_BT: int id of the packed sequence each token belongs to (None: one per row);
        a token attends only to earlier tokens with the same id, so each packed sequence gets
        exactly the logits it would get alone (with positions restarting at 0).
      train: enable dropout (needs `key`).
      key: PRNG key for dropout.
      capture: also return every intermediate of the pass (embeddings, per-layer Q/K/V, attention
        weights `[B, H, T, T]`, MLP activations, residual stream, final LayerNorm) as a dict.

    Jit it with `jax.jit(forward, static_argnames=("config", "train", "capture"))`.
    """
    x_BTD, captured = residual_stream(
        params, tokens_BT, config, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
        train=train, key=key, capture=capture,
    )  # fmt: skip
    h_BTD = layer_norm(params["ln_f"], x_BTD, config.layer_norm_epsilon)
    logits_BTV = output_logits(params, h_BTD, config)
    if capture:
        captured["ln_f"] = h_BTD
        captured["logits"] = logits_BTV
        return logits_BTV, captured
    return logits_BTV


def hidden_states(
    params: Params,
    tokens_BT: jax.Array,
    config: GPTConfig,
    *,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
    train: bool = False,
    key: jax.Array | None = None,
) -> jax.Array:
    """The final LayerNorm's output `[B, T, D]` (float32): what the output layer and the scalar
    heads of `jaxgpt.heads` read. Arguments as for `forward`."""
    x_BTD, _ = residual_stream(
        params, tokens_BT, config, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
        train=train, key=key,
    )  # fmt: skip
    return layer_norm(params["ln_f"], x_BTD, config.layer_norm_epsilon)


def residual_stream(
    params: Params,
    tokens_BT: jax.Array,
    config: GPTConfig,
    *,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
    train: bool = False,
    key: jax.Array | None = None,
    capture: bool = False,
) -> tuple[jax.Array, dict[str, Any]]:
    """Embeddings and every block: the residual stream `[B, T, D]` before the final LayerNorm,
    and the captured intermediates (empty unless `capture`). Arguments as for `forward`."""
    check_tokens(tokens_BT, config)
    check_params(params, config)
    if (
        train
        and key is None
        and max(config.embd_dropout, config.attn_dropout, config.resid_dropout)
    ):
        raise InputError("forward(train=True) with dropout needs a PRNG key: pass key=...")
    key = key if train else None
    B, T = tokens_BT.shape
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    else:
        check_packing("positions_BT", positions_BT, (B, T), limit=config.block_size)
    if segment_ids_BT is not None:
        check_packing("segment_ids_BT", segment_ids_BT, (B, T))

    keys = jax.random.split(key, config.n_layer + 1) if key is not None else None
    x_BTD = embed(params, tokens_BT, positions_BT)
    captured: dict[str, Any] = {"x_embed": x_BTD} if capture else {}
    x_BTD = dropout(x_BTD, config.embd_dropout, None if keys is None else keys[0])

    def layer(x_BTD: jax.Array, layer_in: tuple) -> tuple[jax.Array, dict]:
        layer_params, layer_key = layer_in
        layer_capture: dict | None = {} if capture else None
        # Under a device mesh, keep the residual stream split by batch (a no-op otherwise).
        x_BTD = constrain(x_BTD, P(BATCH_AXES))
        x_BTD, _ = block(
            layer_params, x_BTD, config, segment_ids_BS=segment_ids_BT, key=layer_key,
            capture=layer_capture,
        )  # fmt: skip
        return x_BTD, layer_capture or {}

    # The blocks run as a `lax.scan` over their parameters stacked along a new layer axis, each
    # under `jax.checkpoint` keeping only its matmul outputs for the backward pass. Measured on
    # XLA:CPU (GPT-2 124M, B=8, T=256, value_and_grad; docs/benchmarks.md):
    # * a Python loop unrolls the blocks into one flat graph, and in its backward pass XLA fused
    #   the elementwise chain of residual-stream gradients of *all later layers* into every
    #   layer's weight-gradient operand, recomputing it per layer (quadratic in depth: 10 of
    #   25 s). The scan's loop boundary stops that fusion — and compiles the block once.
    # * saving every intermediate (six [B, T, 4D] GELU pieces, two attention matrices, ...)
    #   stacks ~270 MB per layer; the matmul outputs are a third of that, and recomputing the
    #   rest (LayerNorm, GELU, softmax) costs less than writing and reading it back: 16.9 → 15.4 s.
    layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *params["blocks"])
    x_BTD, captured_L = jax.lax.scan(layer, x_BTD, (stacked, None if keys is None else keys[1:]))
    if capture:
        captured["layers"] = [
            jax.tree.map(lambda a, i=i: a[i], captured_L) for i in range(config.n_layer)
        ]
    return x_BTD, captured


def forward_cached(
    params: Params,
    tokens_BT: jax.Array,
    config: GPTConfig,
    cache: KVCache,
    q_offset: jax.Array | int,
    kv_start_B: jax.Array,
    *,
    last_only: bool = False,
    capture: bool = False,
) -> tuple[jax.Array, KVCache] | tuple[jax.Array, KVCache, dict[str, Any]]:
    """Inference with a KV cache: run `tokens_BT` at cache slots `q_offset ... q_offset+T-1`.

    Row b's sequence begins at slot `kv_start_B[b]` (left padding before it is never attended to),
    so its positions are `slot - kv_start_B[b]`. Returns logits_BTV and the updated cache; with
    `last_only=True` only the last position's logits (`[B, 1, V]`), which is all a prefill needs
    (the full `[B, T, V]` projection would cost T times the vocabulary matmul). With
    `capture=True` also the intermediates of these T tokens as `forward(..., capture=True)` gives
    them (the same `block` code), except that "att" is over the whole cache, `[B, H, T, S]`
    (slots after each query's own get 0): what `jaxgpt explore` uses to extend a captured
    sequence one token at a time.

    Checked before tracing (so also under `jit`): the tokens' rank and dtype, the cache's layout,
    T against the cache length and, when concrete, the token ids and `q_offset + T <= S`
    (`dynamic_update_slice` would otherwise clamp the write and corrupt the cache silently).
    """
    check_cache_call(tokens_BT, config, cache, q_offset, kv_start_B)
    T = tokens_BT.shape[1]
    slots_T = q_offset + jnp.arange(T)
    positions_BT = jnp.maximum(slots_T[None, :] - kv_start_B[:, None], 0)
    x_BTD = embed(params, tokens_BT, positions_BT)
    captured: dict[str, Any] = {"x_embed": x_BTD, "layers": []} if capture else {}
    new_cache = []
    for layer_params, layer_cache in zip(params["blocks"], cache):
        layer_capture: dict | None = {} if capture else None
        x_BTD, layer_cache = block(
            layer_params, x_BTD, config, q_offset=q_offset, kv_start_B=kv_start_B,
            cache=layer_cache, capture=layer_capture,
        )  # fmt: skip
        new_cache.append(layer_cache)
        if capture:
            captured["layers"].append(layer_capture)
    if last_only:
        x_BTD = x_BTD[:, -1:]
    h_BTD = layer_norm(params["ln_f"], x_BTD, config.layer_norm_epsilon)
    logits_BTV = output_logits(params, h_BTD, config)
    if capture:
        captured["ln_f"] = h_BTD
        captured["logits"] = logits_BTV
        return logits_BTV, new_cache, captured
    return logits_BTV, new_cache


def check_cache_call(
    tokens_BT: Any, config: GPTConfig, cache: KVCache, q_offset: Any, kv_start_B: Any
) -> None:
    """InputError for a `forward_cached` call whose shapes or (concrete) values cannot work."""
    if not isinstance(cache, (list, tuple)) or len(cache) != config.n_layer:
        n = len(cache) if isinstance(cache, (list, tuple)) else type(cache).__name__
        raise InputError(f"cache must hold one (k, v) pair per layer ({config.n_layer}), got {n}")
    S = jnp.shape(cache[0][0])[1] if jnp.ndim(cache[0][0]) == 3 else 0
    check_tokens(tokens_BT, config, max_len=S)
    B = tokens_BT.shape[0]
    want = (B * config.n_head, S, config.head_dim)
    for layer_cache in cache:
        for c in layer_cache:
            if tuple(c.shape) != want:
                raise InputError(
                    f"cache arrays must have shape [B·H, S, K] = {want} (init_cache(config, "
                    f"{B}, S)), got {tuple(c.shape)}"
                )
    if tuple(jnp.shape(kv_start_B)) != (B,):
        raise InputError(f"kv_start_B must have shape [B] = ({B},), got {jnp.shape(kv_start_B)}")
    T = tokens_BT.shape[1]
    if not isinstance(q_offset, jax.core.Tracer):
        offset = int(q_offset)
        if offset < 0 or offset + T > S:
            raise InputError(
                f"q_offset {offset} + {T} tokens does not fit the cache of {S} slots; "
                f"allocate a longer cache with init_cache(config, batch, max_len)"
            )
        if not isinstance(kv_start_B, jax.core.Tracer):
            last_position = offset + T - 1 - int(np.min(np.asarray(kv_start_B)))
            if last_position >= config.block_size:
                raise InputError(
                    f"position {last_position} (slot {offset + T - 1} - kv_start) is beyond the "
                    f"model's block_size {config.block_size}"
                )


def init_cache(config: GPTConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty KV cache: per layer, zeros `k_NSK` and `v_NSK`, N = batch · n_head, S = max_len.

    Row `b·H + h` holds head h of sequence b, and the attention reads it as B·H rows of one head
    (`[B·H, 1, S, K]`). The batch and head axes are one because at batch 1 a `[1, H, S, K]` cache
    made XLA:CPU copy every layer's whole cache four times per decoded token (the attention's
    read of the updated cache, with the size-1 axis dropped, became a second in-place update,
    each needing its own copy of the old cache; docs/benchmarks.md). Now the decode loop carries
    the cache in the shape the attention reads, and no copy is made at any batch size.
    """
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (batch * config.n_head, max_len, config.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layer)]
