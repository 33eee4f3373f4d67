"""`jaxgpt eval --model MODEL (--data DIR | --task FORMAT FILE)`: perplexity or multiple choice."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from jaxgpt import atomic
from jaxgpt.cli.common import load_model
from jaxgpt.config import PRESETS
from jaxgpt.data import load_meta, load_tokens
from jaxgpt.errors import InputError
from jaxgpt.eval import FORMATS, check_data_tokenizer, evaluate_choices, perplexity, read_choices
from jaxgpt.shards import read_shard

GPT2_VOCAB = 50257


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="perplexity on prepared data, or multiple-choice accuracy (HellaSwag)",
        description="Evaluate a model: loss, perplexity and bits per byte on a prepared split "
        "(strided windows, every token scored once), or multiple-choice accuracy on a JSONL file "
        "(each choice scored by the summed and by the mean log-probability of its tokens). "
        "See docs/eval.md.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a Hugging Face GPT-2 directory, a jaxgpt training run directory, or a preset name "
        f"with RANDOM weights ({', '.join(PRESETS)})",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="a `jaxgpt prepare` directory, or one llm.c / modded-nanogpt token shard (.bin)",
    )
    what.add_argument(
        "--task",
        nargs=2,
        metavar=("FORMAT", "FILE"),
        help=f"a multiple-choice JSONL file; FORMAT is one of {', '.join(FORMATS)} "
        "(hellaswag: fields ctx, endings, label; mc: context, choices, answer)",
    )
    what.add_argument(
        "--arithmetic",
        type=int,
        metavar="N",
        help="a chat model's greedy exact-match accuracy on N held-out problems of the "
        "arithmetic demo (A + B with A ≡ B mod 7, never trained; docs/chat.md)",
    )
    parser.add_argument("--split", default="val", help="with --data: the split (default val)")
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        help="with --data: tokens between window starts, 1..block_size (default block_size / 2)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="with --data: score only the first N tokens"
    )
    parser.add_argument("--limit", type=int, default=None, help="with --task: the first N items")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="rows per batch (8 windows / 16 choices)"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write results")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def check_json_path(path: Path | None) -> None:
    """Fail before any work if the results could not be written."""
    if path is None:
        return
    if path.is_dir():
        raise InputError(f"--json {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"--json {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"--json {path} is not writable")


def write_json(path: Path, record: dict[str, Any]) -> None:
    atomic.write_text(path, json.dumps(record, indent=1) + "\n")


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InputError(f"{name} must be >= 1, got {value}")


def run(args: argparse.Namespace) -> int:
    for name in ("stride", "max_tokens", "limit", "batch_size", "arithmetic"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name))
    check_json_path(args.json)
    if args.arithmetic is not None:
        record = run_arithmetic(args)
    else:
        record = run_task(args) if args.task is not None else run_data(args)
    if args.json is not None:
        write_json(args.json, record)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def run_task(args: argparse.Namespace) -> dict[str, Any]:
    fmt, file = args.task
    items = read_choices(file, fmt, limit=args.limit)  # checked before the model loads
    model = load_model(args.model)
    result = evaluate_choices(
        model.params, model.config, model.tokenizer, items,
        batch_size=args.batch_size or 16, progress=not args.quiet,
    )  # fmt: skip
    print(f"{fmt} {file}: {result.items} items ({model.source})")
    for name, how in (("acc", "sum"), ("acc_norm", "mean per token")):
        err = getattr(result, f"{name}_stderr")
        spread = f" ± {err:.4f}" if err is not None else ""
        print(f"  {name:<9}{getattr(result, name):.4f}{spread}  (log-probability {how})")
    summary = {k: v for k, v in dataclasses.asdict(result).items() if k.startswith("acc")}
    return {"model": model.source, "task": fmt, "file": file, "items": result.items, **summary}


def run_arithmetic(args: argparse.Namespace) -> dict[str, Any]:
    from jaxgpt import arithmetic

    model = load_model(args.model)
    scored = arithmetic.evaluate_model(
        model.params, model.config, model.tokenizer, n=args.arithmetic,
        batch_size=args.batch_size or 100,
    )  # fmt: skip
    print(
        f"held-out arithmetic ({scored['n']} problems, A ≡ B mod 7, greedy): accuracy "
        f"{scored['accuracy']:.4f} ± {scored['stderr']:.4f} ({model.source})"
    )
    return {"model": model.source, "task": "arithmetic", **scored}


def run_data(args: argparse.Namespace) -> dict[str, Any]:
    # Read and check the tokens before the model loads.
    if args.data.is_file():  # an llm.c / modded-nanogpt shard: GPT-2 tokens
        split, where, tokens = None, str(args.data), read_shard(args.data)
        meta = {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB}
    else:
        split, where, meta = args.split, str(args.data / "meta.json"), load_meta(args.data)
        tokens = load_tokens(args.data, split)
    model = load_model(args.model)
    check_data_tokenizer(meta, model.tokenizer, model.config, where)
    result = perplexity(
        model.params, model.config, tokens[: args.max_tokens], model.tokenizer,
        stride=args.stride, batch_size=args.batch_size or 8, progress=not args.quiet,
    )  # fmt: skip
    print(
        f"{f'{split} split of ' if split else ''}{args.data}: {result.tokens:,} tokens scored "
        f"({result.bytes:,} bytes), context {result.context}, stride {result.stride}"
    )
    print(
        f"  loss {result.loss:.4f}  perplexity {result.perplexity:.3f}  "
        f"bits per byte {result.bits_per_byte:.4f}"
    )
    record = {"model": model.source, "data": str(args.data), "split": split}
    return record | dataclasses.asdict(result)
