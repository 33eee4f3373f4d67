"""Flash attention in Pallas: a tiled forward with an online softmax, and its tiled backward.

The function computed is exactly `jaxgpt.attention.reference_attention` (without dropout): query t
sits at slot `q_offset + t` and row b may attend to key slots `kv_start_B[b] ≤ s ≤ q_offset + t`
— of the query's own segment when `segment_ids_BS` packs several sequences into a row (the rule
is `jaxgpt.attention.allowed`, shared with the reference). A query with no valid key (a
left-padding position) gets the reference's uniform average over all S keys, so even never-read
outputs agree.

Forward, one program per (row, head, query block):

    for each key block that holds a key this query block may see:
        scores = Q Kᵀ · scale (float32), masked
        m_new  = max(m, rowmax(scores));  p = exp(scores - m_new)
        l      = l · exp(m - m_new) + rowsum(p)
        acc    = acc · exp(m - m_new) + p V
    out = acc / l;   lse = m + log(l)            (the log-sum-exp, saved for the backward)

Key blocks entirely in a query block's future, or entirely before the row's first valid slot, are
never loaded. (With segments, blocks of other segments inside that range are still visited and
masked: correct for any segment layout, and the causal skip already removes half the work.)
Sequences of any length are padded up to whole blocks; padded keys are excluded
by a score far below the mask value, padded queries are sliced away.

Backward (`jax.custom_vjp`): with P = exp(scores - lse) recomputed block by block and
Δ = rowsum(dO ∘ O), dS = P ∘ (dO Vᵀ - Δ) is zero where masked, and

    dQ = dS K · scale        (one program per query block, looping over key blocks)
    dK = dSᵀ Q · scale,  dV = Pᵀ dO   (one program per key block, looping over query blocks)

Each program owns its output block, so no atomics are needed. K and V (forward, dQ) and Q, dO,
lse, Δ (dK/dV) are one block spanning the sequence and sliced in the loop: simple and portable
across Triton and Mosaic, at the cost of holding those rows in on-chip memory (fine for GPT-2's
1024-token context; see docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxgpt.attention import allowed, check_segments, query_segments
from jaxgpt.errors import ConfigError
from jaxgpt.kernels import platform as plat

# The reference masks scores with -1e30 (a fully masked row becomes uniform, not NaN); padded tail
# keys, which the reference does not have at all, get a score so low that exp() of it is 0 even
# against a row maximum of -1e30. It also starts the running maximum.
MASKED = -1e30
OUTSIDE = -3e38


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the flash kernels: queries per block and keys per block.

    Triton needs powers of two ≥ 16 (its matrix units); Mosaic on TPU wants multiples of 128 for
    the best layout. Sequences shorter than a block use one smaller (power-of-two) block.
    """

    block_q: int = 64
    block_k: int = 64

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 8 or value & (value - 1):
                raise ConfigError(f"BlockSizes.{name} must be a power of two >= 8, got {value!r}")


def default_block_sizes() -> BlockSizes:
    """128×128 tiles on TPU (MXU-sized), 64×64 on GPU and in the CPU interpreter."""
    return BlockSizes(128, 128) if plat.platform() == "tpu" else BlockSizes(64, 64)


def fit_block(block: int, length: int) -> int:
    """The block size actually used for a sequence of `length`: at most the next power of two."""
    return min(block, max(16, pl.next_power_of_2(length)))


def scalar_table(q_offset: jax.Array | int, kv_start_B: jax.Array | None, B: int) -> jax.Array:
    """int32 `[q_offset, kv_start_0 … kv_start_{B-1}]`, zero-padded to a power-of-two length."""
    if kv_start_B is None:
        kv_start_B = jnp.zeros((B,), jnp.int32)
    table = jnp.concatenate([jnp.reshape(jnp.asarray(q_offset, jnp.int32), (1,)),
                             jnp.asarray(kv_start_B, jnp.int32)])  # fmt: skip
    return jnp.pad(table, (0, pl.next_power_of_2(B + 1) - (B + 1)))


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-D matmul contracting a's axis contract[0] with b's axis contract[1], float32 result."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def allowed_mask(
    q_slot_Q1: jax.Array,
    k_slot_1K: jax.Array,
    kv_start: jax.Array,
    q_seg_Q1: jax.Array | None = None,
    k_seg_1K: jax.Array | None = None,
) -> jax.Array:
    """`[bq, bk]` True where the query may attend to the key: the reference's rule on one tile."""
    return allowed(q_slot_Q1, k_slot_1K, kv_start, q_seg_Q1, k_seg_1K)


def masked_scores(
    s_QK: jax.Array, allowed_QK: jax.Array, k_slot_1K: jax.Array, kv_len: int
) -> jax.Array:
    """Scores with the reference's mask value, and padded keys (slot ≥ kv_len) pushed out."""
    s_QK = jnp.where(allowed_QK, s_QK, MASKED)
    return jnp.where(k_slot_1K < kv_len, s_QK, OUTSIDE)


def probabilities(
    s_QK: jax.Array, lse_Q1: jax.Array, k_slot_1K: jax.Array, kv_len: int
) -> jax.Array:
    """P = exp(scores - lse), recomputed in the backward from the saved log-sum-exp.

    A query with no valid key has lse = -1e30 + log(S), which rounds to -1e30 in float32, so
    exp() would give 1 instead of 1/S; its probabilities are the uniform 1/S written directly.
    """
    p_QK = jnp.exp(s_QK - lse_Q1)
    uniform_QK = jnp.where(k_slot_1K < kv_len, 1.0 / kv_len, 0.0)
    return jnp.where(lse_Q1 <= MASKED / 2, uniform_QK, p_QK)


def kv_block_range(
    first_q_slot: jax.Array, block_q: int, kv_start: jax.Array, block_k: int, n_k: int
) -> tuple[jax.Array, jax.Array]:
    """Key blocks [lo, hi) a query block must visit.

    Normally those between the row's first valid slot and the block's last query; but a block
    holding a query with no valid key (slot < kv_start) visits every key block, because the
    reference gives such a query the uniform average over all S keys.
    """
    has_empty_rows = first_q_slot < kv_start
    lo = jnp.where(has_empty_rows, 0, kv_start // block_k)
    causal_hi = pl.cdiv(first_q_slot + block_q, block_k)
    hi = jnp.where(has_empty_rows, n_k, jnp.minimum(n_k, causal_hi))
    return lo, hi


# --------------------------------------------------------------------------- forward


def _split_refs(refs: tuple, segmented: bool) -> tuple:
    """The kernel refs after q, k, v: (the segment refs or None, the remaining refs)."""
    return (refs[:2], refs[2:]) if segmented else (None, refs)


def _tile_segments(seg_refs, q_rows, k_cols) -> tuple:
    """The segment ids of a tile's queries `[bq, 1]` and keys `[1, bk]` (None without segments)."""
    if seg_refs is None:
        return None, None
    q_seg_ref, k_seg_ref = seg_refs
    return q_seg_ref[q_rows, :], k_seg_ref[:, k_cols]


def _forward_kernel(table_ref, q_ref, k_ref, v_ref, *refs, block_k, kv_len, n_k, segmented):
    """One (row, head, query block): online softmax over the visible key blocks."""
    seg_refs, (o_ref, lse_ref) = _split_refs(refs, segmented)
    b, i = pl.program_id(0), pl.program_id(2)
    q_offset, kv_start = table_ref[0], table_ref[b + 1]
    block_q, head_dim = q_ref.shape
    scale = 1.0 / (head_dim**0.5)
    first_q_slot = q_offset + i * block_q
    q_slot_Q1 = first_q_slot + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    q_QD = q_ref[...]

    def step(j, carry):
        m_Q1, l_Q1, acc_QD = carry
        start = pl.multiple_of(j * block_k, block_k)
        k_KD = k_ref[pl.ds(start, block_k), :]
        v_KD = v_ref[pl.ds(start, block_k), :]
        k_slot_1K = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        q_seg_Q1, k_seg_1K = _tile_segments(seg_refs, slice(None), pl.ds(start, block_k))
        allowed_QK = allowed_mask(q_slot_Q1, k_slot_1K, kv_start, q_seg_Q1, k_seg_1K)
        s_QK = masked_scores(_dot(q_QD, k_KD, (1, 1)) * scale, allowed_QK, k_slot_1K, kv_len)
        m_new_Q1 = jnp.maximum(m_Q1, s_QK.max(axis=1, keepdims=True))
        p_QK = jnp.exp(s_QK - m_new_Q1)
        alpha_Q1 = jnp.exp(m_Q1 - m_new_Q1)
        l_Q1 = alpha_Q1 * l_Q1 + p_QK.sum(axis=1, keepdims=True)
        acc_QD = alpha_Q1 * acc_QD + _dot(p_QK.astype(v_KD.dtype), v_KD, (1, 0))
        return m_new_Q1, l_Q1, acc_QD

    lo, hi = kv_block_range(first_q_slot, block_q, kv_start, block_k, n_k)
    init = (
        jnp.full((block_q, 1), OUTSIDE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros((block_q, head_dim), jnp.float32),
    )
    m_Q1, l_Q1, acc_QD = jax.lax.fori_loop(lo, hi, step, init)
    # The loop visits at least one real key and the row maximum adds exp(0) = 1, so l ≥ 1.
    o_ref[...] = (acc_QD / l_Q1).astype(o_ref.dtype)
    lse_ref[...] = m_Q1 + jnp.log(l_Q1)


def _segment_specs(segments, q_rows: int, k_cols: int, q_by_program: bool) -> list[pl.BlockSpec]:
    """BlockSpecs of the query segments `[B, Tp, 1]` and key segments `[B, 1, Sp]`: the program's
    own block on one side (queries if `q_by_program`, else keys), the whole row on the other."""
    if segments is None:
        return []
    q_index = (lambda b, h, i: (b, i, 0)) if q_by_program else (lambda b, h, j: (b, 0, 0))
    k_index = (lambda b, h, i: (b, 0, 0)) if q_by_program else (lambda b, h, j: (b, 0, j))
    return [pl.BlockSpec((None, q_rows, 1), q_index), pl.BlockSpec((None, 1, k_cols), k_index)]


def _forward(q, k, v, table, segments, kv_len: int, blocks: BlockSizes, interpret: bool):
    """Padded q `[B,H,Tp,D]`, k/v `[B,H,Sp,D]` (and optionally segment ids `([B,Tp,1], [B,1,Sp])`)
    → (out `[B,H,Tp,D]`, lse `[B,H,Tp,1]` float32)."""
    B, H, Tp, D = q.shape
    Sp = k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    n_q, n_k = Tp // bq, pl.cdiv(kv_len, bk)
    kernel = functools.partial(
        _forward_kernel, block_k=bk, kv_len=kv_len, n_k=n_k, segmented=segments is not None
    )
    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, Sp, D), lambda b, h, i: (b, h, 0, 0))
    lse_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
    return pl.pallas_call(
        kernel,
        grid=(B, H, n_q),
        in_specs=[
            plat.scalar_table_spec(table.shape[0]),
            q_spec,
            kv_spec,
            kv_spec,
            *_segment_specs(segments, bq, Sp, q_by_program=True),
        ],
        out_specs=[q_spec, lse_spec],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, H, Tp, 1), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=plat.compiler_params(3),
        name="jaxgpt_flash_forward",
    )(table, q, k, v, *(segments or ()))


# --------------------------------------------------------------------------- backward


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, *refs, block_k, kv_len, n_k, segmented):
    """One (row, head, query block): dQ = Σ over visible key blocks of dS K · scale."""
    seg_refs, (do_ref, lse_ref, delta_ref, dq_ref) = _split_refs(refs, segmented)
    b, i = pl.program_id(0), pl.program_id(2)
    q_offset, kv_start = table_ref[0], table_ref[b + 1]
    block_q, head_dim = q_ref.shape
    scale = 1.0 / (head_dim**0.5)
    first_q_slot = q_offset + i * block_q
    q_slot_Q1 = first_q_slot + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    q_QD, do_QD = q_ref[...], do_ref[...]
    lse_Q1, delta_Q1 = lse_ref[...], delta_ref[...]

    def step(j, dq_QD):
        start = pl.multiple_of(j * block_k, block_k)
        k_KD = k_ref[pl.ds(start, block_k), :]
        v_KD = v_ref[pl.ds(start, block_k), :]
        k_slot_1K = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        q_seg_Q1, k_seg_1K = _tile_segments(seg_refs, slice(None), pl.ds(start, block_k))
        allowed_QK = allowed_mask(q_slot_Q1, k_slot_1K, kv_start, q_seg_Q1, k_seg_1K)
        s_QK = masked_scores(_dot(q_QD, k_KD, (1, 1)) * scale, allowed_QK, k_slot_1K, kv_len)
        p_QK = probabilities(s_QK, lse_Q1, k_slot_1K, kv_len)
        dp_QK = _dot(do_QD, v_KD, (1, 1))
        # Masked scores are constants in the reference, so no gradient flows through them.
        ds_QK = jnp.where(allowed_QK, p_QK * (dp_QK - delta_Q1), 0.0)
        return dq_QD + _dot(ds_QK.astype(k_KD.dtype), k_KD, (1, 0))

    lo, hi = kv_block_range(first_q_slot, block_q, kv_start, block_k, n_k)
    dq_QD = jax.lax.fori_loop(lo, hi, step, jnp.zeros((block_q, head_dim), jnp.float32))
    dq_ref[...] = (dq_QD * scale).astype(dq_ref.dtype)


def _dkv_kernel(table_ref, q_ref, k_ref, v_ref, *refs, block_q, kv_len, n_q, segmented):
    """One (row, head, key block): dK and dV summed over the query blocks that saw it.

    Those are exactly the query blocks whose forward visited this key block (`kv_block_range`):
    the blocks holding empty (all-masked) queries, then the causal ones from the first query
    block that reaches this key block.
    """
    seg_refs, rest = _split_refs(refs, segmented)
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
    b, j = pl.program_id(0), pl.program_id(2)
    q_offset, kv_start = table_ref[0], table_ref[b + 1]
    block_k, head_dim = k_ref.shape
    scale = 1.0 / (head_dim**0.5)
    k_start = j * block_k
    k_slot_1K = k_start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    k_KD, v_KD = k_ref[...], v_ref[...]

    def step(i, carry):
        dk_KD, dv_KD = carry
        start = pl.multiple_of(i * block_q, block_q)
        q_QD = q_ref[pl.ds(start, block_q), :]
        do_QD = do_ref[pl.ds(start, block_q), :]
        lse_Q1 = lse_ref[pl.ds(start, block_q), :]
        delta_Q1 = delta_ref[pl.ds(start, block_q), :]
        q_slot_Q1 = q_offset + start + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
        q_seg_Q1, k_seg_1K = _tile_segments(seg_refs, pl.ds(start, block_q), slice(None))
        allowed_QK = allowed_mask(q_slot_Q1, k_slot_1K, kv_start, q_seg_Q1, k_seg_1K)
        s_QK = masked_scores(_dot(q_QD, k_KD, (1, 1)) * scale, allowed_QK, k_slot_1K, kv_len)
        p_QK = probabilities(s_QK, lse_Q1, k_slot_1K, kv_len)
        dv_KD = dv_KD + _dot(p_QK.astype(do_QD.dtype), do_QD, (0, 0))
        dp_QK = _dot(do_QD, v_KD, (1, 1))
        ds_QK = jnp.where(allowed_QK, p_QK * (dp_QK - delta_Q1), 0.0)
        dk_KD = dk_KD + _dot(ds_QK.astype(q_QD.dtype), q_QD, (0, 0))
        return dk_KD, dv_KD

    # Query blocks whose first slot precedes kv_start hold empty queries (they saw every key).
    n_empty = jnp.clip(pl.cdiv(kv_start - q_offset, block_q), 0, n_q)
    # Causal: query block i reaches key block j iff q_offset + (i+1)·block_q > j·block_k.
    first_causal = jnp.maximum(jnp.floor_divide(k_start - q_offset, block_q), n_empty)
    first_causal = jnp.where(k_start + block_k > kv_start, first_causal, n_q)
    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    carry = jax.lax.fori_loop(0, n_empty, step, (zeros, zeros))
    dk_KD, dv_KD = jax.lax.fori_loop(first_causal, n_q, step, carry)
    dk_ref[...] = (dk_KD * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_KD.astype(dv_ref.dtype)


def _backward(q, k, v, table, segments, out, lse, do, kv_len, blocks: BlockSizes, interpret):
    B, H, Tp, D = q.shape
    Sp = k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    n_q, n_k = Tp // bq, pl.cdiv(kv_len, bk)
    # Δ = rowsum(dO ∘ O): a cheap elementwise reduction, left to XLA.
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    table_spec = plat.scalar_table_spec(table.shape[0])

    def block_of(rows: int, width: int, by_program: bool) -> pl.BlockSpec:
        if by_program:
            return pl.BlockSpec((None, None, rows, width), lambda b, h, i: (b, h, i, 0))
        return pl.BlockSpec((None, None, rows, width), lambda b, h, i: (b, h, 0, 0))

    segmented = segments is not None
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=bk, kv_len=kv_len, n_k=n_k, segmented=segmented),
        grid=(B, H, n_q),
        in_specs=[
            table_spec,
            block_of(bq, D, True),
            block_of(Sp, D, False),
            block_of(Sp, D, False),
            *_segment_specs(segments, bq, Sp, q_by_program=True),
            block_of(bq, D, True),
            block_of(bq, 1, True),
            block_of(bq, 1, True),
        ],
        out_specs=block_of(bq, D, True),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        compiler_params=plat.compiler_params(3),
        name="jaxgpt_flash_backward_dq",
    )(table, q, k, v, *(segments or ()), do, lse, delta)

    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=bq, kv_len=kv_len, n_q=n_q, segmented=segmented),
        grid=(B, H, Sp // bk),
        in_specs=[
            table_spec,
            block_of(Tp, D, False),
            block_of(bk, D, True),
            block_of(bk, D, True),
            *_segment_specs(segments, Tp, bk, q_by_program=False),
            block_of(Tp, D, False),
            block_of(Tp, 1, False),
            block_of(Tp, 1, False),
        ],
        out_specs=[block_of(bk, D, True), block_of(bk, D, True)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret,
        compiler_params=plat.compiler_params(3),
        name="jaxgpt_flash_backward_dkv",
    )(table, q, k, v, *(segments or ()), do, lse, delta)
    return dq, dk, dv


# --------------------------------------------------------------------------- custom_vjp


# `segments` is None or the pair of int32 segment-id arrays; like `table`, it gets no cotangent.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, table, segments, kv_len, blocks, interpret):
    return _forward(q, k, v, table, segments, kv_len, blocks, interpret)[0]


def _flash_fwd(q, k, v, table, segments, kv_len, blocks, interpret):
    out, lse = _forward(q, k, v, table, segments, kv_len, blocks, interpret)
    return out, (q, k, v, table, segments, out, lse)


def _flash_bwd(kv_len, blocks, interpret, residuals, do):
    q, k, v, table, segments, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, table, segments, out, lse, do, kv_len, blocks, interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q_BHTK: jax.Array,
    k_BHSK: jax.Array,
    v_BHSK: jax.Array,
    *,
    q_offset: jax.Array | int = 0,
    kv_start_B: jax.Array | None = None,
    segment_ids_BS: jax.Array | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Causal attention with the Pallas flash kernels; differentiable in q, k and v.

    Args:
      q_BHTK: queries (float32 or bfloat16); query t sits at cache slot `q_offset + t`.
      k_BHSK, v_BHSK: keys and values over S cache slots, same dtype as q.
      q_offset: slot of the first query (traced or static).
      kv_start_B: first valid key slot per row (None: 0 for every row).
      segment_ids_BS: int segment id per key slot `[B, S]` (None: one segment per row); a query
        attends only to keys of its own segment (that of its slot `q_offset + t`).
      block_sizes: tile sizes (default `default_block_sizes()`).
      interpret: run in the Pallas interpreter (default: only on CPU).

    Returns:
      out_BHTK, equal to `reference_attention(...)[0]` up to float rounding.
    """
    B, T = q_BHTK.shape[0], q_BHTK.shape[2]
    S = k_BHSK.shape[2]
    blocks = block_sizes or default_block_sizes()
    blocks = BlockSizes(fit_block(blocks.block_q, T), fit_block(blocks.block_k, S))
    interpret = plat.use_interpreter() if interpret is None else interpret
    Tp = pl.cdiv(T, blocks.block_q) * blocks.block_q
    Sp = pl.cdiv(S, blocks.block_k) * blocks.block_k
    pad_q = ((0, 0), (0, 0), (0, Tp - T), (0, 0))
    pad_kv = ((0, 0), (0, 0), (0, Sp - S), (0, 0))
    table = scalar_table(q_offset, kv_start_B, B)
    segments = None
    if segment_ids_BS is not None:
        check_segments(segment_ids_BS, B, S)
        seg_BS = jnp.asarray(segment_ids_BS, jnp.int32)
        # Padded slots are outside every row (masked by kv_len / sliced away): any id will do.
        q_seg_BTp1 = jnp.pad(query_segments(seg_BS, q_offset, T), ((0, 0), (0, Tp - T)))[..., None]
        k_seg_B1Sp = jnp.pad(seg_BS, ((0, 0), (0, Sp - S)))[:, None, :]
        segments = (q_seg_BTp1, k_seg_B1Sp)
    out = _flash(
        jnp.pad(q_BHTK, pad_q), jnp.pad(k_BHSK, pad_kv), jnp.pad(v_BHSK, pad_kv),
        table, segments, S, blocks, interpret,
    )  # fmt: skip
    return out[:, :, :T]
