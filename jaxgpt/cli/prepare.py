"""`jaxgpt prepare SOURCE OUT_DIR`: tokenise a corpus into token files and meta.json (GPT-2 BPE:
resumable shards of documents, in parallel; char: train.bin / val.bin), or (`--format chat`)
render a chat data set into token, mask and offset files, or (`--format preference`) render
chosen/rejected pairs (`jaxgpt.preferences`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxgpt.data import BUNDLED, ENCODING_ERRORS, prepare
from jaxgpt.documents import MISSING
from jaxgpt.errors import InputError
from jaxgpt.sharded import default_workers


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="tokenise a corpus into train/val token files",
        description="Tokenise a corpus into OUT_DIR. With --tokenizer gpt2, SOURCE is a file, a "
        "directory or a glob of documents: .txt (one document per file), .jsonl / .jsonl.gz "
        "(one per line, its --field), .parquet (one per row, column --field); each document is "
        "preceded by <|endoftext|>, documents go to train or val by a seeded draw, and "
        "--workers processes write llm.c-format shards (train_000000.bin ...); an interrupted "
        "prepare resumes from its last complete shard when run again (a directory of llm.c / "
        "modded-nanogpt .bin shards needs no prepare: use it as the data directory). With "
        "--tokenizer char "
        "(the default), SOURCE is 'shakespeare' (the bundled plays), a .txt file or a directory "
        "of them, split in pieces of --split-chunk characters into train.bin and val.bin. "
        "With --format chat, SOURCE is a .jsonl chat data set (or a directory of them, or "
        "'arithmetic' for the generated demo): each conversation is rendered with the chat "
        "tokens and the mask of what the assistant says (docs/chat.md). With --format preference, "
        'SOURCE is a .jsonl file of {"prompt", "chosen", "rejected"} lines (or a '
        "directory of them); all pairs of a prompt go to one split.",
    )
    parser.add_argument(
        "source", metavar="SOURCE", help=f"{BUNDLED!r}, a file, a directory or a quoted glob"
    )
    parser.add_argument("out", metavar="OUT_DIR", type=Path, help="where the token files go")
    parser.add_argument("--tokenizer", choices=["char", "gpt2"], default="char")
    parser.add_argument(
        "--tokenizer-of", metavar="RUN", default=None,
        help="chat/preference data: use this training run's tokenizer (data to fine-tune it on)",
    )  # fmt: skip
    parser.add_argument(
        "--format", choices=["text", "chat", "preference"], default="text",
        help="'text': a corpus trained on every token (default); 'chat': conversations; "
        "'preference': prompts with a chosen and a rejected answer (for DPO)",
    )  # fmt: skip
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out share (0.1)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the split (0)")
    parser.add_argument(
        "--split-chunk", type=int, default=8192,
        help="char tokenizer: characters per split piece (8192)",
    )  # fmt: skip
    gpt2 = parser.add_argument_group("GPT-2 BPE documents (--tokenizer gpt2)")
    gpt2.add_argument("--field", default="text", help="JSONL field / Parquet column ('text')")
    gpt2.add_argument(
        "--missing", choices=MISSING, default="error",
        help="a line or row without the field: 'error' stops there naming file and line "
        "(default), 'skip' skips it and reports how many were skipped",
    )  # fmt: skip
    gpt2.add_argument(
        "--workers", type=int, default=None,
        help=f"tokenising processes (default: all cores, here {default_workers()})",
    )  # fmt: skip
    gpt2.add_argument(
        "--shard-tokens", type=int, default=100_000_000, help="tokens per shard (100,000,000)"
    )
    gpt2.add_argument(
        "--chunk-bytes", type=int, default=1 << 22,
        help="input bytes a worker tokenises at a time (4 MiB); changes the split",
    )  # fmt: skip
    parser.add_argument(
        "--errors", choices=ENCODING_ERRORS, default="strict",
        help="a corpus that is not valid UTF-8: 'strict' stops with the file and byte offset "
        "(default), 'replace' replaces the bad bytes with U+FFFD and warns with their count",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tokenizer = args.tokenizer
    if args.tokenizer_of is not None:
        if args.format == "text":
            raise InputError("--tokenizer-of is for --format chat or preference")
        from jaxgpt.checkpoint import is_run_dir, load_tokenizer

        if not is_run_dir(args.tokenizer_of):
            raise InputError(f"--tokenizer-of {args.tokenizer_of}: not a jaxgpt run directory")
        tokenizer = load_tokenizer(args.tokenizer_of)
    if args.format == "preference":
        from jaxgpt.preferences import prepare_preferences

        meta = prepare_preferences(
            args.source, args.out, tokenizer=tokenizer, val_fraction=args.val_fraction,
            split_seed=args.split_seed, progress=not args.quiet,
        )  # fmt: skip
        print(
            f"{args.out}: {meta['train_pairs']:,} train pairs ({meta['train_prompts']:,} "
            f"prompts) and {meta['val_pairs']:,} val pairs ({meta['val_prompts']:,} prompts), "
            f"{meta['tokenizer']} tokens, vocabulary {meta['vocab_size']}"
        )
        return 0
    if args.format == "chat":
        from jaxgpt.chat_data import prepare_chat

        meta = prepare_chat(
            args.source, args.out, tokenizer=tokenizer, val_fraction=args.val_fraction,
            split_seed=args.split_seed, progress=not args.quiet,
        )  # fmt: skip
        show_first_conversation(args.out)
        print(
            f"{args.out}: {meta['train_conversations']:,} train and {meta['val_conversations']:,}"
            f" val conversations, {meta['train_trained_tokens']:,} of {meta['train_tokens']:,} "
            f"train tokens said by the assistant ({meta['tokenizer']}, vocabulary "
            f"{meta['vocab_size']})"
        )
        return 0
    meta = prepare(
        args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
        split_seed=args.split_seed, split_chunk=args.split_chunk, errors=args.errors,
        progress=not args.quiet, field=args.field, missing=args.missing, workers=args.workers,
        shard_tokens=args.shard_tokens, chunk_bytes=args.chunk_bytes,
    )  # fmt: skip
    print(
        f"{args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
        f"({meta['tokenizer']}, vocabulary {meta['vocab_size']}, {meta['dtype']}) "
        f"from {len(meta['files'])} file(s)"
    )
    if meta.get("format") == "shards":
        print(
            f"  {meta['train_documents']:,} train and {meta['val_documents']:,} val documents "
            f"in {len(meta['shards']['train'])} + {len(meta['shards']['val'])} shard(s)"
            + (f", {meta['skipped_documents']:,} line(s) skipped" if meta["skipped_documents"]
               else "")
        )  # fmt: skip
    return 0


def show_first_conversation(out: Path) -> None:
    """Print the first training conversation as rendered, what SFT trains on marked."""
    import sys

    from jaxgpt.chat import show_mask
    from jaxgpt.chat_data import load_documents, tokenizer_from_meta
    from jaxgpt.data import load_meta

    tokenizer = tokenizer_from_meta(load_meta(out))
    ids, mask = load_documents(out, "train").doc(0)
    color = sys.stdout.isatty()
    where = "in green" if color else "in [brackets]"
    print(f"the first conversation as the model sees it, the trained tokens {where}:")
    print("  " + show_mask(ids, mask, tokenizer, color=color).replace("\n", "\n  "))
