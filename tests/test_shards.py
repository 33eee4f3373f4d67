"""llm.c / modded-nanogpt token shards: the format, written independently here, read back."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jaxgpt.errors import InputError
from jaxgpt.shards import read_shard, write_shard


def llmc_shard(path, tokens, magic=20240520, version=1, n=None):
    """A shard laid out by hand: 256 little-endian int32 (magic, version, count), uint16 body."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if n is None else n
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def test_read_what_llmc_writes(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=1000)
    read = read_shard(llmc_shard(tmp_path / "a.bin", tokens))
    assert read.dtype == np.uint16 and read.shape == (1000,)
    np.testing.assert_array_equal(read, tokens)
    assert (tmp_path / "a.bin").stat().st_size == 1024 + 2 * 1000


def test_write_then_read_round_trip(tmp_path):
    tokens = np.array([50256, 0, 65535, 464, 50256], np.int64)
    write_shard(tmp_path / "b.bin", tokens)
    np.testing.assert_array_equal(read_shard(tmp_path / "b.bin"), tokens)
    assert (tmp_path / "b.bin").read_bytes() == llmc_shard(tmp_path / "c.bin", tokens).read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    write_shard(tmp_path / "empty.bin", np.zeros(0, np.uint16))
    assert read_shard(tmp_path / "empty.bin").shape == (0,)
    with pytest.raises(InputError, match="65535"):
        write_shard(tmp_path / "d.bin", np.array([70000]))


def test_bad_shards(tmp_path):
    tokens = np.arange(100)
    cases = [
        (llmc_shard(tmp_path / "magic.bin", tokens, magic=20240801), "magic 20240801, expected"),
        (llmc_shard(tmp_path / "version.bin", tokens, version=7), "version 7 is not supported"),
        (llmc_shard(tmp_path / "short.bin", tokens, n=101), "truncated body: the header says 101"),
        (llmc_shard(tmp_path / "long.bin", tokens, n=99), "unexpected bytes after the body"),
    ]
    (tmp_path / "head.bin").write_bytes((tmp_path / "magic.bin").read_bytes()[:10])
    cases.append((tmp_path / "head.bin", "not an llm.c GPT-2 token shard"))
    llmc_shard(tmp_path / "cut.bin", tokens)
    (tmp_path / "cut.bin").write_bytes((tmp_path / "cut.bin").read_bytes()[:600])
    cases.append((tmp_path / "cut.bin", "truncated header (600 bytes"))
    (tmp_path / "empty.bin").write_bytes(b"")
    cases.append((tmp_path / "empty.bin", "an empty file"))
    cases.append((tmp_path / "missing.bin", "cannot read token shard"))
    for path, message in cases:
        with pytest.raises(InputError, match=re.escape(message)) as err:
            read_shard(path)
        assert str(path) in str(err.value)
