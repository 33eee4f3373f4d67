"""`jaxgpt pairs --model RUN --out pairs.jsonl`: preference pairs sampled from a chat model.

    jaxgpt pairs --model runs/chat_sft --out data/chat_pairs.jsonl            # the arithmetic demo
    jaxgpt pairs --model RUN --prompts prompts.jsonl --scorer arithmetic --out pairs.jsonl

Samples --samples answers to each prompt, scores them (--scorer, `jaxgpt.pairing.SCORERS`) and
writes chosen/rejected pairs by the rule in `jaxgpt.pairing` (ties give no pair).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from jaxgpt.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    from jaxgpt.pairing import SCORERS

    parser = subparsers.add_parser(
        "pairs",
        help="build preference pairs by sampling a chat model and scoring its answers",
        description="Sample several answers to each prompt from a chat model (batched KV-cache "
        "decoding), score each answer with a scorer (for the arithmetic demo, the verifier) and "
        "write chosen/rejected pairs as .jsonl for `jaxgpt prepare --format preference` and DPO. "
        "A prompt whose answers all score the same gives no pair; otherwise the distinct "
        "best-scored answers are paired with the distinct lower-scored ones (worst first), at "
        "most --max-pairs per prompt; an answer cut off by --max-new-tokens is never chosen.",
    )
    parser.add_argument("--model", required=True, help="a jaxgpt chat run (or HF dir)")
    parser.add_argument("--out", required=True, type=Path, help="the .jsonl file to write")
    parser.add_argument(
        "--prompts", default="arithmetic",
        help="'arithmetic' (training problems drawn from --seed, never held out) or a .jsonl "
        'file of {"prompt": text or messages} lines',
    )  # fmt: skip
    parser.add_argument(
        "--scorer", choices=sorted(SCORERS), default="arithmetic", help="how answers are scored"
    )
    parser.add_argument("--n-prompts", type=int, default=2000, help="prompts to use (2000)")
    parser.add_argument("--samples", type=int, default=4, help="answers per prompt (4)")
    parser.add_argument("--max-pairs", type=int, default=2, help="pairs per prompt at most (2)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling (1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per answer (64)")
    parser.add_argument("--batch-rows", type=int, default=256, help="rows decoded at once (256)")
    parser.add_argument("--seed", type=int, default=0, help="prompts and samples (0)")
    parser.add_argument(
        "--greedy", action="store_true",
        help="also take each prompt's greedy answer, first: its mistakes are paired first",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """Every argument checked before the model is loaded."""
    for name in ("n_prompts", "max_pairs", "max_new_tokens", "batch_rows"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.samples < 2:
        raise InputError("--samples must be at least 2 (a pair needs two answers)")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise InputError(
            f"--temperature must be a finite number > 0 (answers must differ), got "
            f"{args.temperature}"
        )
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    if not args.out.parent.is_dir():
        raise InputError(f"--out {args.out}: directory {args.out.parent} does not exist")


def run(args: argparse.Namespace) -> int:
    from jaxgpt import chat, pairing
    from jaxgpt.cli.common import load_model

    check_args(args)
    task = "arithmetic" if args.scorer == "arithmetic" else ""
    if args.prompts == "arithmetic":
        prompts = pairing.arithmetic_prompts(args.n_prompts, args.seed)
    else:
        prompts = pairing.file_prompts(args.prompts, args.n_prompts)
    pairing.check_prompts(prompts, task)
    model = load_model(args.model)
    chat.chat_tokens(model.tokenizer)  # a model without chat tokens cannot answer
    print(
        f"sampling {args.samples} answers to each of {len(prompts):,} prompts from "
        f"{model.source} (temperature {args.temperature})",
        file=sys.stderr,
    )
    stats = pairing.build_pairs(
        model.params, model.config, model.tokenizer, prompts, pairing.SCORERS[args.scorer],
        args.out, samples=args.samples, temperature=args.temperature, max_pairs=args.max_pairs,
        max_new_tokens=args.max_new_tokens, seed=args.seed, batch_rows=args.batch_rows,
        task=task, greedy=args.greedy, progress=not args.quiet,
    )  # fmt: skip
    print(pairing.summary(stats, args.out))
    return 0
