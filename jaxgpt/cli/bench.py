"""`jaxgpt bench WORKLOAD`: time a workload, print a table, optionally write JSON."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

from jaxgpt.bench.timing import device_peak
from jaxgpt.config import PRESETS, get_preset
from jaxgpt.errors import InputError
from jaxgpt.flops import device_name
from jaxgpt.plot import check_output_path
from jaxgpt.quantize import check_weights

# Workload name → module under jaxgpt.bench defining `run(args) -> list[dict]`.
WORKLOADS: dict[str, str] = {
    "forward": "jaxgpt.bench.forward",
    "train": "jaxgpt.bench.train",
    "decode": "jaxgpt.bench.decode",
    "attention": "jaxgpt.bench.attention",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark a workload (tokens/s, TFLOP/s, MFU)",
        description="Benchmark jaxgpt workloads. Compilation is timed apart from steady state; "
        "figures are medians over --steps repeats with their spread.",
    )
    parser.add_argument("workload", choices=[*WORKLOADS, "all"], help="what to time")
    parser.add_argument("--model", default="tiny", help=f"preset ({', '.join(PRESETS)})")
    parser.add_argument("--batch", type=int, default=None, help="batch size (workload default)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (workload default)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--weights",
        default="float32",
        metavar="{float32,bfloat16,int8}",
        help="decode only: store the weights in this format (jaxgpt.quantize; default float32)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed repeats (default 5)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.set_defaults(func=run)


def human(value: float | int) -> str:
    """A number as a person reads it: 4 significant digits, thousands separated.

    497123.4 → "497,100"; 1234.5 → "1,234"; 12.3456 → "12.35"; 0.00123 → "0.00123";
    integers in full: 124439808 → "124,439,808". Below 1e-4 the exponent stays: "1.234e-05".
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value) or value == 0:
        return f"{value:g}"
    rounded = float(f"{value:.4g}")
    return f"{rounded:,.0f}" if abs(rounded) >= 1000 else f"{value:.4g}"


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of the rows (union of their keys, numbers through `human`)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]

    def cell(v: object) -> str:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return human(v)
        return "" if v is None else str(v)

    table = [keys] + [[cell(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(keys))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    for name in ("batch", "seq"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name} must be >= 1, got {value}")
    config = get_preset(args.model)  # an unknown preset fails here, before any timing
    if args.json is not None:  # and so does an output path that cannot be written
        check_output_path(args.json, "--json")
    check_weights(args.weights)
    if args.weights != "float32" and args.workload not in ("decode", "all"):
        raise InputError(f"--weights applies to the decode workload only, not {args.workload}")
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    # ... and a --seq the model cannot run (decode needs room for at least one new token).
    seq_limits = {"forward": config.block_size, "train": config.block_size}
    seq_limits["decode"] = config.block_size - 1
    for name in names:
        if args.seq is not None and args.seq > seq_limits.get(name, args.seq):
            raise InputError(
                f"--seq {args.seq} is too long for {name} on {args.model!r} (block_size "
                f"{config.block_size}): at most {seq_limits[name]}"
            )
    peak, source = device_peak(args.dtype)
    device = device_name()
    print(f"MFU is relative to a peak of {peak / 1e12:.3g} TFLOP/s: {source}", file=sys.stderr)
    rows: list[dict] = []
    for name in names:
        print(f"== {name}", file=sys.stderr)
        module = importlib.import_module(WORKLOADS[name])
        new_rows = module.run(args)
        rows += [
            {"workload": name, **row, "peak_tflops": peak / 1e12, "device": device}
            for row in new_rows
        ]
        print(format_rows(new_rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}", file=sys.stderr)
    return 0
