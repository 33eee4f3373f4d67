"""Decode attention in Pallas: one new query per row against a long KV cache (flash-decoding).

In a decode step each (row, head) has a single query, so the flash kernel's query tiling has
nothing to tile. The parallelism is in the cache instead: the S slots are cut into `n_splits`
chunks, one program per (row, head, chunk) computes a partial softmax over its chunk —

    m = max score,  l = Σ exp(score - m),  acc = Σ exp(score - m) · v

— and a final reduction rescales the partials to a common maximum and divides:

    out = Σ_c exp(m_c - M) acc_c / Σ_c exp(m_c - M) l_c,   M = max_c m_c.

Each chunk only loads the key blocks inside the row's valid range `kv_start_B[b] ≤ s ≤ q_offset`,
so a short prompt in a long cache costs little. The function is `reference_attention` with T = 1
(a query before its row's first valid slot gets the reference's uniform average over all S).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxgpt.errors import ConfigError
from jaxgpt.kernels import platform as plat
from jaxgpt.kernels.flash_attention import MASKED, OUTSIDE, scalar_table


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    """Cache slots per chunk (one program each) and per inner block (one loop step)."""

    chunk: int = 512
    block_k: int = 64

    def __post_init__(self) -> None:
        for name in ("chunk", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 8 or value & (value - 1):
                raise ConfigError(f"DecodeBlocks.{name} must be a power of two >= 8, got {value!r}")
        if self.chunk < self.block_k:
            raise ConfigError(
                f"DecodeBlocks.chunk ({self.chunk}) must be >= block_k ({self.block_k})"
            )


def _decode_kernel(table_ref, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *, block_k, kv_len):
    """One (row, head, chunk): the partial softmax statistics of its valid key blocks."""
    b, c = pl.program_id(0), pl.program_id(2)
    q_slot, kv_start = table_ref[0], table_ref[b + 1]
    chunk, head_dim = k_ref.shape
    scale = 1.0 / (head_dim**0.5)
    q_1D = q_ref[...].astype(jnp.float32)
    chunk_start = c * chunk
    n_k = pl.cdiv(kv_len, block_k)
    # Blocks of this chunk (global block indices) inside the valid range; a query with no valid
    # key visits every block (uniform average, as in the reference).
    first = chunk_start // block_k
    last = jnp.minimum(first + chunk // block_k, n_k)
    empty = q_slot < kv_start
    lo = jnp.where(empty, first, jnp.maximum(first, kv_start // block_k))
    hi = jnp.where(empty, last, jnp.minimum(last, q_slot // block_k + 1))

    def step(j, carry):
        m_11, l_11, acc_1D = carry
        start = pl.multiple_of(j * block_k - chunk_start, block_k)
        k_KD = k_ref[pl.ds(start, block_k), :].astype(jnp.float32)
        v_KD = v_ref[pl.ds(start, block_k), :]
        slot_K1 = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
        # One query: a broadcast multiply and a sum beat a 1-row matmul (and lower everywhere).
        s_K1 = jnp.sum(q_1D * k_KD, axis=1, keepdims=True) * scale
        s_K1 = jnp.where((slot_K1 <= q_slot) & (slot_K1 >= kv_start), s_K1, MASKED)
        s_K1 = jnp.where(slot_K1 < kv_len, s_K1, OUTSIDE)
        m_new_11 = jnp.maximum(m_11, s_K1.max(axis=0, keepdims=True))
        p_K1 = jnp.exp(s_K1 - m_new_11)
        alpha_11 = jnp.exp(m_11 - m_new_11)
        l_11 = alpha_11 * l_11 + p_K1.sum(axis=0, keepdims=True)
        # The reference rounds the weights to V's dtype before the weighted sum; so do we.
        w_K1 = p_K1.astype(v_KD.dtype).astype(jnp.float32)
        acc_1D = alpha_11 * acc_1D + jnp.sum(w_K1 * v_KD.astype(jnp.float32), axis=0, keepdims=True)
        return m_new_11, l_11, acc_1D

    init = (
        jnp.full((1, 1), OUTSIDE, jnp.float32),
        jnp.zeros((1, 1), jnp.float32),
        jnp.zeros((1, head_dim), jnp.float32),
    )
    m_11, l_11, acc_1D = jax.lax.fori_loop(lo, hi, step, init)
    m_ref[...], l_ref[...], acc_ref[...] = m_11, l_11, acc_1D


def decode_attention(
    q_BH1K: jax.Array,
    k_BHSK: jax.Array,
    v_BHSK: jax.Array,
    *,
    q_offset: jax.Array | int,
    kv_start_B: jax.Array | None = None,
    segment_ids_BS: None = None,
    blocks: DecodeBlocks | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of one query per row (at cache slot `q_offset`) over a KV cache of S slots.

    Args:
      q_BH1K: the new queries (T = 1).
      k_BHSK, v_BHSK: the cache, already holding this step's key and value at `q_offset`.
      q_offset: the query's slot (traced or static).
      kv_start_B: first valid slot per row (None: 0).
      segment_ids_BS: must be None: a decode step extends one sequence per row, so there are no
        packed segments (accepted only to refuse them with a clear error).
      blocks: chunk and inner block sizes (default `DecodeBlocks()`, shrunk for short caches).
      interpret: run in the Pallas interpreter (default: only on CPU).

    Returns:
      out_BH1K, equal to `reference_attention(...)[0]` up to float rounding.
    """
    B, H, T, D = q_BH1K.shape
    if segment_ids_BS is not None:
        raise ConfigError(
            "decode_attention takes no segment ids: a decode step extends one sequence per row; "
            "packed segments are for training/prefill (flash_attention or the 'xla' backend)"
        )
    if T != 1:
        raise ConfigError(f"decode_attention takes one query per row (T = 1), got T = {T}")
    S = k_BHSK.shape[2]
    blocks = blocks or DecodeBlocks()
    block_k = min(blocks.block_k, max(16, pl.next_power_of_2(S)))
    chunk = max(block_k, min(blocks.chunk, pl.next_power_of_2(S)))
    interpret = plat.use_interpreter() if interpret is None else interpret
    n_chunks = pl.cdiv(S, chunk)
    pad = ((0, 0), (0, 0), (0, n_chunks * chunk - S), (0, 0))
    k_BHSK, v_BHSK = jnp.pad(k_BHSK, pad), jnp.pad(v_BHSK, pad)
    table = scalar_table(q_offset, kv_start_B, B)

    # Partials are [B, H, chunks, 1, ·] so each program's block is a whole trailing [1, ·] tile.
    def partial_spec(width: int) -> pl.BlockSpec:
        return pl.BlockSpec((None, None, None, 1, width), lambda b, h, c: (b, h, c, 0, 0))

    m, total, acc = pl.pallas_call(
        functools.partial(_decode_kernel, block_k=block_k, kv_len=S),
        grid=(B, H, n_chunks),
        in_specs=[
            plat.scalar_table_spec(table.shape[0]),
            pl.BlockSpec((None, None, 1, D), lambda b, h, c: (b, h, 0, 0)),
            pl.BlockSpec((None, None, chunk, D), lambda b, h, c: (b, h, c, 0)),
            pl.BlockSpec((None, None, chunk, D), lambda b, h, c: (b, h, c, 0)),
        ],
        out_specs=[partial_spec(1), partial_spec(1), partial_spec(D)],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, n_chunks, 1, 1), jnp.float32),
            jax.ShapeDtypeStruct((B, H, n_chunks, 1, 1), jnp.float32),
            jax.ShapeDtypeStruct((B, H, n_chunks, 1, D), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=plat.compiler_params(3),
        name="jaxgpt_decode_attention",
    )(table, q_BH1K, k_BHSK, v_BHSK)

    # The final reduction over chunks (empty chunks have m = OUTSIDE, total = 0 and drop out).
    m_max = m.max(axis=2, keepdims=True)
    weight = jnp.exp(m - m_max)
    out_BH1D = (weight * acc).sum(axis=2) / (weight * total).sum(axis=2)
    return out_BH1D.astype(q_BH1K.dtype)
