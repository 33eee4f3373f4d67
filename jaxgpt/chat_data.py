"""Chat data sets: `.jsonl` conversations → token and mask files, and back as `Documents`.

A chat data set is one or more `.jsonl` files, one conversation per line, in any of the forms
`jaxgpt.chat.read_conversations` reads ({"messages": [...]}, {"instruction", "input", "output"},
{"prompt", "response"}), or the generated arithmetic demo (`source="arithmetic"`, see
`jaxgpt.arithmetic`).
`prepare_chat` renders each conversation with `jaxgpt.chat.render_conversation` into token ids
and the 0/1 mask of what the assistant says, assigns whole conversations to train or val by a
seeded draw, and writes per split `<split>.bin` (tokens), `<split>.mask.bin` (uint8) and
`<split>.idx.npy` (int64 offsets of the conversations), then `meta.json` last. Everything is
written into a temporary directory that replaces the output only when complete.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxgpt import arithmetic, atomic, chat, jsonl
from jaxgpt.errors import InputError
from jaxgpt.packing import Documents, trained_fraction
from jaxgpt.tokenizer import (
    CharTokenizer,
    Tokenizer,
    get_tokenizer,
    tokenizer_from_json,
    tokenizer_to_json,
)

META_VERSION = 1
FORMAT = "chat"
ARITHMETIC = "arithmetic"  # data.source: the generated arithmetic demo
ARITHMETIC_CONVERSATIONS = 20_000

# --------------------------------------------------------------------------- reading


def chat_files(source: str | Path) -> list[Path]:
    """The .jsonl files of a chat data set: one file, or every .jsonl under a directory."""
    hint = f"pass a .jsonl file, a directory of them, or {ARITHMETIC!r}"
    return jsonl.files(source, "chat data", hint)


def source_digest(source: str | Path) -> str:
    """sha256 over the data set's files (for the generated demo: its name and size), to tell
    whether prepared data is stale."""
    if source == ARITHMETIC:
        return f"{ARITHMETIC}:{ARITHMETIC_CONVERSATIONS}"
    return jsonl.digest(chat_files(source))


def source_conversations(source: str) -> Iterator[list[dict[str, str]]]:
    """The conversations of a chat data set (validated by `jaxgpt.chat.read_conversations`)."""
    if source == ARITHMETIC:
        yield from arithmetic.training_conversations(ARITHMETIC_CONVERSATIONS, seed=0)
        return
    for path in chat_files(source):
        yield from chat.read_conversations(path)


# --------------------------------------------------------------------------- prepare


def prepare_chat(
    source: str,
    out_dir: str | Path,
    *,
    tokenizer: str | Tokenizer = "char",
    val_fraction: float = 0.05,
    split_seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Render a chat data set into `out_dir` (token, mask and offset files per split + meta).

    `tokenizer` is "char" (the data set's characters), "gpt2", or a Tokenizer (a model's own).
    """
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    out = Path(out_dir)
    tok = _chat_tokenizer(source, tokenizer)
    dtype = np.dtype(np.uint8 if tok.n_vocab <= 256 else np.uint16)
    with atomic.staged_directory(out, "the data directory") as tmp:
        counts = _render_splits(source, tok, tmp, dtype, val_fraction, split_seed, progress)
        meta = {
            "version": META_VERSION, "format": FORMAT, "tokenizer": tok.name,
            "tokenizer_spec": tokenizer_to_json(tok), "vocab_size": tok.n_vocab,
            "dtype": dtype.name, "source": str(source), "source_sha256": source_digest(source),
            "val_fraction": val_fraction, "split_seed": split_seed, **counts,
        }  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    return meta


def _chat_tokenizer(source: str, name: str | Tokenizer) -> Tokenizer:
    if not isinstance(name, str):  # a model's own tokenizer
        return chat.with_chat_tokens(name)
    if name == "gpt2":
        return chat.with_chat_tokens(get_tokenizer("gpt2"))
    if name != "char":
        raise InputError(f"tokenizer must be 'char' or 'gpt2', got {name!r}")
    chars: set[str] = set()
    for messages in source_conversations(source):
        for message in messages:
            chars.update(str(message.get("content", "")))
    if not chars:
        raise InputError(f"chat data {source!r} holds no text")
    return chat.with_chat_tokens(CharTokenizer(chars))


def _render_splits(
    source: str, tok: Tokenizer, out: Path, dtype: np.dtype, val_fraction: float, seed: int,
    progress: bool,
) -> dict[str, int]:  # fmt: skip
    rng = np.random.default_rng(seed)
    splits = ("train", "val")
    offsets = {s: [0] for s in splits}
    trained = dict.fromkeys(splits, 0)
    handles = {s: (out / f"{s}.bin").open("wb") for s in splits}
    masks = {s: (out / f"{s}.mask.bin").open("wb") for s in splits}
    try:
        conversations = source_conversations(source)
        for i, messages in enumerate(
            tqdm(conversations, desc="rendering", unit=" conv", disable=not progress)
        ):
            ids, mask = chat.render_conversation(messages, tok)
            draw = rng.random()  # drawn for every conversation: the split depends on the seed only
            split = (
                "train"
                if i == 0
                else "val"
                if i == 1
                else ("val" if draw < val_fraction else "train")
            )
            np.asarray(ids, dtype).tofile(handles[split])
            np.asarray(mask, np.uint8).tofile(masks[split])
            offsets[split].append(offsets[split][-1] + len(ids))
            trained[split] += int(np.count_nonzero(mask))
    finally:
        for h in (*handles.values(), *masks.values()):
            h.close()
    counts: dict[str, int] = {}
    for s in splits:
        np.save(out / f"{s}.idx.npy", np.asarray(offsets[s], np.int64))
        counts[f"{s}_conversations"] = len(offsets[s]) - 1
        counts[f"{s}_tokens"] = offsets[s][-1]
        counts[f"{s}_trained_tokens"] = trained[s]
    return counts


# --------------------------------------------------------------------------- loading


def load_documents(data_dir: str | Path, split: str) -> Documents:
    """The conversations of a prepared split (memory-mapped tokens and mask)."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    try:
        offsets = np.load(data_dir / f"{split}.idx.npy")
        tokens = np.memmap(data_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        mask = np.memmap(data_dir / f"{split}.mask.bin", dtype=np.uint8, mode="r")
    except (OSError, ValueError) as err:
        raise InputError(
            f"{data_dir} holds no complete {split} split ({err}); run `jaxgpt prepare` again"
        ) from err
    return Documents(tokens, mask, offsets)


def describe_mask(docs: Documents, row_len: int, where: str) -> str:
    """One line on how much SFT trains on; an InputError if the mask trains on all or nothing."""
    trained, total = trained_fraction(docs, row_len)
    if trained == 0:
        raise InputError(
            f"{where}: the mask is all zeros — no token is trained (are there assistant turns?)"
        )
    if trained == total:
        raise InputError(
            f"{where}: the mask is all ones — user and system text would be trained too, "
            f"which SFT must not do"
        )
    truncated = int(np.count_nonzero(docs.lengths() > row_len))
    line = (
        f"SFT trains on {trained:,} of {total:,} predicted tokens ({100 * trained / total:.1f}%: "
        f"the assistant's words) in {docs.count:,} conversations"
    )
    if truncated:
        line += f"; {truncated:,} longer than the context ({row_len} tokens) are cut"
    print(line, file=sys.stderr)
    return line


def tokenizer_from_meta(meta: dict[str, Any]) -> Tokenizer:
    """The chat tokenizer (special tokens included) a chat data directory was rendered with."""
    return tokenizer_from_json(meta["tokenizer_spec"], "meta.json")
