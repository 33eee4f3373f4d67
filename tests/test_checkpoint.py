"""Checkpoints: a run killed with SIGKILL (and one stopped with Ctrl-C) resumes bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxgpt import checkpoint
from jaxgpt.experiment import load_experiment
from jaxgpt.plot import read_metrics
from jaxgpt.train import run

ROOT = Path(__file__).resolve().parent.parent
STEPS = 120


def start_cli(exp_file: Path, run_dir: Path, data_root: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-m", "jaxgpt", "train", str(exp_file), "--out", str(run_dir),
            "--data-dir", str(data_root), "--quiet", "--no-sample"]  # fmt: skip
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop_after_checkpoint(proc: subprocess.Popen, run_dir: Path, after: int, sig: int) -> int:
    """Send `sig` once a checkpoint later than step `after` exists; return the exit code."""
    deadline = time.monotonic() + 300
    while (checkpoint.latest_step(run_dir) or 0) <= after:
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(sig)
    return proc.wait(timeout=300)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_killed_and_interrupted_run_resumes_exactly(tmp_path, tiny_experiment_file):
    exp_file = tiny_experiment_file(steps=STEPS, eval_interval=40, ckpt_interval=10)
    exp = load_experiment(str(exp_file))
    data_root = tmp_path / "data"

    # The reference: one uninterrupted run.
    reference = run(exp, run_dir=tmp_path / "ref", data_root=data_root, progress=False,
                    sample=False)  # fmt: skip
    assert reference.step == STEPS

    # The same run, SIGKILLed after its first checkpoint, then Ctrl-C'd, then finished.
    run_dir = tmp_path / "resumed"
    code = stop_after_checkpoint(start_cli(exp_file, run_dir, data_root), run_dir, 0,
                                 signal.SIGKILL)  # fmt: skip
    assert code == -signal.SIGKILL
    killed_at = checkpoint.latest_step(run_dir)
    assert killed_at < STEPS, "the run finished before it could be killed"

    proc = start_cli(exp_file, run_dir, data_root)
    code = stop_after_checkpoint(proc, run_dir, killed_at, signal.SIGINT)
    out = proc.stdout.read().decode()
    assert code == 130 and "interrupted at step" in out, out
    interrupted_at = checkpoint.latest_step(run_dir)
    assert killed_at < interrupted_at < STEPS, "the run finished before it could be interrupted"

    result = run(exp, run_dir=run_dir, data_root=data_root, progress=False, sample=False)
    assert result.step == STEPS
    expected = train_losses(reference.run_dir)
    assert len(expected) == STEPS
    assert train_losses(run_dir) == expected  # bit for bit: floats compared exactly
    evals = lambda d: [r for r in read_metrics(d) if r["kind"] == "eval"]
    assert [(r["step"], r["val_loss"]) for r in evals(run_dir)] == [
        (r["step"], r["val_loss"]) for r in evals(reference.run_dir)
    ]


def test_unfinished_save_is_ignored(tmp_path, tiny_experiment_file):
    """A save cut short leaves a temporary directory: never taken as the latest checkpoint."""
    exp = load_experiment(str(tiny_experiment_file(steps=20, eval_interval=10, ckpt_interval=10)))
    run_dir = tmp_path / "run"
    run(exp, run_dir=run_dir, data_root=tmp_path / "data", progress=False, sample=False)
    partial = run_dir / "checkpoints" / "30.orbax-checkpoint-tmp-1234567"
    partial.mkdir()
    (partial / "garbage").write_bytes(b"\0" * 10)
    assert checkpoint.latest_step(run_dir) == 20
    config, _, _, description = checkpoint.load_run_for_inference(run_dir)
    assert "step 20" in description and config.n_layer == 2
    with pytest.raises(Exception, match="not a jaxgpt run directory"):
        checkpoint.load_run_for_inference(tmp_path)
