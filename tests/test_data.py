"""Corpus → token files, and batches from them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.data import (
    check_fits,
    corpus_files,
    get_batch,
    invalid_utf8,
    load_tokens,
    prepare,
)
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
    """GPT-2 BPE: each .txt file is one document, preceded by <|endoftext|> (docs/data.md)."""
    texts = ["First Citizen:\nBefore we proceed any further, hear me speak.\n" * (i + 1)
             for i in range(3)]  # fmt: skip
    for i, text in enumerate(texts):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"{i}.txt").write_text(text)
    meta = prepare(tmp_path / "c", tmp_path / "d", tokenizer="gpt2", workers=1, progress=False)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257
    enc = get_tokenizer("gpt2")
    train = list(load_tokens(tmp_path / "d", "train"))
    val = list(load_tokens(tmp_path / "d", "val"))
    docs = [[50256, *enc.encode_ordinary(t)] for t in texts]
    # The first document always trains and the second always validates; the third is drawn.
    third_val = meta["val_documents"] == 2
    assert train == docs[0] + ([] if third_val else docs[2])
    assert val == docs[1] + (docs[2] if third_val else [])
    assert meta["train_tokens"] + meta["val_tokens"] == sum(map(len, docs))


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


# Plays whose pieces all go to train under the default split (the docs name them).
TRAIN_ONLY_PLAYS = {
    "coriolanus_gut.txt", "john_gut.txt", "pericles_gut.txt",
    "tragedy_of_titus_andronicus_gut.txt", "troilus_and_cressida_gut.txt", "twelfth_night_gut.txt",
}  # fmt: skip


def test_bundled_split_is_what_the_docs_say(tmp_path):
    """docs/data.md: 3,508,436 train / 388,796 val characters; 24 of the 30 plays in val."""
    meta = prepare("shakespeare", tmp_path / "s", progress=False)
    assert (meta["train_tokens"], meta["val_tokens"]) == (3_508_436, 388_796)
    assert meta["vocab_size"] == 83
    no_val = {f["name"] for f in meta["files"] if f["val_pieces"] == 0}
    assert no_val == TRAIN_ONLY_PLAYS
    assert sum(f["val_pieces"] for f in meta["files"]) == meta["val_pieces"]
    docs = (Path(__file__).resolve().parent.parent / "docs" / "data.md").read_text()
    assert "24 of the 30 plays" in docs and all(p in docs for p in TRAIN_ONLY_PLAYS)


def test_invalid_utf8_is_an_error_naming_file_and_offset(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    # Two invalid sequences; the first at byte 12 (after "good line\né" = 10 + 2 bytes).
    bad.write_bytes("good line\n\u00e9".encode() + b"\xff tail\n" + b"x\xc3(\n")
    with pytest.raises(InputError, match=r"bad.txt is not valid UTF-8: 2 .* byte offset 12"):
        prepare(bad, tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "meta.json").exists()
    meta = prepare(bad, tmp_path / "o", errors="replace", split_chunk=4, progress=False)
    assert "2 invalid UTF-8 byte sequence(s)" in capsys.readouterr().err
    assert meta["replaced_invalid_utf8"] == 2
    # What "replace" reads is exactly Python's own decoding with errors="replace".
    tok = CharTokenizer(meta["chars"])
    text = tok.decode(load_tokens(tmp_path / "o", "train")) + tok.decode(
        load_tokens(tmp_path / "o", "val")
    )
    assert sorted(text) == sorted(bad.read_bytes().decode("utf-8", errors="replace"))
    with pytest.raises(InputError, match="errors must be one of"):
        prepare(bad, tmp_path / "o", errors="ignore", progress=False)


@pytest.mark.parametrize("where", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 << 20])
def test_invalid_utf8_offsets_across_read_blocks(tmp_path, where):
    """Offsets are exact wherever a bad byte falls, also next to a character cut by a block end."""
    data = bytearray(("é" * (2 << 20)).encode())  # 2-byte characters straddle every block end
    data[where] = 0xFF
    path = tmp_path / "c.txt"
    path.write_bytes(bytes(data))
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError as err:
        first = err.start
    expected = bytes(data).decode("utf-8", errors="replace").count("\ufffd")
    assert invalid_utf8(path) == (expected, first)


def test_corpus_of_one_piece_is_refused_with_the_right_advice(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be.\n" * 20)  # 420 characters: one piece of 8192
    with pytest.raises(InputError, match=r"single split piece .* smaller split_chunk \(at most 42"):
        prepare(small, tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "meta.json").exists()
    meta = prepare(small, tmp_path / "o", split_chunk=42, progress=False)
    assert meta["val_tokens"] > 0
    with pytest.raises(InputError, match="smaller data.split_chunk"):
        check_fits(np.zeros(3, np.uint8), block_size=16, split="val")
    # One line cannot be split at all (pieces are whole lines): no split_chunk is suggested.
    (tmp_path / "line.txt").write_text("To be.\n")
    with pytest.raises(InputError, match="1 line.* it has one; use a larger corpus"):
        prepare(tmp_path / "line.txt", tmp_path / "o2", split_chunk=1, progress=False)


def _hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def test_interrupted_prepare_keeps_the_previous_data(tmp_path, tiny_corpus, monkeypatch):
    out = tmp_path / "data"
    prepare(tiny_corpus, out, split_chunk=1024, progress=False)
    before = _hashes(out)
    calls = []

    def interrupted(self, text, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # in the middle of writing the new token files
            raise KeyboardInterrupt
        return original(self, text)

    original = CharTokenizer.encode
    monkeypatch.setattr(CharTokenizer, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(tiny_corpus, out, split_chunk=512, progress=False)
    assert len(calls) == 5
    assert _hashes(out) == before  # the old files, and no temporary ones left behind
    monkeypatch.undo()
    meta = prepare(tiny_corpus, out, split_chunk=512, progress=False)
    assert meta["split_chunk"] == 512 and _hashes(out) != before


def test_token_files_that_disagree_with_meta_are_refused(tmp_path, tiny_corpus):
    out = tmp_path / "data"
    prepare(tiny_corpus, out, split_chunk=1024, progress=False)
    val = out / "val.bin"
    val.write_bytes(val.read_bytes()[:-10])
    with pytest.raises(InputError, match="inconsistent"):
        load_tokens(out, "val")


def test_prepare_into_a_file_or_below_one(tmp_path, tiny_corpus):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(InputError, match="cannot create the data directory"):
            prepare(tiny_corpus, out, progress=False)
