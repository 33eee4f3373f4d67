"""`jaxgpt params PRESET`: the parameter table of a model, per component, with shapes."""

from __future__ import annotations

import argparse

from jaxgpt.config import PRESETS, get_preset
from jaxgpt.params import param_table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "params",
        help="print a model's parameter count per component",
        description="Print the parameter table (component, shapes, count) of a preset model.",
    )
    parser.add_argument("preset", metavar="PRESET", help=f"one of: {', '.join(PRESETS)}")
    parser.set_defaults(func=run)


def format_table(rows: list[tuple[str, str, int]]) -> str:
    name_w = max(len(r[0]) for r in rows)
    shape_w = max(len(r[1]) for r in rows)
    lines = [f"{'component':<{name_w}}  {'shapes':<{shape_w}}  {'parameters':>13}"]
    lines.append("-" * len(lines[0]))
    for i, (name, shape, count) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(lines[0]))
        lines.append(f"{name:<{name_w}}  {shape:<{shape_w}}  {count:>13,}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = get_preset(args.preset)
    print(
        f"{args.preset}: {config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, "
        f"vocabulary {config.vocab_size}, context {config.block_size}"
    )
    print(format_table(param_table(config)))
    return 0
