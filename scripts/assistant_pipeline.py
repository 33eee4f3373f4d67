"""The road from a base model to an assistant, end to end: run it, time it, tabulate it.

    python scripts/assistant_pipeline.py                 # everything, in ./pipeline
    python scripts/assistant_pipeline.py --dry-run       # the commands alone
    python scripts/assistant_pipeline.py --table         # the table of ./pipeline, again

Runs, in a fresh working directory (so that no earlier run is resumed and none is touched):

    jaxgpt train chat_sft                                                SFT (part 1)
    jaxgpt pairs --model runs/chat_sft --out data/chat_rm_pairs.jsonl \\
        --n-prompts 8000 --samples 8 --max-pairs 4                       preference pairs
    jaxgpt train chat_dpo                                                DPO (+ NLL) on them
    jaxgpt train chat_rm                                                 reward model on them
    jaxgpt train chat_ppo                                                PPO against it

then prints the per-stage table of docs/chat.md — held-out accuracy (500 problems A ≡ B mod 7,
± one standard error), the reward model's pairwise accuracy on held-out pairs, the KL to the SFT
model, and each command's wall time — and writes it with every command's figures to
`pipeline.json` in the working directory. A failed command stops the pipeline (exit 1), Ctrl-C
too (exit 130; the running command saves its run first), and what ran before stays as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STAGES = (
    # (name, jaxgpt arguments, run directory whose report.json it leaves, or None)
    ("SFT", ["train", "chat_sft"], "runs/chat_sft"),
    ("preference pairs", ["pairs", "--model", "runs/chat_sft", "--out",
                          "data/chat_rm_pairs.jsonl", "--n-prompts", "8000", "--samples", "8",
                          "--max-pairs", "4"], None),
    ("DPO + NLL", ["train", "chat_dpo"], "runs/chat_dpo"),
    ("reward model", ["train", "chat_rm"], "runs/chat_rm"),
    ("PPO (reward model)", ["train", "chat_ppo"], "runs/chat_ppo"),
)  # fmt: skip


def stage_figures(report: dict) -> dict:
    """What the table shows of one run's report.json: held-out accuracy and its standard error,
    the reward model's held-out pairwise accuracy, and the KL to the SFT model (DPO: on answers
    to held-out prompts; PPO: on its last rollout), each None where the stage has none."""
    held_out = report.get("held_out") or {}
    pairs = (report.get("reward") or {}).get("held_out_pairs") or {}
    kl = (report.get("dpo") or {}).get("kl_to_reference")
    if isinstance(kl, dict):  # DPO's is {"mean", "stderr", "n"} over held-out answers
        kl = kl["mean"]
    if kl is None:
        kl = (report.get("ppo") or {}).get("rollout_kl")
    if report.get("stage") == "sft":
        kl = 0.0
    return {
        "held_out_accuracy": held_out.get("accuracy"),
        "held_out_stderr": held_out.get("stderr"),
        "rm_pair_accuracy": pairs.get("accuracy"),
        "rm_pair_stderr": pairs.get("stderr"),
        "kl_to_sft": kl,
        "train_wall_s": report.get("train_wall_s"),
    }


def figures_of(run_dir: Path) -> dict:
    """`stage_figures` of the report.json in `run_dir`."""
    return stage_figures(json.loads((run_dir / "report.json").read_text()))


def table(rows: list[dict]) -> str:
    """The markdown table of docs/chat.md from `run_pipeline`'s rows."""

    def pct(value, err):
        return "—" if value is None else f"{100 * value:.1f} % ± {100 * err:.1f}"

    lines = [
        "| stage | held-out accuracy | reward model, held-out pairs | KL to SFT | wall time |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        f = row.get("figures") or {}
        kl = f.get("kl_to_sft")
        lines.append(
            f"| {row['stage']} | {pct(f.get('held_out_accuracy'), f.get('held_out_stderr'))} | "
            f"{pct(f.get('rm_pair_accuracy'), f.get('rm_pair_stderr'))} | "
            f"{'—' if kl is None else f'{kl:.2f}'} | {row['wall_s']:.0f} s |"
        )
    total = sum(row["wall_s"] for row in rows)
    lines.append(f"| **all** | | | | **{total:.0f} s ({total / 60:.1f} min)** |")
    return "\n".join(lines)


def run_pipeline(workdir: Path, *, log=print) -> list[dict]:
    """Run every stage in `workdir` (each command's output shown as it runs); the rows of the
    table. Raises CalledProcessError when a command fails."""
    rows = []
    for name, args, run in STAGES:
        command = [sys.executable, "-m", "jaxgpt", *args]
        log(f"\n=== {name}: jaxgpt {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(command, cwd=workdir, check=True)
        row = {"stage": name, "command": "jaxgpt " + " ".join(args)}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        if run is not None:
            row["figures"] = figures_of(workdir / run)
        rows.append(row)
        (workdir / "pipeline.json").write_text(json.dumps({"stages": rows}, indent=1) + "\n")
    return rows


def rows_of(workdir: Path) -> list[dict]:
    """The rows of a pipeline that ran in `workdir`: its pipeline.json's commands and wall
    times, with each stage's figures read again from its run's report.json."""
    rows = json.loads((workdir / "pipeline.json").read_text())["stages"]
    runs = {name: run for name, _, run in STAGES}
    for row in rows:
        run = runs.get(row["stage"])
        if run is not None:
            row["figures"] = figures_of(workdir / run)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run SFT → pairs → DPO and pairs → reward model → PPO on the arithmetic "
        "demo, time every stage and print the table of docs/chat.md."
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("pipeline"),
        help="where runs/ and data/ go; must not exist or be empty (pipeline)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    parser.add_argument(
        "--table", action="store_true",
        help="print the table of the pipeline that ran in --workdir again, and stop",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.table:
        if not (args.workdir / "pipeline.json").is_file():
            print(
                f"assistant_pipeline: --workdir {args.workdir} holds no pipeline.json",
                file=sys.stderr,
            )
            return 2
        print(table(rows_of(args.workdir)))
        return 0
    if args.dry_run:
        for name, stage_args, _ in STAGES:
            print(f"jaxgpt {' '.join(stage_args):<100} # {name}")
        return 0
    if args.workdir.exists() and (not args.workdir.is_dir() or any(args.workdir.iterdir())):
        print(
            f"assistant_pipeline: --workdir {args.workdir} exists and is not an empty directory; "
            "give a new one (the pipeline never resumes or overwrites runs)",
            file=sys.stderr,
        )
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        rows = run_pipeline(args.workdir)
    except (KeyboardInterrupt, subprocess.CalledProcessError) as e:
        # Ctrl-C reaches the running command too: it saves its run and exits 130.
        if isinstance(e, KeyboardInterrupt) or e.returncode in (130, -signal.SIGINT):
            print(f"assistant_pipeline: interrupted; runs are in {args.workdir}", file=sys.stderr)
            return 130
        command = " ".join(str(part) for part in e.cmd[2:])  # without the python -m
        print(f"assistant_pipeline: `{command}` failed (exit {e.returncode})", file=sys.stderr)
        return 1
    print("\n" + table(rows))
    print(f"\nfigures and commands: {args.workdir / 'pipeline.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
