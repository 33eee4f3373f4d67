"""Token data: a corpus → token files + `meta.json`, and random batches from them.

For GPT-2 BPE, `prepare` reads documents (.txt files, .jsonl / .jsonl.gz lines, .parquet rows),
tokenises them in parallel and writes llm.c-format shards, split by document (`jaxgpt.sharded`);
a directory of llm.c / modded-nanogpt shards is read as prepared data as it is. For the character
tokenizer (the bundled Shakespeare), `prepare` writes `train.bin` / `val.bin` as follows.

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

import codecs
import hashlib
import itertools
import json
import os
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxgpt import shards
from jaxgpt.errors import InputError
from jaxgpt.tokenizer import CharTokenizer, Tokenizer, get_tokenizer

META_VERSION = 1
ENCODING_ERRORS = ("strict", "replace")  # how a corpus that is not valid UTF-8 is read
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


def invalid_utf8(path: Path) -> tuple[int, int | None]:
    """(number of invalid UTF-8 sequences in the file, byte offset of the first, or None).

    Streams the file; each invalid sequence is what `errors="replace"` turns into one U+FFFD.
    """
    count, first = 0, None
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = 0  # file offset of the next byte given to the decoder
    with path.open("rb") as handle:
        blocks = iter(lambda: handle.read(1 << 20), b"")
        for data, final in itertools.chain(((b, False) for b in blocks), [(b"", True)]):
            while True:
                pending = len(decoder.getstate()[0])  # bytes of a sequence cut by the last block
                try:
                    decoder.decode(data, final=final)
                    fed += len(data)
                    break
                except UnicodeDecodeError as err:  # err.object is the pending bytes + data
                    count += 1
                    first = fed - pending + err.start if first is None else first
                    fed = fed - pending + err.end
                    data = err.object[err.end :]
                    decoder.reset()
    return count, first


def check_utf8(files: list[Path], errors: str) -> int:
    """Refuse a corpus that is not valid UTF-8 (errors="strict"), or count what "replace" changes.

    Returns the number of invalid byte sequences that reading with `errors` replaces by U+FFFD.
    """
    if errors not in ENCODING_ERRORS:
        raise InputError(f"errors must be one of {ENCODING_ERRORS}, got {errors!r}")
    total = 0
    for path in files:
        try:
            count, first = invalid_utf8(path)
        except OSError as err:
            raise InputError(f"cannot read corpus file {path}: {err}") from err
        if count and errors == "strict":
            raise InputError(
                f"corpus file {path} is not valid UTF-8: {count} invalid byte sequence(s), the "
                f"first at byte offset {first}; convert it to UTF-8, or pass --errors replace "
                f"(data.errors=replace) to replace them with U+FFFD"
            )
        total += count
    return total


def _read_pieces(
    files: list[Path], chunk: int, bar: tqdm | None, errors: str = "strict"
) -> Iterator[tuple[int, str]]:
    """The corpus as consecutive (file index, piece) pairs: pieces of whole lines of one file,
    about `chunk` characters each.

    Pieces end at line ends (so BPE never sees a word cut in two) and every file ends with a
    newline, so documents never run into each other. `errors` is the decoding error handler
    ("strict" or "replace"; `check_utf8` has told the user what "replace" changes).
    """
    for index, path in enumerate(files):
        try:
            handle = path.open(encoding="utf-8", errors=errors, newline="")
        except OSError as err:
            raise InputError(f"cannot read corpus file {path}: {err}") from err
        with handle:
            lines: list[str] = []
            size = 0
            for line in handle:
                lines.append(line)
                size += len(line)
                if size >= chunk:
                    yield index, _flush(lines, bar)
                    lines, size = [], 0
            if lines:
                yield index, _flush(lines, bar, end_of_file=True)


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
    errors: str = "strict",
    progress: bool = True,
    field: str = "text",
    missing: str = "error",
    workers: int | None = None,
    shard_tokens: int = 100_000_000,
    chunk_bytes: int = 1 << 22,
) -> dict[str, Any]:
    """Tokenise a corpus into `out_dir` and return its meta (also written to `meta.json`).

    tokenizer="gpt2": the documents of `source` (one per .txt file, .jsonl line or .parquet row;
    `field` names the text, `missing` says what a line without it does) become shards
    `train_000000.bin` ... `val_000000.bin` of `shard_tokens` tokens, each document preceded by
    <|endoftext|>, split by document, in `workers` processes (default: all cores) that each
    tokenise chunks of about `chunk_bytes` of input; see
    `jaxgpt.sharded.prepare_shards`. `split_chunk` is not used.

    tokenizer="char": the .txt corpus becomes `train.bin` / `val.bin`, split by pieces of
    `split_chunk` characters. Memory stays bounded by one piece (plus the set of distinct
    characters, found in a first streaming pass).

    A corpus that is not valid UTF-8 is an error naming the file and byte offset, unless
    `errors="replace"`: then invalid bytes become U+FFFD and a warning gives their count.

    The files are written under temporary names and renamed into place only when all are
    complete, `meta.json` last (the old one is removed first): an interrupted or failed prepare
    leaves the previous prepared data as it was, and a directory with a `meta.json` is never
    half-written.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if tokenizer not in ("char", "gpt2"):
        raise InputError(f"tokenizer must be 'char' or 'gpt2', got {tokenizer!r}")
    for name, value, least in (("split_chunk", split_chunk, 1), ("split_seed", split_seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise InputError(f"{name} must be an integer >= {least}, got {value!r}")
    if errors not in ENCODING_ERRORS:
        raise InputError(f"errors must be one of {ENCODING_ERRORS}, got {errors!r}")
    if tokenizer == "gpt2":
        from jaxgpt import documents, sharded

        files = corpus_files(source) if str(source) == BUNDLED else documents.document_files(source)
        out = _data_directory(out_dir)
        with sharded.exclusive(out):
            return sharded.prepare_shards(
                source, out, files=files, field=field, missing=missing, errors=errors,
                val_fraction=val_fraction, split_seed=split_seed, workers=workers,
                shard_tokens=shard_tokens, chunk_bytes=chunk_bytes, progress=progress,
            )  # fmt: skip
    from jaxgpt.documents import file_format

    if file_format(source) not in (None, ".txt"):
        raise InputError(
            f"{source} is a {file_format(source)} corpus of documents: prepare it with --tokenizer "
            f"gpt2 (data.tokenizer='gpt2'); the char tokenizer reads .txt files"
        )
    files = corpus_files(source)
    replaced = check_utf8(files, errors)
    if replaced:
        print(
            f"warning: {replaced} invalid UTF-8 byte sequence(s) in {str(source)!r} replaced "
            f"by U+FFFD (errors='replace')",
            file=sys.stderr,
        )
    total_bytes = sum(f.stat().st_size for f in files)
    out = _data_directory(out_dir)

    def bar(desc: str) -> tqdm:
        return tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=not progress,
            leave=False,
        )  # fmt: skip

    if tokenizer == "char":
        chars: set[str] = set()
        with bar("scanning characters") as b:
            for _, piece in _read_pieces(files, split_chunk, b, errors):
                chars.update(piece)
        if not chars - {"\n"}:
            raise InputError(f"corpus {str(source)!r} is empty")
        tok: Tokenizer = CharTokenizer(chars)
        encode = tok.encode
    else:
        tok = get_tokenizer("gpt2")
        encode = lambda text: tok.encode_ordinary(text)
    dtype = token_dtype(tok.n_vocab)

    names = ("train.bin", "val.bin", "meta.json")
    tmp = {name: out / f".{name}.tmp-{os.getpid()}" for name in names}
    try:
        counts, pieces, val_pieces_per_file = _write_splits(
            files, encode, dtype, tmp, split_chunk, split_seed, val_fraction, errors, bar
        )
        if pieces["val"] == 0:
            raise InputError(_single_piece_advice(source, files, split_chunk, errors))
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
            "files": [
                {"name": f.name, "bytes": f.stat().st_size, "sha256": _sha256(f), "val_pieces": n}
                for f, n in zip(files, val_pieces_per_file)
            ],
            "val_fraction": val_fraction,
            "split_seed": split_seed,
            "split_chunk": split_chunk,
            "replaced_invalid_utf8": replaced,
        }
        tmp["meta.json"].write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        # Commit: without meta.json the directory is "not prepared"; it comes back last.
        (out / "meta.json").unlink(missing_ok=True)
        for name in names:
            tmp[name].replace(out / name)
    except OSError as err:
        raise InputError(f"cannot write the prepared data to {out}: {err}") from err
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return meta


def _data_directory(out_dir: str | Path) -> Path:
    """`out_dir`, created if needed (an InputError when it cannot be)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the data directory {out}: {err}") from err
    if not out.is_dir():
        raise InputError(f"cannot create the data directory {out}: it is a file")
    return out


def _single_piece_advice(source: Any, files: list[Path], split_chunk: int, errors: str) -> str:
    """Why a corpus gave no validation piece, and what would help (pieces are whole lines)."""
    n_chars = n_lines = 0
    for _, line in _read_pieces(files, 1, None, errors):  # chunk 1: one piece per line
        n_chars += len(line)
        n_lines += 1
    where = f"corpus {str(source)!r} ({n_chars:,} characters, {n_lines:,} line(s))"
    if n_lines < 2:
        return (
            f"{where} cannot be split into train and val: pieces are whole lines, and it has "
            f"one; use a larger corpus"
        )
    return (
        f"{where} is a single split piece of split_chunk={split_chunk} characters, so the "
        f"validation split would be empty; use a smaller split_chunk (at most "
        f"{max(1, n_chars // 10)}: --split-chunk / data.split_chunk) or a larger corpus"
    )


def _write_splits(
    files: list[Path],
    encode: Any,
    dtype: np.dtype,
    tmp: dict[str, Path],
    split_chunk: int,
    split_seed: int,
    val_fraction: float,
    errors: str,
    bar: Any,
) -> tuple[dict[str, int], dict[str, int], list[int]]:
    """Tokenise the pieces into the temporary train/val files.

    Returns (tokens per split, pieces per split, val pieces per file).
    """
    rng = np.random.default_rng(split_seed)
    counts = {"train": 0, "val": 0}
    pieces = {"train": 0, "val": 0}
    val_per_file = [0] * len(files)
    with (
        tmp["train.bin"].open("wb") as f_train,
        tmp["val.bin"].open("wb") as f_val,
        bar("tokenizing") as b,
    ):
        handles = {"train": f_train, "val": f_val}
        for i, (file_index, piece) in enumerate(_read_pieces(files, split_chunk, b, errors)):
            ids = encode(piece)
            # The first piece always trains, the second always validates: neither split is empty.
            split = "train" if i == 0 else "val" if i == 1 else None
            draw = rng.random()  # drawn for every piece, so the split depends only on the seed
            split = split or ("val" if draw < val_fraction else "train")
            np.asarray(ids, dtype=dtype).tofile(handles[split])
            counts[split] += len(ids)
            pieces[split] += 1
            val_per_file[file_index] += split == "val"
    return counts, pieces, val_per_file


SETTINGS = ("version", "tokenizer", "source", "val_fraction", "split_seed", "split_chunk")


def wanted_settings(
    tokenizer: str, source: str, val_fraction: float, split_seed: int, split_chunk: int
) -> dict[str, Any]:
    """The meta.json fields that decide the token files' contents, as data prepared with these
    arguments has them (`is_prepared` compares them to decide whether to prepare again)."""
    from jaxgpt.sharded import SHARDS_VERSION

    version, chunk = (SHARDS_VERSION, None) if tokenizer == "gpt2" else (META_VERSION, split_chunk)
    values = (version, tokenizer, source, val_fraction, split_seed, chunk)
    return dict(zip(SETTINGS, values))


def is_prepared(data_dir: Path, want: dict[str, Any]) -> bool:
    """Whether `data_dir` holds data prepared with the settings `want` (entries of its
    meta.json); if it holds other data, says on stderr that it will be prepared again."""
    if not (data_dir / "meta.json").is_file():
        return False
    try:
        meta = load_meta(data_dir)
    except InputError:  # unreadable: prepared again like any other stale directory
        meta = {}
    if {k: meta.get(k) for k in want} == want:
        return True
    print(
        f"re-preparing {data_dir}: its settings or source files differ from the experiment's",
        file=sys.stderr,
    )
    return False


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """The meta of a prepared data directory; for a directory of llm.c / modded-nanogpt shards
    (`*train*.bin`, `*val*.bin`, no meta.json), the meta that describes them."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        found = shards.llmc_split_shards(data_dir) if Path(data_dir).is_dir() else {}
        if any(found.values()):
            return _llmc_meta(Path(data_dir), found)
        raise InputError(
            f"{data_dir} has no prepared data (no meta.json, no llm.c token shards); "
            f"run `jaxgpt prepare SOURCE {data_dir}`"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{data_dir} is not a prepared data directory ({path}: {err})") from err


def _llmc_meta(data_dir: Path, found: dict[str, list[Path]]) -> dict[str, Any]:
    for split, paths in found.items():
        if not paths:
            raise InputError(
                f"{data_dir} holds llm.c token shards but none for the {split} split (a .bin file "
                f"whose name contains {split!r}, e.g. fineweb_{split}_000000.bin)"
            )
    lists = {
        split: [{"name": p.name, "tokens": len(shards.read_shard(p))} for p in paths]
        for split, paths in found.items()
    }
    return {
        "version": 2, "format": "shards", "tokenizer": "gpt2", "vocab_size": 50257,
        "dtype": "uint16", "source": "llm.c shards", "shards": lists,
        **{f"{s}_tokens": sum(x["tokens"] for x in lists[s]) for s in lists},
    }  # fmt: skip


def tokenizer_from_meta(meta: dict[str, Any]) -> Tokenizer:
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["chars"])
    return get_tokenizer(meta["tokenizer"])


def load_tokens(data_dir: str | Path, split: str) -> np.ndarray | shards.TokenStream:
    """The tokens of a split, memory-mapped read-only: one array, or the split's shards read as
    one stream (`jaxgpt.shards.TokenStream`)."""
    meta = load_meta(data_dir)
    if meta.get("format") == "shards":
        listed = meta["shards"].get(split) or []
        if not listed:
            raise InputError(f"{data_dir} has no {split} shards; run `jaxgpt prepare` again")
        tokens = shards.token_stream([Path(data_dir) / s["name"] for s in listed])
        if len(tokens) != meta[f"{split}_tokens"]:
            raise InputError(
                f"{data_dir}: the {split} shards hold {len(tokens):,} tokens but meta.json says "
                f"{meta[f'{split}_tokens']:,}: the prepared data is inconsistent; run "
                f"`jaxgpt prepare` again"
            )
        return tokens
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise InputError(f"{path} is missing; run `jaxgpt prepare` again")
    dtype = np.dtype(meta["dtype"])
    expected = meta.get(f"{split}_tokens")
    if expected is not None and path.stat().st_size != expected * dtype.itemsize:
        raise InputError(
            f"{path} holds {path.stat().st_size // dtype.itemsize:,} tokens but meta.json says "
            f"{expected:,}: the prepared data is inconsistent; run `jaxgpt prepare` again"
        )
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# --------------------------------------------------------------------------- batches


def check_fits(tokens: np.ndarray, block_size: int, split: str) -> None:
    if len(tokens) < block_size + 1:
        raise InputError(
            f"the {split} split has {len(tokens)} tokens, fewer than one block of "
            f"block_size + 1 = {block_size + 1}; use a larger corpus, a smaller model.block_size"
            + (
                # val is made of whole pieces of split_chunk characters: smaller pieces give a
                # corpus more of them; a larger val_fraction helps only if there are several.
                ", a smaller data.split_chunk or a larger data.val_fraction"
                if split == "val"
                else ""
            )
        )


def document_starts(tokens: np.ndarray, eot: int, block_size: int, split: str) -> np.ndarray:
    """The positions of `eot` in `tokens` (where each document begins, its marker prepended)
    at which a whole window of `block_size + 1` tokens fits; int64, ascending."""
    found, block = [], 1 << 24
    for offset in range(0, len(tokens), block):  # streamed: the split may be many shards
        found.append(np.flatnonzero(tokens[offset : offset + block] == eot) + offset)
    starts = np.concatenate(found) if found else np.zeros(0, np.int64)
    starts = starts[starts <= len(tokens) - block_size - 1]
    if not len(starts):
        raise InputError(
            f"the {split} split has no document start (<|endoftext|>, {eot}) with a whole window "
            f"of block_size + 1 = {block_size + 1} tokens after it, so data.align_documents "
            f"cannot be used; prepare the data with `jaxgpt prepare --tokenizer gpt2`"
        )
    return starts


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    seed: int,
    step: int,
    *,
    accum: int = 1,
    rows: tuple[int, int] | None = None,
    starts: np.ndarray | None = None,
) -> np.ndarray:
    """`[accum, batch_size, block_size + 1]` int32 windows drawn uniformly from `tokens`.

    The draw is a pure function of (seed, step): inputs are `[..., :-1]`, targets `[..., 1:]`.
    With `starts` (`document_starts`), windows begin only at those positions, drawn uniformly.
    With `rows=(start, stop)` only those rows of each micro-batch are read (a host's share of the
    global batch in a multi-process run): the result is `[accum, stop - start, block_size + 1]`,
    equal to the same slice of the whole batch.
    """
    rng = np.random.default_rng([seed, step])
    if starts is None:
        starts_AB = rng.integers(0, len(tokens) - block_size, size=(accum, batch_size))
    else:
        starts_AB = starts[rng.integers(0, len(starts), size=(accum, batch_size))]
    if rows is not None:
        starts_AB = starts_AB[:, rows[0] : rows[1]]
    windows = np.stack([tokens[s : s + block_size + 1] for s in starts_AB.reshape(-1)])
    return windows.astype(np.int32).reshape(*starts_AB.shape, block_size + 1)
