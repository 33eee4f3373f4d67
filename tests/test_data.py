"""Corpus → token files, and batches from them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxgpt.data import check_fits, corpus_files, get_batch, load_tokens, prepare
from jaxgpt.errors import InputError
from jaxgpt.tokenizer import CharTokenizer, get_tokenizer


def test_bundled_corpus():
    files = corpus_files("shakespeare")
    assert len(files) == 30 and all(f.suffix == ".txt" for f in files)
    assert all(f.name != "COPYING.txt" for f in files)
    assert 3_000_000 < sum(f.stat().st_size for f in files) < 4_200_000


def test_prepare_char_round_trip(tmp_path, tiny_corpus):
    meta = prepare(tiny_corpus, tmp_path / "a", split_chunk=1024, progress=False)
    text = tiny_corpus.read_text(encoding="utf-8")
    tok = CharTokenizer(meta["chars"])
    assert meta["dtype"] == "uint8" and tok.chars == sorted(set(text))
    train = tok.decode(load_tokens(tmp_path / "a", "train"))
    val = tok.decode(load_tokens(tmp_path / "a", "val"))
    # Every character lands in exactly one split; the pieces are whole lines of the corpus.
    assert len(train) + len(val) == len(text) + (0 if text.endswith("\n") else 1)
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert 0 < len(val) < len(train)
    for line in val.splitlines()[1:-1]:
        assert line + "\n" in text
    saved = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert saved["files"][0]["sha256"] and saved["split_seed"] == 0


def test_split_is_deterministic_and_seeded(tmp_path, tiny_corpus):
    def files(name, seed):
        prepare(tiny_corpus, tmp_path / name, split_chunk=512, split_seed=seed, progress=False)
        return [(tmp_path / name / f"{s}.bin").read_bytes() for s in ("train", "val")]

    assert files("a", 0) == files("b", 0)
    assert files("a", 0) != files("c", 1)


def test_prepare_gpt2_matches_tiktoken(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    (tmp_path / "c.txt").write_text(text)
    # Two pieces: the first always goes to train, the second to val.
    meta = prepare(tmp_path / "c.txt", tmp_path / "d", tokenizer="gpt2", split_chunk=len(text) // 2,
                   progress=False)  # fmt: skip
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257
    enc = get_tokenizer("gpt2")
    train = load_tokens(tmp_path / "d", "train")
    val = load_tokens(tmp_path / "d", "val")
    assert enc.decode(list(train)) + enc.decode(list(val)) == text
    first = enc.decode(list(train))
    assert first.endswith("\n") and text.startswith(first)  # pieces end at line ends
    assert list(train) == enc.encode_ordinary(first)


def test_bad_corpora(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        prepare(tmp_path / "missing.txt", tmp_path / "o", progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="is empty"):
        prepare(tmp_path / "empty.txt", tmp_path / "o", progress=False)
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="no .txt files"):
        prepare(tmp_path / "d", tmp_path / "o", progress=False)
    with pytest.raises(InputError, match="val_fraction"):
        prepare(tmp_path / "empty.txt", tmp_path / "o", val_fraction=1.5, progress=False)


def test_corpus_smaller_than_a_block():
    with pytest.raises(InputError, match="fewer than one block"):
        check_fits(np.zeros(10, np.uint8), block_size=16, split="train")
    check_fits(np.zeros(17, np.uint8), block_size=16, split="train")


def test_get_batch_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    batch = get_batch(tokens, 4, 8, seed=3, step=7, accum=2)
    assert batch.shape == (2, 4, 9) and batch.dtype == np.int32
    # Contiguous windows: inputs [..., :-1] and targets [..., 1:] are shifted by one token.
    assert np.all(np.diff(batch, axis=-1) == 1)
    np.testing.assert_array_equal(batch, get_batch(tokens, 4, 8, seed=3, step=7, accum=2))
    assert not np.array_equal(batch, get_batch(tokens, 4, 8, seed=3, step=8, accum=2))
    assert not np.array_equal(batch, get_batch(tokens, 4, 8, seed=4, step=7, accum=2))
    # The last window may end exactly at the last token.
    starts = get_batch(np.arange(9, dtype=np.uint16), 16, 8, seed=0, step=0)[0, :, 0]
    assert set(starts) == {0}
