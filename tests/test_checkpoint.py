"""Checkpoints: a run killed with SIGKILL (and one stopped with Ctrl-C), or killed in the middle
of a save, resumes bit for bit (dropout included); readers change nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt import atomic, checkpoint
from jaxgpt.errors import CheckpointFormatError
from jaxgpt.experiment import apply_overrides, load_experiment
from jaxgpt.params import init_params
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


def tree_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (directories by their files)."""
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_corpus):
    """A finished 20-step tiny run (checkpoints 10 and 20): (experiment file, run dir, data)."""
    from tests.conftest import TINY_EXPERIMENT

    root = tmp_path_factory.mktemp("finished")
    exp_file = root / "tiny.py"
    exp_file.write_text(
        TINY_EXPERIMENT.format(source=str(tiny_corpus), steps=20, eval_interval=10,
                               ckpt_interval=10)
    )  # fmt: skip
    exp = load_experiment(str(exp_file))
    run(exp, run_dir=root / "run", data_root=root / "data", progress=False, sample=False)
    return exp_file, root / "run", root / "data"


def test_reader_leaves_an_unfinished_save_alone(finished, tmp_path):
    """A save in progress (orbax's temporary directory) is never taken as the latest checkpoint,
    and a reader — `sample`, `trace`, `model.init=<run>` — neither removes it nor changes any
    other file: a training process may be writing it at that moment."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished[1], run_dir)
    partial = run_dir / "checkpoints" / "30.orbax-checkpoint-tmp"  # orbax's name while writing
    partial.mkdir()
    (partial / "garbage").write_bytes(b"\0" * 10)
    before = tree_hashes(run_dir)
    assert checkpoint.latest_step(run_dir) == 20
    config, _, _, description = checkpoint.load_run_for_inference(run_dir)
    assert "step 20" in description and config.n_layer == 2
    assert tree_hashes(run_dir) == before  # the partial save included
    with pytest.raises(CheckpointFormatError, match="not a jaxgpt run directory"):
        checkpoint.load_run_for_inference(tmp_path)


def test_readers_restore_only_the_params(finished, tmp_path):
    """A reader gets exactly the trained params, and reads none of AdamW's moments (twice the
    params' size); a checkpoint of another model is still told apart."""
    from jaxgpt.optim import make_optimizer
    from jaxgpt.train import abstract_train_state

    run_dir = finished[1]
    config, params, _, _ = checkpoint.load_run_for_inference(run_dir)
    exp = load_experiment(str(finished[0]))
    manager = checkpoint.open_reader(run_dir)
    try:
        state, _ = checkpoint.restore(
            manager, 20, abstract_train_state(config, make_optimizer(exp.optim, exp.schedule))
        )
    finally:
        manager.close()
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(got, want)
    # Nor does a reader need the run's experiment.json (the optimiser's settings).
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / checkpoint.EXPERIMENT_FILE).write_text("{not json")
    for got, want in zip(jax.tree.leaves(checkpoint.load_run_for_inference(copy)[1]),
                         jax.tree.leaves(params), strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, want)
    other = jax.eval_shape(lambda: init_params(config.replace(n_embd=64), jax.random.key(0)))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="holds a different model"):
        checkpoint.restore_params(run_dir, 20, other)


# Run in a subprocess: slows orbax's commit (the rename of the temporary directory) of checkpoint
# SLOW_STEP, so that a SIGKILL lands while that save is in progress.
SLOW_COMMIT = """
import asyncio, sys
from pathlib import Path
from orbax.checkpoint._src.path import atomicity

commit = atomicity.AtomicRenameTemporaryPath.finalize

async def slow(self):
    if self._final_path.name == sys.argv[1]:
        Path(sys.argv[2]).write_text("committing")
        await asyncio.sleep(600)
    return await commit(self)

atomicity.AtomicRenameTemporaryPath.finalize = slow
from jaxgpt.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_save_killed_midway_resumes_from_the_previous_checkpoint(finished, tmp_path, capsys):
    """A real interrupted orbax save: SIGKILL while checkpoint 20 (the last) is written, its
    temporary directory holding the arrays, not yet renamed. The resume uses checkpoint 10 —
    intact — recomputes steps 11-20 bit for bit, and finishes."""
    exp_file, _, data_root = finished
    run_dir, marker = tmp_path / "run", tmp_path / "committing"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-c", SLOW_COMMIT, "20", str(marker), "train", str(exp_file), "--out",
            str(run_dir), "--data-dir", str(data_root), "--quiet", "--no-sample"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "checkpoint 20 was never committed"
        time.sleep(0.01)
    partial = run_dir / "checkpoints" / "20.orbax-checkpoint-tmp"
    assert (partial / "state").is_dir()  # the save is under way ...
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert partial.is_dir() and checkpoint.latest_step(run_dir) == 10  # ... and never finished
    before = train_losses(run_dir)
    assert [s for s, _ in before] == list(range(1, 21))

    capsys.readouterr()
    result = run(load_experiment(str(exp_file)), run_dir=run_dir, data_root=data_root,
                 progress=False, sample=False)  # fmt: skip
    assert f"resuming {run_dir} from step 10" in capsys.readouterr().err
    assert result.step == 20 and checkpoint.latest_step(run_dir) == 20
    assert train_losses(run_dir) == before  # steps 11-20 recomputed from checkpoint 10, exactly
    assert not partial.exists()  # the writer removed its own unfinished save


def test_resume_with_dropout_is_exact(finished, tmp_path):
    """docs/training.md: dropout masks depend only on (seed, step, micro-batch), so a run resumed
    from checkpoint 10 logs the same losses and ends with the same parameters, bit for bit, as
    an uninterrupted one — with dropout on."""
    exp_file, _, data_root = finished
    exp = apply_overrides(load_experiment(str(exp_file)), ["model.dropout=0.2"])
    reference = run(exp, run_dir=tmp_path / "ref", data_root=data_root, progress=False,
                    sample=False)  # fmt: skip
    assert checkpoint.read_json(reference.run_dir / "model.json")["resid_dropout"] == 0.2

    # The interrupted run: the same directory as it was at step 10 (checkpoint 20 never made).
    resumed = tmp_path / "resumed"
    shutil.copytree(reference.run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "20")
    result = run(exp, run_dir=resumed, data_root=data_root, progress=False, sample=False)
    assert result.step == 20
    assert train_losses(resumed) == train_losses(reference.run_dir)
    ref_params = checkpoint.load_run_for_inference(reference.run_dir)[1]
    new_params = checkpoint.load_run_for_inference(resumed)[1]
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(new_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_run_files_are_replaced_atomically(tmp_path, monkeypatch):
    """metrics.jsonl and the run files are written to a temporary file and renamed: a write that
    dies midway (here: the disk fails at fsync) leaves the old content whole and no stray file."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    atomic.write_text(path, '{"step": 1}\n{"step": 2}\n')
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_text(path, "x" * 1000)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
