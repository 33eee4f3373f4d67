"""Packing documents into rows: layout, determinism, loss weights."""

from __future__ import annotations

import numpy as np
import pytest

from jaxgpt.errors import InputError
from jaxgpt.packing import Documents, get_packed_batch, loss_weights, pack, trained_fraction


def make_docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 50, size=sum(lengths)).astype(np.int32)
    mask = (rng.random(sum(lengths)) < 0.5).astype(np.uint8)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Documents(tokens, mask, offsets)


def test_pack_layout_worked_by_hand():
    docs = make_docs([3, 4, 6, 2])
    packed = pack(docs, np.array([0, 1, 2, 3, 0]), rows=2, row_len=8)
    # row 0: doc 0 (3) + doc 1 (4) = 7 of 8; doc 2 (6) does not fit → row 1: doc 2 + doc 3 = 8.
    assert packed.segments.tolist() == [[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 2, 2]]
    assert packed.positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1]]
    assert packed.tokens[0, :7].tolist() == docs.tokens[:7].tolist()
    assert packed.tokens[1].tolist() == docs.tokens[7:15].tolist()
    assert packed.mask[1].tolist() == docs.mask[7:15].tolist()
    assert packed.tokens[0, 7] == 0 and packed.mask[0, 7] == 0
    assert packed.truncated == 0


def test_pack_cuts_a_document_longer_than_a_row_and_counts_it():
    docs = make_docs([12, 2])
    packed = pack(docs, np.array([0, 1]), rows=2, row_len=8)
    assert packed.truncated == 1
    assert packed.tokens[0].tolist() == docs.tokens[:8].tolist()
    assert packed.segments[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


def test_loss_weights_stay_inside_segments():
    segments = np.array([[1, 1, 1, 2, 2, 0]])
    mask = np.array([[0, 1, 1, 0, 1, 0]])
    # prediction t → token t+1: (0→1) w=1, (1→2) w=1, (2→3) crosses 1→2: 0, (3→4) w=1, (4→5) pad
    assert loss_weights(mask, segments).astype(int).tolist() == [[1, 1, 0, 1, 0]]


def test_packed_batch_is_a_pure_function_of_seed_and_step():
    docs = make_docs(list(np.random.default_rng(1).integers(3, 20, size=200)))
    a = get_packed_batch(docs, 4, 31, seed=0, step=5, accum=2)
    b = get_packed_batch(docs, 4, 31, seed=0, step=5, accum=2)
    c = get_packed_batch(docs, 4, 31, seed=0, step=6, accum=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["tokens"], c["tokens"])
    assert a["tokens"].shape == (2, 4, 32) and a["tokens"].dtype == np.int32
    # First-fit leaves rows nearly full: padding only where no drawn document fitted.
    assert (a["segments"] > 0).mean() > 0.95
    half = get_packed_batch(docs, 4, 31, seed=0, step=5, accum=2, rows=(2, 4))
    assert all(np.array_equal(half[k], a[k][:, 2:4]) for k in a)


def test_trained_fraction_counts_predicted_tokens():
    offsets = np.array([0, 3, 5])
    docs = Documents(np.arange(5, dtype=np.int32), np.array([1, 0, 1, 1, 1], np.uint8), offsets)
    # doc 0 predicts tokens 1, 2 (mask 0, 1); doc 1 predicts token 4 (mask 1).
    assert trained_fraction(docs, row_len=16) == (2, 3)


def test_inconsistent_documents_are_refused():
    with pytest.raises(InputError, match="inconsistent"):
        Documents(np.zeros(4, np.int32), np.zeros(3, np.uint8), np.array([0, 4]))
    with pytest.raises(InputError, match="no documents"):
        Documents(np.zeros(0, np.int32), np.zeros(0, np.uint8), np.array([0]))
