"""The last step of `benchmarks/device_check.sh`: check the steps' JSON rows, merge, summarise.

    python benchmarks/device_check_report.py DIR [--dry-run]

Reads DIR/kernels.json, DIR/attention_T*.json, DIR/train.json, DIR/decode*.json; fails (exit 1,
naming what is missing or wrong) unless every expected row is there with finite figures: each
attention backend (xla, cudnn and pallas on a GPU; xla and pallas in a dry run) forward and
forward+backward at each T, the train row, decode at batch 1 and 8. Writes DIR/device_check.json
(all rows plus a summary) and prints a short table, including the two ratios the GPU targets
are stated in: Pallas flash fwd+bwd TFLOP/s ÷ cuDNN's, and batch-1 decode's weight bytes per
second ÷ the GPU's data-sheet HBM bandwidth.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Data-sheet HBM bandwidth (bytes/s) of the SXM parts, for the batch-1 decode bound.
HBM_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "B200": 8.0e12, "L4": 0.3e12}


class CheckFailed(Exception):
    pass


def load(path: Path) -> list[dict]:
    if not path.exists():
        raise CheckFailed(f"{path.name} is missing (its step wrote nothing)")
    rows = json.loads(path.read_text())
    if not rows:
        raise CheckFailed(f"{path.name} has no rows")
    return rows


def finite(row: dict, key: str, where: str) -> float:
    value = row.get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckFailed(f"{where}: {key} is {value!r}, expected a positive finite number")
    return float(value)


def check_attention(out: Path, dry_run: bool) -> tuple[list[dict], dict]:
    files = sorted(out.glob("attention_T*.json"), key=lambda p: int(p.stem.split("_T")[1]))
    if not files:
        raise CheckFailed("no attention_T*.json files")
    backends = {"xla", "pallas"} if dry_run else {"xla", "cudnn", "pallas"}
    rows, ratios = [], {}
    for path in files:
        got = load(path)
        rows += got
        seq = got[0]["seq"]
        by_key = {(r["backend"], r["pass"]): r for r in got}
        for backend in backends:
            for pass_ in ("fwd", "fwd+bwd"):
                row = by_key.get((backend, pass_))
                where = f"attention T={seq} {backend} {pass_}"
                if row is None:
                    raise CheckFailed(f"{where}: row missing (backends found: "
                                      f"{sorted({b for b, _ in by_key})})")  # fmt: skip
                finite(row, "tokens_per_s", where)
                if not dry_run:
                    finite(row, "tflops", where)
                if pass_ == "fwd" and not row["max_err_vs_xla"] < 0.05:
                    raise CheckFailed(f"{where}: max_err_vs_xla {row['max_err_vs_xla']}")
        if not dry_run:
            ratios[f"pallas/cudnn fwd+bwd TFLOP/s at T={seq}"] = (
                by_key[("pallas", "fwd+bwd")]["tflops"] / by_key[("cudnn", "fwd+bwd")]["tflops"]
            )
    return rows, ratios


def check_decode(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("decode*.json")):
        got = load(path)
        rows += got
        batches = {r["batch"] for r in got}
        if batches != {1, 8}:
            raise CheckFailed(f"{path.name}: batches {sorted(batches)}, expected 1 and 8")
        for row in got:
            finite(row, "decode_tokens_per_s", f"{path.name} batch {row['batch']}")
    return rows


def hbm_fraction(row: dict, device: str) -> float | None:
    """Batch-1 decode: weight bytes read per second ÷ data-sheet HBM bandwidth (None: unknown)."""
    for name, bandwidth in HBM_BANDWIDTH.items():
        if name in device:
            return row["weights_MB"] * 1e6 * row["decode_tokens_per_s"] / bandwidth
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the device check's output directory")
    parser.add_argument("--dry-run", action="store_true", help="CPU dry run: no cuDNN rows")
    args = parser.parse_args()
    try:
        kernels = load(args.out / "kernels.json")
        bad = [r["check"] for r in kernels if not r["ok"]]
        if bad:
            raise CheckFailed(f"kernel checks failed: {bad}")
        if any(r["interpreted"] != args.dry_run for r in kernels):
            raise CheckFailed("kernel checks ran in the wrong mode (interpreter on a GPU run?)")
        attention, summary = check_attention(args.out, args.dry_run)
        (train,) = load(args.out / "train.json")
        for key in ("tokens_per_s", "mfu"):
            finite(train, key, "train")
        decode = check_decode(args.out)
    except CheckFailed as err:
        print(f"device_check_report: FAILED: {err}", file=sys.stderr)
        return 1

    device = train["device"]
    summary["train tokens/s"] = train["tokens_per_s"]
    summary["train MFU"] = train["mfu"]
    for row in decode:
        label = f"decode batch {row['batch']} ({row.get('weights', 'float32')} weights) tokens/s"
        summary[label] = row["decode_tokens_per_s"]
        fraction = hbm_fraction(row, device) if row["batch"] == 1 else None
        if fraction is not None:
            summary[label.replace("tokens/s", "fraction of HBM bound")] = fraction
    report = {
        "device": device,
        "dry_run": args.dry_run,
        "summary": summary,
        "kernels": kernels,
        "attention": attention,
        "train": [train],
        "decode": decode,
    }
    (args.out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"device: {device}{' (dry run: CPU, interpreter, tiny shapes)' if args.dry_run else ''}")
    print(f"kernels: {len(kernels)} checks passed")
    print(f"{'attention (bfloat16)':28s} {'T':>5s} {'fwd TFLOP/s':>12s} {'fwd+bwd TFLOP/s':>16s}")
    for row in attention:
        if row["pass"] == "fwd":
            bwd = next(r for r in attention if (r["backend"], r["seq"], r["pass"]) ==
                       (row["backend"], row["seq"], "fwd+bwd"))  # fmt: skip
            print(f"{row['backend']:28s} {row['seq']:5d} {row.get('tflops', math.nan):12.3g} "
                  f"{bwd.get('tflops', math.nan):16.3g}")  # fmt: skip
    for label, value in summary.items():
        print(f"{label:60s} {value:10.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
