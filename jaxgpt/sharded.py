"""A document corpus → GPT-2 token shards, in parallel, in bounded memory, resumable.

    corpus files ──read_chunks──▶ chunks ──N worker processes──▶ tokens per chunk, in order
        ──split by document──▶ train / val ──ShardWriter──▶ train_000000.bin ... val_000000.bin

Every document is preceded by <|endoftext|> (50256; docs/data.md says why "prepend"). Each
document goes to train or val by a draw that depends only on (split_seed, chunk index, position in
the chunk), and chunks depend only on the corpus, so the output is byte-for-byte the same for any
number of workers. At most `2 × workers` chunks are in flight, so memory stays bounded whatever
the corpus size; shards are written as they fill, in the llm.c format (`jaxgpt.shards`).

Everything is built in `OUT/.prepare-partial/`: a shard is renamed from `*.partial` to its
final name only once complete, and after every chunk that completed a shard a checkpoint
(`state.json`, written atomically) records the chunk to resume from and how far each open
shard had got. A prepare that is interrupted (Ctrl-C, a crash, a full disk) therefore resumes
from that checkpoint when run again with the same settings; the finished shards are moved into
OUT and `meta.json` is written last, so OUT holds the previous data until the new is complete.
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from jaxgpt import atomic, documents, shards
from jaxgpt.errors import InputError
from jaxgpt.tokenizer import get_tokenizer

SHARDS_VERSION = 2  # meta.json "version" of sharded data (the char pipeline writes version 1)
EOT = 50256
PARTIAL = ".prepare-partial"
STATE = "state.json"
SPLITS = ("train", "val")


class Tokenized(NamedTuple):
    """One chunk tokenised: every document as [EOT, its tokens...], concatenated."""

    tokens: np.ndarray  # uint16 [sum of doc_lens]
    doc_lens: np.ndarray  # int64 [documents], each document's length including its EOT
    skipped: int
    first_skipped: str | None
    replaced: int
    nbytes: int


def _init_worker() -> None:
    # Ctrl-C reaches the whole process group: the main process stops the pool and keeps the
    # checkpoint; workers ignore it rather than each printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    get_tokenizer("gpt2")  # built once per process (cached), before the first chunk arrives


def tokenize_chunk(parts: list, field: str, missing: str, errors: str) -> Tokenized:
    """Parse and tokenise one chunk (runs in a worker process)."""
    encoding = get_tokenizer("gpt2")
    docs = documents.chunk_documents(parts, field, missing, errors)
    # = `encode_ordinary` (no special tokens: "<|endoftext|>" in a text is ordinary text), but
    # straight into a uint32 array: no Python int per token (≈ 15 % of the tokenizing time).
    ids = [encoding.encode_to_numpy(text, disallowed_special=()) for text in docs.texts]
    doc_lens = np.fromiter((len(x) + 1 for x in ids), np.int64, len(ids))
    tokens = np.empty(int(doc_lens.sum()), np.uint16)
    start = 0
    for x, n in zip(ids, doc_lens.tolist()):
        tokens[start] = EOT
        tokens[start + 1 : start + n] = x
        start += n
    nbytes = sum(p.nbytes for p in parts)
    return Tokenized(tokens, doc_lens, docs.skipped, docs.first_skipped, docs.replaced, nbytes)


# --------------------------------------------------------------------------- shard writing


class ShardWriter:
    """Appends a split's tokens to `split_000000.bin.partial`, renaming it to `split_000000.bin`
    (header filled in) each time it holds `shard_tokens`; memory is one write at a time."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, state: dict | None):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.done: list[dict] = list(state["shards"]) if state else []
        self.n = state["partial_tokens"] if state else 0
        path = self._path(partial=True)
        if self.n:  # resume: what the checkpoint recorded, whatever was written after it
            final = self._path(partial=False)
            if not path.exists() and final.exists():  # completed after the checkpoint
                final.rename(path)
            self.handle = path.open("r+b")
            self.handle.truncate(shards.HEADER_BYTES + self.n * 2)
            self.handle.seek(0, os.SEEK_END)
        else:
            self._open()

    def _path(self, partial: bool) -> Path:
        name = f"{self.split}_{len(self.done):06d}.bin"
        return self.directory / (name + ".partial" if partial else name)

    def _open(self) -> None:
        self.handle = self._path(partial=True).open("wb")
        self.handle.write(bytes(shards.HEADER_BYTES))
        self.n = 0

    def write(self, tokens: np.ndarray) -> int:
        """Append `tokens`; returns the number of shards this completed."""
        completed = 0
        while len(tokens):
            take = tokens[: self.shard_tokens - self.n]
            self.handle.write(take.astype("<u2", copy=False).tobytes())
            self.n += len(take)
            tokens = tokens[len(take) :]
            if self.n == self.shard_tokens:
                self._finish()
                self._open()
                completed += 1
        return completed

    def _finish(self) -> None:
        self.handle.seek(0)
        self.handle.write(shards.shard_header(self.n).tobytes())
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self._path(partial=True).rename(self._path(partial=False))
        self.done.append({"name": self._path(partial=False).name, "tokens": self.n})

    def checkpoint(self) -> dict:
        """Flush what was written; the state to resume from."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        return {"shards": list(self.done), "partial_tokens": self.n}

    def close(self) -> list[dict]:
        """Complete the last shard (if it holds any token); the list of shards."""
        if self.n:
            self._finish()
        else:
            self.handle.close()
            self._path(partial=True).unlink()
        return self.done


# --------------------------------------------------------------------------- the pipeline


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold an advisory lock on the directory `out` (released when the process ends, however it
    ends): a second prepare into the same directory is an error, not a corrupted resume."""
    try:
        import fcntl
    except ImportError:  # not on this platform: no lock
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise InputError(f"another jaxgpt prepare is writing into {out}; wait for it") from err
        yield
    finally:
        os.close(fd)


def default_workers() -> int:
    """All the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _ordered(chunks, work, workers: int):
    """`work(chunk)` for every chunk, in order: in this process for one worker, else in a pool of
    `workers` processes with at most 2 × workers chunks in flight (bounded memory)."""
    if workers == 1:
        yield from map(work, chunks)
        return
    get_tokenizer("gpt2")  # built (and cached) once here: forked workers inherit it
    context = multiprocessing.get_context(_start_method())
    with context.Pool(workers, initializer=_init_worker) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(work, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _start_method() -> str:
    """ "fork" (workers start at once) unless JAX has started its threads in this process (as in
    `jaxgpt train`): forking a multithreaded process can deadlock, so then "forkserver" (workers
    fork from a fresh process that imports jaxgpt once, a second or two)."""
    try:  # no public way to ask; if this moves, assume the threads have started
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        started = True
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and not started:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


class _Work:
    """A picklable `tokenize_chunk` with the reading settings bound."""

    def __init__(self, field: str, missing: str, errors: str):
        self.field, self.missing, self.errors = field, missing, errors

    def __call__(self, item: tuple[int, list]) -> tuple[int, Tokenized]:
        index, parts = item
        return index, tokenize_chunk(parts, self.field, self.missing, self.errors)


def prepare_shards(
    source: str | Path,
    out: Path,
    *,
    files: list[Path] | None = None,
    field: str = "text",
    missing: str = "error",
    errors: str = "strict",
    val_fraction: float = 0.1,
    split_seed: int = 0,
    workers: int | None = None,
    shard_tokens: int = 100_000_000,
    chunk_bytes: int = 1 << 22,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenise the documents of `source` (GPT-2 BPE) into token shards in `out`; return the meta.

    `files` are the corpus files (default: `jaxgpt.documents.document_files(source)`); `out`
    must exist (`jaxgpt.data.prepare` checks both and calls this for tokenizer "gpt2").
    """
    if missing not in documents.MISSING:
        raise InputError(f"missing must be one of {documents.MISSING}, got {missing!r}")
    workers = default_workers() if workers is None else workers
    for name, value in (("workers", workers), ("shard_tokens", shard_tokens),
                        ("chunk_bytes", chunk_bytes)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if not field:
        raise InputError("field must name the text field of the JSONL lines / Parquet column")
    files = documents.document_files(source) if files is None else files
    total_bytes = sum(f.stat().st_size for f in files)
    settings = {
        "source": str(source),
        "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "field": field, "missing": missing, "errors": errors, "val_fraction": val_fraction,
        "split_seed": split_seed, "shard_tokens": shard_tokens, "chunk_bytes": chunk_bytes,
    }  # fmt: skip
    partial = out / PARTIAL
    state = _start_or_resume(partial, settings)
    writers = {s: ShardWriter(partial, s, shard_tokens, state["splits"][s]) for s in SPLITS}
    counts = state["counts"]
    start, bar = time.perf_counter(), tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
        leave=False,
    )  # fmt: skip

    resume_at = state["next_chunk"]

    def chunks():
        for i, parts in enumerate(documents.read_chunks(files, chunk_bytes, field)):
            if i >= resume_at:
                yield i, parts
            else:  # already in the shards of the interrupted prepare
                bar.update(sum(p.nbytes for p in parts))

    try:
        with bar:
            for index, result in _ordered(chunks(), _Work(field, missing, errors), workers):
                completed = _add_chunk(result, index, writers, counts, split_seed, val_fraction)
                bar.update(result.nbytes)
                done = counts["train_tokens"] + counts["val_tokens"]
                bar.set_postfix_str(f"{done / (time.perf_counter() - start) / 1e6:.2f}M tokens/s")
                if completed:
                    state = {"settings": settings, "next_chunk": index + 1, "counts": counts,
                             "splits": {s: w.checkpoint() for s, w in writers.items()}}  # fmt: skip
                    atomic.write_text(partial / STATE, json.dumps(state))
    except InputError:  # bad input: nothing to resume once the corpus is fixed
        for w in writers.values():
            w.handle.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except BaseException as err:  # interrupted: the last checkpoint stays, to resume from
        for w in writers.values():
            w.handle.close()
        if isinstance(err, OSError):  # a full disk, ...: free space, then run it again
            raise InputError(
                f"cannot write the prepared data to {partial}: {err.strerror or err}; the "
                f"complete shards stay there and a rerun resumes from them"
            ) from err
        raise
    documents_total = counts["train_documents"] + counts["val_documents"]
    if documents_total < 2:
        for w in writers.values():
            w.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise InputError(
            f"corpus {str(source)!r} has {documents_total} document(s); the train/val split is by "
            f"document and needs at least 2 (a .txt file is one document: split the text into "
            f"several files, or into the lines of a .jsonl)"
        )
    lists = {s: w.close() for s, w in writers.items()}
    _warn(counts, field)
    meta = {
        "version": SHARDS_VERSION, "format": "shards", "tokenizer": "gpt2", "vocab_size": EOT + 1,
        "dtype": "uint16", "eot": EOT, "eot_placement": "prepend",
        **{k: counts[k] for k in ("train_tokens", "val_tokens", "train_documents",
                                  "val_documents")},
        "skipped_documents": counts["skipped"], "replaced_invalid_utf8": counts["replaced"],
        "shards": lists, "source": str(source),
        "files": [{"name": str(f), "bytes": f.stat().st_size} for f in files],
        **{k: settings[k] for k in ("field", "missing", "val_fraction", "split_seed",
                                    "shard_tokens", "chunk_bytes")},
        "split_chunk": None,
    }  # fmt: skip
    _commit(partial, out, meta)
    return meta


def _start_or_resume(partial: Path, settings: dict) -> dict:
    """The checkpoint of an interrupted prepare with exactly these settings (said on stderr), or
    a fresh start in an emptied `partial` folder."""
    try:
        state = json.loads((partial / STATE).read_text())
    except (OSError, ValueError):
        state = None
    if state is None or state.get("settings") != settings:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        return {"next_chunk": 0, "counts": _zero_counts(), "splits": dict.fromkeys(SPLITS)}
    done = sum(len(x["shards"]) for x in state["splits"].values())
    print(
        f"resuming an interrupted prepare at chunk {state['next_chunk']} ({done} shard(s) "
        f"already complete in {partial})",
        file=sys.stderr,
    )
    return state


def _warn(counts: dict, field: str) -> None:
    """Say what was skipped or replaced (also recorded in meta.json)."""
    if counts["skipped"]:
        print(
            f"warning: skipped {counts['skipped']:,} line(s) without a {field!r} field "
            f"(the first: {counts['first_skipped']})",
            file=sys.stderr,
        )
    if counts["replaced"]:
        print(
            f"warning: invalid UTF-8 replaced by U+FFFD in {counts['replaced']:,} document(s) "
            f"(errors='replace')",
            file=sys.stderr,
        )


def _zero_counts() -> dict[str, Any]:
    names = ("train_tokens", "val_tokens", "train_documents", "val_documents", "skipped")
    return {**dict.fromkeys(names, 0), "replaced": 0, "first_skipped": None}


def _add_chunk(
    result: Tokenized, index: int, writers: dict, counts: dict, seed: int, val_fraction: float
) -> int:
    """Send each document of a chunk to its split; returns the number of shards completed."""
    n_docs = len(result.doc_lens)
    is_val = np.random.default_rng([seed, index]).random(n_docs) < val_fraction
    # The corpus' first document always trains and its second always validates: neither split
    # is empty once there are two documents.
    seen = counts["train_documents"] + counts["val_documents"]
    for k in range(min(n_docs, max(0, 2 - seen))):
        is_val[k] = seen + k == 1
    token_is_val = np.repeat(is_val, result.doc_lens)
    completed = writers["train"].write(result.tokens[~token_is_val])
    completed += writers["val"].write(result.tokens[token_is_val])
    counts["train_tokens"] += int(len(result.tokens) - token_is_val.sum())
    counts["val_tokens"] += int(token_is_val.sum())
    counts["val_documents"] += int(is_val.sum())
    counts["train_documents"] += int(n_docs - is_val.sum())
    counts["skipped"] += result.skipped
    counts["first_skipped"] = counts["first_skipped"] or result.first_skipped
    counts["replaced"] += result.replaced
    return completed


def _commit(partial: Path, out: Path, meta: dict) -> None:
    """Move the finished shards into `out` and write `meta.json` last (the old one goes first, so
    `out` is never a mix that looks prepared); then remove what the old data left behind."""
    (out / "meta.json").unlink(missing_ok=True)
    names = {s["name"] for split in meta["shards"].values() for s in split}
    for name in names:
        (partial / name).replace(out / name)
    for stale in [*out.glob("train_*.bin"), *out.glob("val_*.bin"), out / "train.bin",
                  out / "val.bin"]:  # fmt: skip
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    atomic.write_text(out / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False))
    shutil.rmtree(partial, ignore_errors=True)
