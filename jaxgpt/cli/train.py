"""`jaxgpt train EXPERIMENT [--set key=value ...]`: train, checkpoint, resume, print a sample."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxgpt.errors import JaxgptError
from jaxgpt.experiment import available_experiments, load_experiment


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from an experiment config (resumes automatically)",
        description="Train the experiment defined in experiments/EXPERIMENT.py (or a .py path). "
        "The run directory keeps config, checkpoints, metrics.jsonl and loss.png; if it already "
        "holds a checkpoint of the same config, training resumes from it exactly.",
    )
    parser.add_argument(
        "experiment",
        metavar="EXPERIMENT",
        help=f"an experiment name ({', '.join(available_experiments())}) or a .py file",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a field, e.g. --set optim.lr=3e-3 --set schedule.max_steps=500",
    )  # fmt: skip
    parser.add_argument(
        "--mesh", default=None, metavar="AXIS=SIZE,...",
        help="device mesh, e.g. data=2,fsdp=4 (default: all devices on data); "
        "same as --set parallel.mesh=...",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="run directory (runs/<name>)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="prepared data root (./data)"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over; the old checkpoints and metrics are moved to OUT/old-<UTC time>/ "
        "(only once the new run is validated)",
    )
    parser.add_argument("--no-sample", action="store_true", help="skip the final sample")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    group = parser.add_argument_group(
        "multi-process jobs",
        "join a job of several processes (one per host); the same as JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES and JAX_PROCESS_ID. SLURM, Open MPI and TPU pods are detected without "
        "them. `jaxgpt launch` starts such a job on this machine. See docs/sharding.md",
    )
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. N-1")
    group.add_argument(
        "--init-timeout", type=int, default=None, metavar="SECONDS",
        help="give up if the processes have not all joined by then (300)",
    )  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxgpt import sharding
    from jaxgpt.train import run as train_run

    overrides = list(args.overrides)
    if args.mesh is not None:
        overrides.append(f"parallel.mesh={args.mesh}")
    exp = load_experiment(args.experiment, overrides)  # bad input fails before joining a job
    # Before anything touches a device: join a multi-host job if the environment describes one.
    multi = sharding.maybe_initialize_distributed(
        args.coordinator, args.num_processes, args.process_id, timeout_s=args.init_timeout
    )
    out = args.out if args.out is not None else Path("runs") / exp.name
    try:
        result = train_run(
            exp, run_dir=out, data_root=args.data_dir, fresh=args.fresh, progress=not args.quiet,
            sample=not args.no_sample,
        )  # fmt: skip
    except RuntimeError as err:  # XLA's errors; in a job, a collective whose peer is gone
        if not multi:
            raise
        sharding.abandon_job(err)
    except JaxgptError as err:
        if not multi:
            raise
        # Leave at once: JAX's shutdown barrier would hold this process until the others time out.
        sharding.exit_with(f"jaxgpt train: error: {err}", code=2)
    if not sharding.is_main_process():
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(
            f"interrupted at step {result.step}: checkpoint saved in {out}; "
            f"run the same command again to resume"
        )
        return 130
    figures = [f"step {result.step}", f"{result.tokens_seen:,} tokens", f"{result.wall_s:.0f} s"]
    if result.val_loss is not None:
        figures.insert(0, f"val loss {result.val_loss:.4f} (train {result.train_loss:.4f})")
    if result.tokens_per_s:
        figures.append(f"{result.tokens_per_s:,.0f} tokens/s, MFU {100 * result.mfu:.1f}%")
    print(f"{exp.name}: " + ", ".join(figures))
    print(f"run directory: {out} (loss curve: {out / 'loss.png'})")
    held_out = (result.report or {}).get("held_out")
    if held_out:
        print(
            f"held-out accuracy: {100 * held_out['accuracy']:.1f}% ± "
            f"{100 * held_out['stderr']:.1f} on {held_out['n']} problems (A ≡ B mod 7, never "
            f"trained) — figures in {out / 'report.json'}"
        )
    if result.sample is not None:
        print("-" * 30 + " sample " + "-" * 30)
        print(result.sample)
    return 0
