"""`jaxgpt trace --model MODEL --prompt TEXT`: follow one prompt through the model, with numbers.

Prints the report of `jaxgpt.trace.format_report`; with `--out DIR` also writes report.txt,
attention heatmaps, the top-k bar chart and a self-contained trace.html there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxgpt.cli.common import load_model
from jaxgpt.config import PRESETS
from jaxgpt.errors import InputError
from jaxgpt.plot import check_output_dir
from jaxgpt.trace import format_report, save_trace, trace


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "trace",
        help="show every stage of GPT-2 inference for one prompt, with real numbers and pictures",
        description="Run one prompt through the model and report each stage: tokens, embeddings, "
        "Q/K/V and attention of a chosen layer and head, residual adds, the MLP, the residual "
        "stream per layer with a logit lens, the final distribution and what each sampling "
        "strategy picks.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help=f"a Hugging Face GPT-2 directory, a jaxgpt run directory, or a preset with RANDOM "
        f"weights ({', '.join(PRESETS)})",
    )
    parser.add_argument("--prompt", required=True, help="the text to trace")
    parser.add_argument("--layer", type=int, default=0, help="block shown in detail (default 0)")
    parser.add_argument("--head", type=int, default=0, help="attention head shown (default 0)")
    parser.add_argument(
        "--token",
        type=int,
        default=None,
        help="position whose attention is written out as a weighted sum of values; negative "
        "counts from the end (default: -1, the last)",
    )
    parser.add_argument("--top-k", type=int, default=5, help="next-token candidates listed (5)")
    parser.add_argument("--temperature", type=float, default=0.8, help="for the sampling demo")
    parser.add_argument("--top-p", type=float, default=0.9, help="for the sampling demo (0.9)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampling demo (0)")
    parser.add_argument("--numbers", type=int, default=4, help="numbers shown per vector (4)")
    parser.add_argument(
        "--out", type=Path, default=None, help="write report.txt, PNG figures and trace.html here"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.numbers <= 64:
        raise InputError(f"--numbers must be from 1 to 64, got {args.numbers}")
    if args.out is not None:
        check_output_dir(args.out, "--out")  # before the model is loaded and traced
    model = load_model(args.model)
    result = trace(
        model.params,
        model.config,
        model.tokenizer,
        args.prompt,
        layer=args.layer,
        head=args.head,
        token=args.token,
        top_k=args.top_k,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        source=model.source,
    )
    report = format_report(result, numbers=args.numbers)
    print(report)
    if args.out is not None:
        print(f"writing figures to {args.out} ...", file=sys.stderr)
        paths = save_trace(result, args.out, report=report)
        print(f"\nwrote {len(paths)} files to {args.out}:")
        for path in paths.values():
            print(f"  {path}")
    return 0
