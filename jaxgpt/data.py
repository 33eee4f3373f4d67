"""Token data: a text corpus → `train.bin` / `val.bin` + `meta.json`, and random batches from them.

`prepare` streams the corpus (one or more .txt files) in pieces of `split_chunk` characters, never
holding more than one piece and its tokens in memory. Each piece goes to train or val by a seeded
draw (`split_seed`, `val_fraction`), so the split is deterministic, spread over the whole corpus,
and set by the user. Tokens are stored as uint8 when the vocabulary fits (character level) and
uint16 otherwise (GPT-2 BPE, 50257 ids).

`get_batch` samples `[B, T+1]` windows from the memory-mapped token file. Its randomness is a pure
function of (seed, step): the loader's whole state is those two integers, stored in every
checkpoint, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxgpt.errors import InputError
from jaxgpt.tokenizer import CharTokenizer, Tokenizer, get_tokenizer

META_VERSION = 1
BUNDLED = "shakespeare"
PREPARED = "prepared"  # data.source meaning "use the prepared token files as they are"


# --------------------------------------------------------------------------- corpus files


def bundled_corpus_dir() -> Path:
    """The Shakespeare plays shipped inside the package (see docs/data.md for provenance)."""
    return Path(str(resources.files("jaxgpt") / "assets" / "shakespeare"))


def corpus_files(source: str | Path) -> list[Path]:
    """The .txt files of a corpus: "shakespeare" (bundled), one file, or a directory (sorted)."""
    if str(source) == BUNDLED:
        return sorted(p for p in bundled_corpus_dir().glob("*.txt") if p.name != "COPYING.txt")
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise InputError(f"corpus directory {path} contains no .txt files")
    else:
        raise InputError(
            f"corpus {str(source)!r} does not exist; pass {BUNDLED!r}, a .txt file or a directory"
        )
    if sum(f.stat().st_size for f in files) == 0:
        raise InputError(f"corpus {str(source)!r} is empty")
    return files


def _read_pieces(files: list[Path], chunk: int, bar: tqdm | None) -> Iterator[str]:
    """The corpus as consecutive pieces of whole lines, about `chunk` characters each.

    Pieces end at line ends (so BPE never sees a word cut in two) and every file ends with a
    newline, so documents never run into each other.
    """
    for path in files:
        try:
            handle = path.open(encoding="utf-8", errors="replace", newline="")
        except OSError as err:
            raise InputError(f"cannot read corpus file {path}: {err}") from err
        with handle:
            lines: list[str] = []
            size = 0
            for line in handle:
                lines.append(line)
                size += len(line)
                if size >= chunk:
                    yield _flush(lines, bar)
                    lines, size = [], 0
            if lines:
                yield _flush(lines, bar, end_of_file=True)


def _flush(lines: list[str], bar: tqdm | None, end_of_file: bool = False) -> str:
    piece = "".join(lines)
    if bar is not None:
        bar.update(len(piece.encode("utf-8")))
    if end_of_file and not piece.endswith("\n"):
        piece += "\n"
    return piece


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint8 when every id fits in a byte (character vocabularies), else uint16 (GPT-2's 50257)."""
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    if vocab_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


# --------------------------------------------------------------------------- prepare


def prepare(
    source: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str = "char",
    val_fraction: float = 0.1,
    split_seed: int = 0,
    split_chunk: int = 8192,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenise a corpus into `out_dir/train.bin`, `val.bin` and `meta.json`; return the meta.

    Memory stays bounded by one piece of `split_chunk` characters (plus, for "char", the set of
    distinct characters, found in a first streaming pass).
    """
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    files = corpus_files(source)
    total_bytes = sum(f.stat().st_size for f in files)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the data directory {out}: {err}") from err

    def bar(desc: str) -> tqdm:
        return tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=not progress,
            leave=False,
        )  # fmt: skip

    if tokenizer == "char":
        chars: set[str] = set()
        with bar("scanning characters") as b:
            for piece in _read_pieces(files, split_chunk, b):
                chars.update(piece)
        if not chars - {"\n"}:
            raise InputError(f"corpus {str(source)!r} is empty")
        tok: Tokenizer = CharTokenizer(chars)
        encode = tok.encode
    elif tokenizer == "gpt2":
        tok = get_tokenizer("gpt2")
        encode = lambda text: tok.encode_ordinary(text)
    else:
        raise InputError(f"tokenizer must be 'char' or 'gpt2', got {tokenizer!r}")
    dtype = token_dtype(tok.n_vocab)

    rng = np.random.default_rng(split_seed)
    counts = {"train": 0, "val": 0}
    pieces = {"train": 0, "val": 0}
    tmp = {split: out / f"{split}.bin.tmp" for split in counts}
    with (
        tmp["train"].open("wb") as f_train,
        tmp["val"].open("wb") as f_val,
        bar("tokenizing") as b,
    ):
        handles = {"train": f_train, "val": f_val}
        for i, piece in enumerate(_read_pieces(files, split_chunk, b)):
            ids = encode(piece)
            # The first piece always trains, the second always validates: neither split is empty.
            split = "train" if i == 0 else "val" if i == 1 else None
            draw = rng.random()  # drawn for every piece, so the split depends only on the seed
            split = split or ("val" if draw < val_fraction else "train")
            np.asarray(ids, dtype=dtype).tofile(handles[split])
            counts[split] += len(ids)
            pieces[split] += 1
    for split in counts:
        tmp[split].replace(out / f"{split}.bin")

    meta = {
        "version": META_VERSION,
        "tokenizer": tokenizer,
        "vocab_size": tok.n_vocab,
        "chars": "".join(tok.chars) if tokenizer == "char" else None,
        "dtype": dtype.name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "train_pieces": pieces["train"],
        "val_pieces": pieces["val"],
        "source": str(source),
        "files": [{"name": f.name, "bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files],
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "split_chunk": split_chunk,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    return meta


def split_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The meta fields that decide the token files' contents (to tell whether to re-prepare)."""
    keys = ("version", "tokenizer", "source", "val_fraction", "split_seed", "split_chunk")
    return {k: meta.get(k) for k in keys}


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise InputError(
            f"{data_dir} has no prepared data (no meta.json); "
            f"run `jaxgpt prepare SOURCE {data_dir}`"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{data_dir} is not a prepared data directory ({path}: {err})") from err


def tokenizer_from_meta(meta: dict[str, Any]) -> Tokenizer:
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["chars"])
    return get_tokenizer(meta["tokenizer"])


def load_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """The token file of a split, memory-mapped read-only."""
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise InputError(f"{path} is missing; run `jaxgpt prepare` again")
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# --------------------------------------------------------------------------- batches


def check_fits(tokens: np.ndarray, block_size: int, split: str) -> None:
    if len(tokens) < block_size + 1:
        raise InputError(
            f"the {split} split has {len(tokens)} tokens, fewer than one block of "
            f"block_size + 1 = {block_size + 1}; use a larger corpus, a smaller model.block_size"
            + (", or a larger data.val_fraction" if split == "val" else "")
        )


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    seed: int,
    step: int,
    *,
    accum: int = 1,
    rows: tuple[int, int] | None = None,
) -> np.ndarray:
    """`[accum, batch_size, block_size + 1]` int32 windows drawn uniformly from `tokens`.

    The draw is a pure function of (seed, step): inputs are `[..., :-1]`, targets `[..., 1:]`.
    With `rows=(start, stop)` only those rows of each micro-batch are read (a host's share of the
    global batch in a multi-process run): the result is `[accum, stop - start, block_size + 1]`,
    equal to the same slice of the whole batch.
    """
    rng = np.random.default_rng([seed, step])
    starts_AB = rng.integers(0, len(tokens) - block_size, size=(accum, batch_size))
    if rows is not None:
        starts_AB = starts_AB[:, rows[0] : rows[1]]
    windows = np.stack([tokens[s : s + block_size + 1] for s in starts_AB.reshape(-1)])
    return windows.astype(np.int32).reshape(*starts_AB.shape, block_size + 1)
