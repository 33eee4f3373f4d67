"""The documents of a pretraining corpus: `.txt` files, `.jsonl` / `.jsonl.gz` lines, `.parquet`
rows (a `text` field or column by default).

Reading is cut in two so that the expensive half runs in parallel:

* `read_chunks` (one process, in order) cuts the corpus into chunks of about `chunk_bytes` of raw
  input, doing only cheap work: whole lines of bytes for JSONL (decompressed for `.gz`), a file's
  bytes for `.txt`, a batch of strings for Parquet.
* `chunk_documents` (in any worker) turns one chunk into its documents: UTF-8 decoding and JSON
  parsing happen there.

Chunks depend only on the corpus and `chunk_bytes`, never on how many workers read them, so
everything computed per chunk (the tokens, the train/val draw) is the same for any number of
workers. A problem in the input is an `InputError` naming the file and line (or row).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from glob import glob
from pathlib import Path
from typing import NamedTuple

from jaxgpt.errors import InputError, MissingExtraError

FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
MISSING = ("error", "skip")  # what a JSONL line / Parquet row without the text field does


class Part(NamedTuple):
    """A piece of one file inside a chunk: whole lines, a whole file, or a batch of rows.

    `line` is the 1-based line (row) number of the payload's first line; `nbytes` the input bytes
    it accounts for (compressed bytes for `.gz`), for the progress bar.
    """

    path: str
    kind: str
    line: int
    payload: bytes | list
    nbytes: int


class Documents(NamedTuple):
    """What a chunk holds: its documents' texts, and the lines that had no text field."""

    texts: list[str]
    skipped: int
    first_skipped: str | None  # "file:line" of the first skipped line
    replaced: int  # documents in which invalid UTF-8 was replaced (errors="replace")


def file_format(path: str | Path) -> str | None:
    """The corpus format of a file by its name (one of FORMATS), or None."""
    name = str(path).lower()
    return next((f for f in FORMATS if name.endswith(f)), None)


def document_files(source: str | Path) -> list[Path]:
    """The corpus files of `source`: one file, every corpus file under a directory (sorted; hidden
    files and folders left out), or the files matching a glob pattern (`**` recurses)."""
    text = os.path.expanduser(str(source))
    formats = ", ".join(FORMATS)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob(text, recursive=True) if file_format(p))
        files = [f for f in files if f.is_file()]
        if not files:
            raise InputError(f"no corpus file ({formats}) matches {str(source)!r}")
        return files
    path = Path(text)
    if path.is_file():
        if file_format(path) is None:
            raise InputError(f"corpus file {path} is not one of {formats}")
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if file_format(p) and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )  # fmt: skip
        if not files:
            shards = " (it holds .bin token shards: use it as the data directory itself)"
            has_bin = any(path.glob("*.bin"))
            raise InputError(
                f"corpus directory {path} contains no {formats} files{shards if has_bin else ''}"
            )
        return files
    raise InputError(
        f"corpus {str(source)!r} does not exist; pass a file, a directory or a glob ({formats})"
    )


# --------------------------------------------------------------------------- reading (in order)


def read_chunks(files: list[Path], chunk_bytes: int, field: str) -> Iterator[list[Part]]:
    """The corpus as consecutive chunks of about `chunk_bytes` of input each, in file order."""
    parts: list[Part] = []
    size = 0
    for path in files:
        for part in _file_parts(path, chunk_bytes, field):
            parts.append(part)
            size += len(part.payload) if part.kind != "parquet" else part.nbytes
            if size >= chunk_bytes:
                yield parts
                parts, size = [], 0
    if parts:
        yield parts


def _file_parts(path: Path, chunk_bytes: int, field: str) -> Iterator[Part]:
    kind = file_format(path)
    if kind == ".txt":
        try:
            data = path.read_bytes()
        except OSError as err:
            raise InputError(f"cannot read corpus file {path}: {err.strerror or err}") from err
        yield Part(str(path), "txt", 1, data, len(data))
    elif kind == ".parquet":
        yield from _parquet_parts(path, field)
    else:
        yield from _jsonl_parts(path, chunk_bytes, gz=kind == ".jsonl.gz")


def _jsonl_parts(path: Path, chunk_bytes: int, gz: bool) -> Iterator[Part]:
    """Whole lines of a JSONL file, about `chunk_bytes` at a time (one line may be longer)."""
    line, rest, where = 1, b"", 0
    try:
        raw = path.open("rb")
    except OSError as err:
        raise InputError(f"cannot read corpus file {path}: {err.strerror or err}") from err
    with raw, gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw as handle:
        while True:
            try:
                block = handle.read(chunk_bytes)
            except (OSError, EOFError, zlib.error) as err:
                what = "a corrupt or truncated gzip file" if gz else "unreadable"
                raise InputError(f"{path}: {what}, after line {line - 1} ({err})") from err
            data = rest + block
            cut = len(data) if not block else data.rfind(b"\n") + 1
            if cut == 0 and block:  # no line end yet: a line longer than chunk_bytes
                rest = data
                continue
            payload, rest = data[:cut], data[cut:]
            if payload:
                read, where = raw.tell() - where, raw.tell()
                yield Part(str(path), "jsonl", line, payload, read)
                line += payload.count(b"\n")
            if not block:
                return


def _parquet_parts(path: Path, field: str) -> Iterator[Part]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise MissingExtraError(
            f"reading {path} needs pyarrow: pip install 'jaxgpt[parquet]' (or pyarrow)"
        ) from err
    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        if field not in names:
            raise InputError(
                f"{path}: no column {field!r} (columns: {', '.join(names)}); choose one with "
                f"--field"
            )
        rows, total = 1, max(table.metadata.num_rows, 1)
        size = path.stat().st_size
        for batch in table.iter_batches(batch_size=1024, columns=[field]):
            texts = batch.column(0).to_pylist()
            yield Part(str(path), "parquet", rows, texts, size * len(texts) // total)
            rows += len(texts)
    except InputError:
        raise
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        detail = " ".join(str(err).split())  # pyarrow's messages span lines
        raise InputError(f"{path}: not a readable Parquet file ({detail})") from err


# --------------------------------------------------------------------------- parsing (in workers)


def chunk_documents(parts: list[Part], field: str, missing: str, errors: str) -> Documents:
    """The documents of a chunk, in order. Lines without `field` are skipped (counted) when
    `missing="skip"` and an error otherwise; blank JSONL lines are not documents."""
    texts: list[str] = []
    skipped, first_skipped, replaced = 0, None, 0

    def skip(where: str) -> None:
        nonlocal skipped, first_skipped
        if missing == "error":
            raise InputError(
                f"{where}: no {field!r} field; choose the field with --field, or pass "
                f"--missing skip to skip (and count) such lines"
            )
        skipped += 1
        first_skipped = first_skipped or where

    for part in parts:
        if part.kind == "txt":
            text, bad = _decode(part.payload, part.path, errors)
            texts.append(text)
            replaced += bad
        elif part.kind == "parquet":
            for i, text in enumerate(part.payload):
                if text is None:
                    skip(f"{part.path}: row {part.line + i}")
                elif not isinstance(text, str):
                    raise InputError(
                        f"{part.path}: row {part.line + i}: column {field!r} holds "
                        f"{type(text).__name__}, expected text"
                    )
                else:
                    texts.append(text)
        else:
            for i, raw in enumerate(part.payload.split(b"\n")):
                if raw.strip():
                    where = f"{part.path}:{part.line + i}"
                    value, bad = _json_field(raw, field, where, errors)
                    if value is None:
                        skip(where)
                    else:
                        texts.append(value)
                        replaced += bad
    return Documents(texts, skipped, first_skipped, replaced)


def _decode(data: bytes, path: str, errors: str) -> tuple[str, int]:
    """(text, 1 if invalid UTF-8 was replaced else 0)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as err:
        if errors != "replace":
            raise InputError(
                f"corpus file {path} is not valid UTF-8 (byte offset {err.start}); convert it, "
                f"or pass --errors replace to replace invalid bytes with U+FFFD"
            ) from err
        return data.decode("utf-8", errors="replace"), 1


def _json_field(raw: bytes, field: str, where: str, errors: str) -> tuple[str | None, int]:
    """(the line's `field`, or None when it has none; 1 if invalid UTF-8 was replaced)."""
    bad = 0
    try:
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as err:
            if errors != "replace":
                raise InputError(
                    f"{where}: not valid UTF-8 (byte {err.start} of the line); pass --errors "
                    f"replace to replace invalid bytes with U+FFFD"
                ) from err
            record, bad = json.loads(raw.decode("utf-8", errors="replace")), 1
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from err
    if not isinstance(record, dict):
        raise InputError(f"{where}: a JSON {type(record).__name__}, expected an object")
    value = record.get(field)
    if value is not None and not isinstance(value, str):
        raise InputError(
            f"{where}: field {field!r} is a JSON {type(value).__name__}, expected a string"
        )
    return value, bad
