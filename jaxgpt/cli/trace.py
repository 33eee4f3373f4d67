"""`jaxgpt trace --model MODEL --prompt TEXT`: follow one prompt through the model, with numbers.

Prints the report of `jaxgpt.trace.format_report`; with `--out DIR` also writes report.txt,
attention heatmaps, the top-k bar chart and a self-contained trace.html there.

`jaxgpt trace --model A --compare B [C ...] --prompt MESSAGE --answer TEXT` (or
`--conversation FILE.json`) instead shows one answer's journey across models: each token's
log-probability under every model side by side, the tokens SFT trains marked
(`jaxgpt.trace_answers`); `--html FILE` writes it as a colour-coded table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxgpt import atomic, chat
from jaxgpt.cli.common import load_model
from jaxgpt.config import PRESETS
from jaxgpt.errors import InputError, JaxgptError
from jaxgpt.plot import check_output_dir, check_output_path
from jaxgpt.trace import format_report, save_trace, trace


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "trace",
        help="show every stage of GPT-2 inference for one prompt, with real numbers and pictures",
        description="Run one prompt through the model and report each stage: tokens, embeddings, "
        "Q/K/V and attention of a chosen layer and head, residual adds, the MLP, the residual "
        "stream per layer with a logit lens, the final distribution and what each sampling "
        "strategy picks. With --compare: one conversation's answer scored token by token "
        "under several models (base, SFT, PPO, DPO, ...), side by side.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help=f"a Hugging Face GPT-2 directory, a jaxgpt run directory, or a preset with RANDOM "
        f"weights ({', '.join(PRESETS)})",
    )
    parser.add_argument(
        "--prompt", default=None, help="the text to trace (with --compare: the user's message)"
    )
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
    compare = parser.add_argument_group("an answer across models (--compare)")
    compare.add_argument(
        "--compare", nargs="+", metavar="MODEL", default=None,
        help="score one conversation under --model and these models (same tokenizer), each "
        "answer token's log-probability side by side",
    )  # fmt: skip
    compare.add_argument("--answer", default=None, help="the assistant's answer to --prompt")
    compare.add_argument(
        "--conversation", type=Path, default=None,
        help='a JSON file: a messages list [{"role", "content"}, ...] or {"messages": [...]}, '
        "with at least one assistant turn (instead of --prompt/--answer)",
    )  # fmt: skip
    compare.add_argument("--html", type=Path, default=None, help="also write a colour-coded table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.compare is not None:
        return run_compare(args)
    for name in ("answer", "conversation", "html"):
        if getattr(args, name) is not None:
            raise InputError(f"--{name} goes with --compare (an answer across models)")
    if args.prompt is None:
        raise InputError("--prompt is required: the text to trace")
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


# --------------------------------------------------------------------------- --compare


def read_conversation(args: argparse.Namespace) -> list[dict]:
    """The conversation to score, from --conversation or from --prompt and --answer (checked)."""
    if args.conversation is not None:
        if args.prompt is not None or args.answer is not None:
            raise InputError("give --conversation or --prompt with --answer, not both")
        try:
            record = json.loads(args.conversation.read_text(encoding="utf-8"))
        except OSError as err:
            raise InputError(f"cannot read --conversation {args.conversation}: {err}") from err
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"--conversation {args.conversation} is not JSON text: {err}") from err
        try:
            if isinstance(record, list):
                return chat.check_messages(record, training=True)
            return chat.conversation_from_record(record)
        except JaxgptError as err:
            raise InputError(f"--conversation {args.conversation}: {err}") from err
    if args.prompt is None or args.answer is None:
        raise InputError("--compare needs --prompt (the user's message) and --answer, or "
                         "--conversation FILE.json")  # fmt: skip
    return [{"role": "user", "content": args.prompt}, {"role": "assistant", "content": args.answer}]


def column_names(specs: list[str]) -> list[str]:
    """Short, distinct column titles: each model's directory name (or preset)."""
    names = []
    for spec in specs:
        name = Path(spec.rstrip("/")).name or spec
        names.append(name if name not in names else f"{name}#{len(names) + 1}")
    return names


def run_compare(args: argparse.Namespace) -> int:
    from jaxgpt.trace_answers import compare_answers, format_table, render_html

    if args.out is not None:
        raise InputError("--out is the one-model trace's; with --compare write --html FILE")
    messages = read_conversation(args)
    if args.html is not None:
        check_output_path(args.html, "--html", (".html", ".htm"))
    specs = [args.model, *args.compare]
    loaded = [load_model(spec) for spec in specs]
    names = column_names(specs)
    comparison = compare_answers(list(zip(names, loaded)), messages)
    print(format_table(comparison))
    if args.html is not None:
        atomic.write_text(args.html, render_html(comparison, [m.source for m in loaded]))
        print(f"\nwrote {args.html}")
    return 0
