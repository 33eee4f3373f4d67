"""Packing whole documents (conversations) into the `[B, T+1]` rows of a training batch.

Supervised fine-tuning trains on many short conversations. Padding each one to the context
length would waste most of every row, so several are packed into one row, end to end::

    row:       [ conv 7 ........ | conv 2 ..... | conv 9 ............ | pad  ]
    segments:  [ 1 1 1 1 1 1 1 1 | 2 2 2 2 2 2 | 3 3 3 3 3 3 3 3 3 3 | 0 0  ]
    positions: [ 0 1 2 3 4 5 6 7 | 0 1 2 3 4 5 | 0 1 2 3 4 5 6 7 8 9 | 0 0  ]

The attention lets a token see only earlier tokens of its own segment and the positions restart
at each conversation, so every conversation computes exactly what it would alone in a row (the
test checks that its loss is the same packed and unpacked). Segment 0 is padding.

The loss weight of the prediction at slot t (of token t+1) is `mask[t+1]` — the document's own
0/1 mask of "tokens the model is trained to produce" — and only when t and t+1 belong to the
same real segment, so no conversation is ever trained to predict the start of the next one.

Like the pretraining windows (`jaxgpt.data.get_batch`), a batch is a pure function of
(seed, step), so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxgpt.errors import InputError


@dataclass(frozen=True)
class Documents:
    """Documents stored end to end: document i is `tokens[offsets[i]:offsets[i+1]]`.

    `mask` (same length as `tokens`, 0/1) marks the tokens a model is trained to produce.
    """

    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray  # int64 [n_docs + 1], offsets[0] == 0

    def __post_init__(self) -> None:
        if len(self.offsets) < 2:
            raise InputError("no documents: at least one is needed to make a batch")
        if len(self.tokens) != len(self.mask) or int(self.offsets[-1]) != len(self.tokens):
            raise InputError(
                f"documents are inconsistent: {len(self.tokens)} tokens, {len(self.mask)} mask "
                f"values, offsets ending at {int(self.offsets[-1])}"
            )

    @property
    def count(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[lo:hi], self.mask[lo:hi]


@dataclass(frozen=True)
class PackedRows:
    """A packed batch, each array `[rows, row_len]` int32 (row_len = T + 1)."""

    tokens: np.ndarray
    segments: np.ndarray  # 1, 2, ... per document in the row; 0 = padding
    positions: np.ndarray  # restart at 0 for each document
    mask: np.ndarray  # the documents' own 0/1 masks (0 on padding)
    truncated: int  # documents cut to fit one row

    def as_dict(self) -> dict[str, np.ndarray]:
        return {
            "tokens": self.tokens,
            "segments": self.segments,
            "positions": self.positions,
            "mask": self.mask,
        }


def pack(docs: Documents, order: np.ndarray, rows: int, row_len: int) -> PackedRows:
    """Pack documents, taken in `order`, first-fit into `rows` rows of `row_len` tokens.

    Each document goes into the first row with room for it (a document never spans two rows);
    one longer than a whole row is cut to `row_len` tokens (counted in `truncated`); one that
    fits nowhere is skipped. Packing stops when every row is full or `order` is used up (what
    is left stays padding).
    """
    shape = (rows, row_len)
    tokens, segments, positions, mask = (np.zeros(shape, np.int32) for _ in range(4))
    fill_R = np.zeros(rows, np.int64)
    count_R = np.zeros(rows, np.int64)
    truncated = 0
    for i in order:
        ids, doc_mask = docs.doc(int(i))
        if len(ids) > row_len:
            ids, doc_mask, truncated = ids[:row_len], doc_mask[:row_len], truncated + 1
        room = np.flatnonzero(fill_R + len(ids) <= row_len)
        if len(room) == 0:
            if fill_R.min() == row_len:
                break
            continue
        row = int(room[0])
        span = slice(int(fill_R[row]), int(fill_R[row]) + len(ids))
        count_R[row] += 1
        tokens[row, span] = ids
        segments[row, span] = count_R[row]
        positions[row, span] = np.arange(len(ids))
        mask[row, span] = doc_mask
        fill_R[row] += len(ids)
    return PackedRows(tokens, segments, positions, mask, truncated)


def get_packed_batch(
    docs: Documents,
    batch_size: int,
    block_size: int,
    seed: int,
    step: int,
    *,
    accum: int = 1,
    rows: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """`[accum, batch_size, block_size + 1]` packed rows (a dict of int32 arrays) for `step`.

    Documents are drawn uniformly with replacement by a generator seeded with (seed, step) —
    enough of them to fill every row — so the batch is a pure function of (seed, step).
    `rows=(start, stop)` keeps only this process's rows of each micro-batch.
    """
    row_len = block_size + 1
    n_rows = accum * batch_size
    mean_len = max(1.0, float(np.mean(np.minimum(docs.lengths(), row_len))))
    # Twice the expected need: first-fit then leaves only a little padding at the rows' ends.
    draws = int(2 * n_rows * row_len / mean_len) + n_rows
    order = np.random.default_rng([seed, step]).integers(0, docs.count, size=draws)
    packed = pack(docs, order, n_rows, row_len).as_dict()
    out = {k: v.reshape(accum, batch_size, row_len) for k, v in packed.items()}
    if rows is not None:
        out = {k: v[:, rows[0] : rows[1]] for k, v in out.items()}
    return out


def loss_weights(mask_BT1: np.ndarray, segments_BT1: np.ndarray) -> np.ndarray:
    """`[B, T]` weights of the T predictions of packed rows: the target's mask, within a segment.

    Works on numpy and jax arrays alike (used inside the jitted loss).
    """
    same_segment = (segments_BT1[..., 1:] == segments_BT1[..., :-1]) & (segments_BT1[..., 1:] > 0)
    return (mask_BT1[..., 1:] > 0) & same_segment


def trained_fraction(docs: Documents, row_len: int) -> tuple[int, int]:
    """(tokens trained on, tokens in all) over the documents as they would be packed.

    Counts each document's mask on its predicted tokens (all but its first token), after the
    cut to `row_len`. Used to print how much of a batch SFT trains on, and to refuse a mask
    that is all ones or all zeros.
    """
    trained = total = 0
    for i in range(docs.count):
        _, doc_mask = docs.doc(i)
        doc_mask = doc_mask[:row_len]
        trained += int(np.count_nonzero(doc_mask[1:]))
        total += max(0, len(doc_mask) - 1)
    return trained, total
