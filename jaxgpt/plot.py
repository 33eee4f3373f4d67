"""The loss curve of a run: train loss per logged step and train/val loss at each evaluation;
accuracies logged at the evaluations (held-out arithmetic, `eval.tasks`) on a second axis."""

from __future__ import annotations

import json
from pathlib import Path

from jaxgpt.errors import InputError

METRICS_FILE = "metrics.jsonl"
# Formats matplotlib's Agg backend writes (a subset of `FigureCanvasBase.filetypes`).
IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".eps", ".ps")


def check_output_path(path: Path, what: str, suffixes: tuple[str, ...] | None = None) -> None:
    """InputError unless `path` can be written: its folder exists and its suffix is known.

    Called before any long work, so a typo in an output path costs nothing.
    """
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise InputError(
            f"{what} {path}: unknown file type {path.suffix or '(none)'!r}; "
            f"expected one of {', '.join(suffixes)}"
        )
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise InputError(f"{what} {path}: the directory {path.parent} does not exist")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise InputError(f"{run_dir} has no {METRICS_FILE}; is it a jaxgpt run directory?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def check_output_dir(path: Path, what: str) -> None:
    """InputError unless `path` is a directory or can be created (no file in its way)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} {path}: {existing} is a file, not a directory")


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the loss curve of `run_dir` to `out` (default `run_dir/loss.png`); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "loss.png"
    check_output_path(out, "--out", suffixes=IMAGE_SUFFIXES)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train and not evals:
        raise InputError(f"{run_dir}/{METRICS_FILE} has no logged steps yet")
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.6,
                label="train loss (logged steps)")  # fmt: skip
    evals = [r for r in evals if "val_loss" in r]  # (a PPO run evaluates no losses)
    if evals:
        steps = [r["step"] for r in evals]
        ax.plot(steps, [r["train_loss"] for r in evals], "o-", label="train loss (eval batches)")
        ax.plot(steps, [r["val_loss"] for r in evals], "s-", label="val loss")
        best = min(evals, key=lambda r: r["val_loss"])
        ax.set_title(f"{Path(run_dir).name}: best val loss {best['val_loss']:.4f} "
                     f"at step {best['step']}")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    accuracies = _accuracy_series(evals)
    if accuracies:  # the arithmetic demo's held-out accuracy and eval.tasks, on a second axis
        acc_ax = ax.twinx()
        markers = iter("^v<>DPX*" * 4)
        for label, (acc_steps, acc) in accuracies.items():
            (line,) = acc_ax.plot(acc_steps, acc, f"{next(markers)}--", lw=1)
            handles, labels = [*handles, line], [*labels, label]
        acc_ax.set_ylabel("accuracy (%)")
        acc_ax.set_ylim(0, 100)
    ax.legend(handles, labels)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _accuracy_series(evals: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Legend label → (steps, accuracy in %) for every accuracy the eval rows carry."""
    keys = [k for k in dict.fromkeys(k for r in evals for k in r) if k == "held_out_acc"
            or (k.startswith("task/") and k.endswith(("/acc", "/acc_norm")))]  # fmt: skip
    series = {}
    for key in keys:
        rows = [r for r in evals if key in r]
        label = "held-out accuracy (A ≡ B mod 7)" if key == "held_out_acc" else key
        series[label] = ([r["step"] for r in rows], [100 * r[key] for r in rows])
    return series
