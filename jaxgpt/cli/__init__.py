"""The `jaxgpt` command line: one subcommand per module of this package.

Each module defines `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
Errors jaxgpt raises for bad input (`JaxgptError`) become one readable line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from jaxgpt.errors import JaxgptError

# Subcommand modules, in the order `jaxgpt --help` lists them.
COMMANDS = (
    "prepare", "train", "launch", "eval", "sample", "chat", "pairs", "score", "trace", "explore",
    "plot", "params", "bench",
)  # fmt: skip


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (argparse prints the whole usage first),
    like every other jaxgpt error; `--help` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="jaxgpt",
        description="GPT-2 as pure JAX functions: train, sample, trace and benchmark.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"jaxgpt.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except JaxgptError as err:
        print(f"jaxgpt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxgpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
