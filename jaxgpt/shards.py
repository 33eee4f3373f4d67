"""Token shards in the format of llm.c and modded-nanogpt (`fineweb_train_000001.bin` ...).

One shard is a header and a body, both little-endian:

    header  256 × int32   [0] magic 20240520, [1] version 1, [2] number of tokens N, rest 0
    body    N × uint16    GPT-2 token ids (documents separated by <|endoftext|>, 50256)

(llm.c's Llama-3 shards use another magic, 20240801, and uint32 tokens; they are refused here.)
`read_shard` memory-maps the body after checking the header against the file's size, so a shard
cut short by an interrupted download is an error, never a silently shorter stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxgpt import atomic
from jaxgpt.errors import InputError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of one shard: a read-only uint16 array of length N, memory-mapped."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            raw = handle.read(HEADER_BYTES)
    except OSError as err:
        raise InputError(f"cannot read token shard {path}: {err}") from err
    header = np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<i4")
    if not len(header) or header[0] != MAGIC:
        found = f"magic {int(header[0])}" if len(header) else "an empty file"
        raise InputError(
            f"{path} is not an llm.c GPT-2 token shard: {found}, expected magic {MAGIC}"
        )
    if size < HEADER_BYTES:
        raise InputError(f"{path}: truncated header ({size} bytes, expected {HEADER_BYTES})")
    if header[1] != VERSION:
        raise InputError(
            f"{path}: token shard version {int(header[1])} is not supported (expected {VERSION}: "
            "uint16 GPT-2 tokens)"
        )
    n_tokens = int(header[2])
    expected = HEADER_BYTES + n_tokens * TOKEN_DTYPE.itemsize
    if n_tokens < 0 or size != expected:
        body = size - HEADER_BYTES
        what = "truncated body" if size < expected else "unexpected bytes after the body"
        raise InputError(
            f"{path}: {what}: the header says {n_tokens:,} tokens ({expected - HEADER_BYTES:,} "
            f"bytes), the file holds {body:,} bytes after the header"
        )
    if n_tokens == 0:  # numpy cannot map zero bytes
        return np.zeros(0, TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def shard_header(n_tokens: int) -> np.ndarray:
    """The 256 int32 header of a shard of `n_tokens` tokens."""
    values = np.zeros(HEADER_INTS, dtype="<i4")
    values[:3] = MAGIC, VERSION, n_tokens
    return values


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write `tokens` (ids < 65536) as one shard; the file appears complete or not at all."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or (tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16)):
        raise InputError("a token shard holds a 1-D array of token ids in [0, 65535]")
    if len(tokens) >= 1 << 31:
        raise InputError(f"a token shard holds fewer than 2**31 tokens, got {len(tokens):,}")
    with atomic.staged_file(path, "wb") as handle:
        handle.write(shard_header(len(tokens)).tobytes())
        handle.write(tokens.astype(TOKEN_DTYPE).tobytes())


class TokenStream:
    """Several token arrays (the shards of a split) read as one stream, without copying them.

    Supports what the loaders use: `len`, slices `[i:j]` (a copy when they cross a shard border)
    and `np.asarray` (the whole stream, copied).
    """

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a TokenStream is read by contiguous slices [i:j]")
        start, stop, _ = key.indices(len(self))
        pieces = []
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            offset = start - (self.ends[shard] - len(self.parts[shard]))
            take = min(stop - start, len(self.parts[shard]) - offset)
            pieces.append(self.parts[shard][offset : offset + take])
            start, shard = start + take, shard + 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.parts)
        return whole if dtype is None else whole.astype(dtype)


def token_stream(paths: list[Path]) -> np.ndarray | TokenStream:
    """The shards at `paths`, in order, as one stream (the array itself for a single shard)."""
    parts = [read_shard(p) for p in paths]
    return parts[0] if len(parts) == 1 else TokenStream(parts)


def llmc_split_shards(directory: Path) -> dict[str, list[Path]]:
    """The shards of a directory of llm.c / modded-nanogpt shards, by split: the `*.bin` files
    whose name contains "train" or "val" (`fineweb_train_000001.bin` ...), in sorted order."""
    found: dict[str, list[Path]] = {"train": [], "val": []}
    for path in sorted(Path(directory).glob("*.bin")):
        for split in found:
            if split in path.stem.lower():
                found[split].append(path)
    return found
