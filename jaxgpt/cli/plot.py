"""`jaxgpt plot RUN_DIR`: write the loss curve of a training run to a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxgpt.plot import plot_run


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="plot a run's loss curve",
        description="Plot train and val loss from RUN_DIR/metrics.jsonl to a PNG.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (RUN_DIR/loss.png)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(plot_run(args.run_dir, args.out))
    return 0
