"""Causal self-attention, written for one head of one sequence and vmapped over heads and batch.

The one-head function is the textbook `softmax(Q Kᵀ / √d_k) V` with a causal mask. Everything
else (several heads, a batch, a KV cache, left-padded prompts) only changes *which* keys a query may
see, and that is described by two numbers per row:

* `q_offset`: the cache slot of the first query (0 without a cache); query t sits at slot
  `q_offset + t`.
* `kv_start_B`: the first valid key slot of each row (> 0 for a left-padded prompt).

and, for rows packing several independent sequences (conversations in supervised fine-tuning), by
one optional array:

* `segment_ids_BS`: int32, the segment of every key slot; query t's segment is that of its slot
  `q_offset + t`. None means one segment per row.

Query slot i may attend to key slot j iff `kv_start ≤ j ≤ i` and `segment[j] = segment[i]`
(`allowed`, the one definition of the rule). The same description drives the fused backends, so
every backend computes the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt.config import ATTENTION_BACKENDS
from jaxgpt.errors import ConfigError, InputError

# A large negative score rather than -inf, so a fully masked row (a padding query) gives a uniform
# distribution instead of NaN; its output is never read.
_MASKED = -1e30


def allowed(
    q_slot: jax.Array,
    k_slot: jax.Array,
    kv_start: jax.Array,
    q_segment: jax.Array | None = None,
    k_segment: jax.Array | None = None,
) -> jax.Array:
    """The attention rule, elementwise over broadcastable arrays: may this query see this key?

    Causal (`k_slot ≤ q_slot`), inside the row (`k_slot ≥ kv_start`) and, given segments, in the
    query's own segment. `attention_mask` and the Pallas kernels' tiles both call this.
    """
    ok = (k_slot <= q_slot) & (k_slot >= kv_start)
    if q_segment is not None:
        ok = ok & (k_segment == q_segment)
    return ok


def query_segments(segment_ids_BS: jax.Array, q_offset: jax.Array | int, T: int) -> jax.Array:
    """The segments `[B, T]` of the queries at slots `q_offset ... q_offset + T - 1`."""
    if isinstance(q_offset, int) and q_offset == 0 and segment_ids_BS.shape[1] == T:
        return segment_ids_BS
    return jax.lax.dynamic_slice_in_dim(segment_ids_BS, q_offset, T, axis=1)


def check_segments(segment_ids_BS: jax.Array, B: int, S: int) -> None:
    """A clear error for segment ids of the wrong shape or dtype (they describe the S key slots)."""
    shape = tuple(getattr(segment_ids_BS, "shape", ()))
    if shape != (B, S) or not jnp.issubdtype(segment_ids_BS.dtype, jnp.integer):
        raise InputError(
            f"segment ids must be an integer array [B, S] = [{B}, {S}] (one id per key slot), "
            f"got shape {shape} and dtype {getattr(segment_ids_BS, 'dtype', None)}"
        )


def attention_mask(
    q_offset: jax.Array | int,
    T: int,
    S: int,
    kv_start_B: jax.Array,
    segment_ids_BS: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask `[B, T, S]`: may query t (slot q_offset + t) attend to key slot s?"""
    q_slot_11T1 = (q_offset + jnp.arange(T))[None, :, None]
    k_slot_111S = jnp.arange(S)[None, None, :]
    kv_start_B11 = kv_start_B[:, None, None]
    if segment_ids_BS is None:
        return allowed(q_slot_11T1, k_slot_111S, kv_start_B11)
    check_segments(segment_ids_BS, kv_start_B.shape[0], S)
    q_seg_BT1 = query_segments(segment_ids_BS, q_offset, T)[:, :, None]
    return allowed(q_slot_11T1, k_slot_111S, kv_start_B11, q_seg_BT1, segment_ids_BS[:, None, :])


def attention_head(
    q_TK: jax.Array,
    k_SK: jax.Array,
    v_SK: jax.Array,
    mask_TS: jax.Array,
    keep_TS: jax.Array | None = None,
    dropout_rate: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """One head of one sequence: `softmax(Q Kᵀ / √d_k) V`.

    Args:
      q_TK, k_SK, v_SK: queries, keys and values of one head (K = head width).
      mask_TS: True where query t may attend to key s.
      keep_TS: dropout keep-mask on the attention probabilities (training), or None.
      dropout_rate: the rate `keep_TS` was drawn with (kept values are scaled by 1 / (1 - rate)).

    Returns:
      out_TK, the weighted sum of values, and probs_TS, the attention weights (rows sum to 1).
    """
    scale = 1.0 / jnp.sqrt(jnp.float32(q_TK.shape[-1]))
    # Scores and softmax in float32 even when Q and K are bfloat16.
    scores_TS = jnp.einsum("tk,sk->ts", q_TK, k_SK, preferred_element_type=jnp.float32) * scale
    scores_TS = jnp.where(mask_TS, scores_TS, _MASKED)
    probs_TS = jax.nn.softmax(scores_TS, axis=-1)
    weights_TS = probs_TS
    if keep_TS is not None:
        weights_TS = jnp.where(keep_TS, probs_TS / (1.0 - dropout_rate), 0.0)
    out_TK = jnp.einsum("ts,sk->tk", weights_TS.astype(v_SK.dtype), v_SK)
    return out_TK, probs_TS


# Over heads (mask shared by all heads of a row), then over the batch.
_attention_heads = jax.vmap(attention_head, in_axes=(0, 0, 0, None, 0, None))
_attention_batch = jax.vmap(_attention_heads, in_axes=(0, 0, 0, 0, 0, None))


def reference_attention(
    q_BHTK: jax.Array,
    k_BHSK: jax.Array,
    v_BHSK: jax.Array,
    *,
    q_offset: jax.Array | int = 0,
    kv_start_B: jax.Array | None = None,
    segment_ids_BS: jax.Array | None = None,
    keep_BHTS: jax.Array | None = None,
    dropout_rate: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """The XLA path: `attention_head` vmapped over heads and batch.

    Returns out_BHTK and the attention probabilities probs_BHTS.
    """
    B, _, T, _ = q_BHTK.shape
    S = k_BHSK.shape[2]
    if kv_start_B is None:
        kv_start_B = jnp.zeros((B,), jnp.int32)
    mask_BTS = attention_mask(q_offset, T, S, kv_start_B, segment_ids_BS)
    return _attention_batch(q_BHTK, k_BHSK, v_BHSK, mask_BTS, keep_BHTS, dropout_rate)


def resolve_backend(backend: str, dtype: jnp.dtype | str = "float32") -> str:
    """The concrete backend ("xla", "cudnn" or "pallas") for `backend` on this platform.

    "auto" picks cuDNN on an NVIDIA GPU (for bfloat16/float16; cuDNN's fused attention has no
    float32 kernel, so float32 goes to Pallas), Pallas on TPU (and non-NVIDIA GPUs), and XLA on
    CPU. Asking for a backend the platform lacks is a ConfigError, never a silent fallback.
    Pallas is available everywhere: on CPU its kernels run in the (slow) Pallas interpreter.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    device = jax.devices()[0]
    # JAX's "gpu" platform is CUDA (NVIDIA) unless the runtime reports ROCm (AMD).
    nvidia = device.platform == "gpu" and "rocm" not in device.client.platform_version.lower()
    half = jnp.dtype(dtype) in (jnp.dtype("bfloat16"), jnp.dtype("float16"))
    if backend == "auto":
        if device.platform == "cpu":
            return "xla"
        return "cudnn" if nvidia and half else "pallas"
    if backend == "cudnn":
        if not nvidia:
            raise ConfigError(
                f"attention backend 'cudnn' needs an NVIDIA GPU, but JAX is running on "
                f"{device.platform!r} ({device.device_kind}); use 'xla', 'pallas' or 'auto'"
            )
        if not half:
            raise ConfigError(
                f"attention backend 'cudnn' takes only bfloat16/float16, not {jnp.dtype(dtype)}; "
                f"set model.dtype=bfloat16 or use 'pallas' / 'auto'"
            )
    return backend


def cudnn_attention(
    q_BHTK: jax.Array,
    k_BHSK: jax.Array,
    v_BHSK: jax.Array,
    *,
    q_offset: jax.Array | int = 0,
    kv_start_B: jax.Array | None = None,
    segment_ids_BS: jax.Array | None = None,
) -> jax.Array:
    """The cuDNN fused kernel via `jax.nn.dot_product_attention`, with the reference's mask.

    cuDNN wants `[B, T, H, K]`; the mask (causal from `q_offset`, valid from `kv_start_B`, same
    segment) is passed explicitly. Queries with no valid key (left padding) may differ from the
    reference there; those outputs are never read.
    """
    B, _, T, _ = q_BHTK.shape
    S = k_BHSK.shape[2]
    q_BTHK, k_BSHK, v_BSHK = (x.transpose(0, 2, 1, 3) for x in (q_BHTK, k_BHSK, v_BHSK))
    plain = kv_start_B is None and segment_ids_BS is None
    if plain and isinstance(q_offset, int) and q_offset == 0 and T == S:
        # Training: plain causal attention, cuDNN's built-in causal mask (no mask tensor).
        out_BTHK = jax.nn.dot_product_attention(
            q_BTHK, k_BSHK, v_BSHK, is_causal=True, implementation="cudnn"
        )
    else:
        if kv_start_B is None:
            kv_start_B = jnp.zeros((B,), jnp.int32)
        mask_B1TS = attention_mask(q_offset, T, S, kv_start_B, segment_ids_BS)[:, None]
        out_BTHK = jax.nn.dot_product_attention(
            q_BTHK, k_BSHK, v_BSHK, mask=mask_B1TS, implementation="cudnn"
        )
    return out_BTHK.transpose(0, 2, 1, 3)


def multi_head_attention(
    q_BHTK: jax.Array,
    k_BHSK: jax.Array,
    v_BHSK: jax.Array,
    *,
    backend: str = "xla",
    q_offset: jax.Array | int = 0,
    kv_start_B: jax.Array | None = None,
    segment_ids_BS: jax.Array | None = None,
    keep_BHTS: jax.Array | None = None,
    dropout_rate: float = 0.0,
) -> jax.Array:
    """Causal attention over all heads of a batch with the chosen backend; returns out_BHTK.

    `segment_ids_BS` (optional, int `[B, S]`) packs independent sequences into one row: a query
    sees only keys of its own segment (see the module docstring).

    Backends (see `resolve_backend`): "xla" is `reference_attention`; "cudnn" is
    `cudnn_attention`; "pallas" is jaxgpt's flash kernel (`jaxgpt.kernels.flash_attention`), or,
    for one query per row against a longer KV cache (a decode step), the flash-decoding kernel
    `jaxgpt.kernels.decode_attention`. Attention dropout (`keep_BHTS`) exists only in "xla".
    """
    backend = resolve_backend(backend, q_BHTK.dtype)
    if keep_BHTS is not None and backend != "xla":
        raise ConfigError(
            f"attention dropout (attn_dropout={dropout_rate}) is only implemented by the 'xla' "
            f"attention backend, not {backend!r}; set model.attn_dropout=0 or model.attention=xla"
        )
    if backend == "cudnn":
        return cudnn_attention(
            q_BHTK, k_BHSK, v_BHSK, q_offset=q_offset, kv_start_B=kv_start_B,
            segment_ids_BS=segment_ids_BS,
        )  # fmt: skip
    if backend == "pallas":
        # Imported lazily: users of the XLA path never import Pallas.
        from jaxgpt.kernels import decode_attention, flash_attention

        T, S = q_BHTK.shape[2], k_BHSK.shape[2]
        kernel = decode_attention if T == 1 and S > 1 else flash_attention
        return kernel(
            q_BHTK, k_BHSK, v_BHSK, q_offset=q_offset, kv_start_B=kv_start_B,
            segment_ids_BS=segment_ids_BS,
        )  # fmt: skip
    out_BHTK, _ = reference_attention(
        q_BHTK,
        k_BHSK,
        v_BHSK,
        q_offset=q_offset,
        kv_start_B=kv_start_B,
        segment_ids_BS=segment_ids_BS,
        keep_BHTS=keep_BHTS,
        dropout_rate=dropout_rate,
    )
    return out_BHTK
