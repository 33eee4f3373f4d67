"""Multi-host training for real: 2 local processes x 2 simulated CPU devices form one 4-device job.

Each process is a `jaxgpt train` started the way a cluster would start it (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) or through `jaxgpt launch`; collectives go through gloo. The
reference is one process on 4 simulated devices with the same mesh.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt import checkpoint, sharding
from jaxgpt.cli import main as cli_main
from jaxgpt.cli.launch import _first_failure, process_env
from jaxgpt.errors import ConfigError
from jaxgpt.experiment import load_experiment
from jaxgpt.plot import read_metrics
from jaxgpt.train import run
from tests.conftest import TINY_EXPERIMENT

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
JOB_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
TIMEOUT_S = 240  # per job; a hang fails the test instead of stalling CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
    env.update(
        PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )  # fmt: skip
    return env


def train_argv(exp_file: Path, run_dir: Path, data_root: Path, mesh: str, *extra: str) -> list:
    return ["train", str(exp_file), "--out", str(run_dir), "--data-dir", str(data_root),
            "--mesh", mesh, "--quiet", *extra]  # fmt: skip


def start_job(argv: list, n: int = 2, devices: int = 2) -> list[subprocess.Popen]:
    """`n` processes of one job, each with the variables docs/sharding.md shows."""
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "jaxgpt", *argv],
            env=process_env(base_env(devices), port, n, i, devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[tuple]:
    """(exit code, stdout, stderr) of every process; kills them all on a timeout (a hang)."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the job did not finish within {timeout} s (a hang)")
    return results


def train_rows(run_dir: Path) -> list[dict]:
    if not (run_dir / checkpoint.METRICS_FILE).is_file():
        return []
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


def last_step(run_dir: Path) -> int:
    rows = train_rows(run_dir)
    return rows[-1]["step"] if rows else 0


def assert_losses_equal(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5)


def wait_for(condition, what: str, procs: list[subprocess.Popen], timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            assert p.poll() is None, f"a process ended early: {p.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def exp_file(tmp_path_factory, tiny_corpus):
    path = tmp_path_factory.mktemp("multihost") / "tiny.py"
    path.write_text(
        TINY_EXPERIMENT.format(
            source=str(tiny_corpus), steps=STEPS, eval_interval=3, ckpt_interval=3
        )
    )
    return path


@pytest.fixture(scope="module")
def runs(exp_file):
    """Two runs of the tiny experiment, started together (their waits overlap):

    * one process on 4 simulated devices, mesh data=2,fsdp=2 — the reference;
    * `jaxgpt launch --processes 2 --devices-per-process 2 -- train ... --mesh data=2,fsdp=2` into
      a fresh data root (process 0 prepares it while process 1 waits).

    Returns (reference run dir, two-process run dir, the launcher's stdout, its stderr)."""
    root = exp_file.parent
    one = train_argv(exp_file, root / "one", root / "data-one", "data=2,fsdp=2", "--no-sample")
    two = ["launch", "--processes", "2", "--devices-per-process", "2", "--",
           *train_argv(exp_file, root / "two", root / "data-two", "data=2,fsdp=2")]  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, "-m", "jaxgpt", *argv], env=base_env(devices),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv, devices in ((one, 4), (two, 1))
    ]  # fmt: skip
    (code_one, _, err_one), (code_two, out, err) = finish(procs)
    assert code_one == 0, err_one[-3000:]
    assert code_two == 0, out[-2000:] + err[-4000:]
    return root / "one", root / "two", out, err


@pytest.fixture(scope="module")
def reference(runs):
    return runs[0]


@pytest.fixture(scope="module")
def two_process_run(runs):
    return runs[1:]


def test_two_processes_train_like_one(reference, two_process_run):
    run_dir, out, err = two_process_run
    assert_losses_equal(train_rows(run_dir), train_rows(reference))
    rows = read_metrics(run_dir)
    # Exactly one line per step and evaluation: only process 0 writes metrics.jsonl.
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("train", 1), ("train", 2), ("train", 3), ("eval", 3),
        ("train", 4), ("train", 5), ("train", 6), ("eval", 6),
    ]  # fmt: skip
    ref_evals = [r["val_loss"] for r in read_metrics(reference) if r["kind"] == "eval"]
    np.testing.assert_allclose([r["val_loss"] for r in rows if r["kind"] == "eval"], ref_evals,
                               rtol=1e-5)  # fmt: skip
    # The end of the run: the final checkpoint, the plot, and the sample (process 0 only).
    assert checkpoint.latest_step(run_dir) == STEPS
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert "[0] ---" in out and "[1] ---" not in out and "[1] tiny:" not in out
    assert err.count("preparing") == 1 and "[0] preparing" in err  # process 0 prepared the data


def test_checkpoint_of_two_processes_restores_in_one(reference, two_process_run, tmp_path):
    run_dir, _, _ = two_process_run
    _, params, _, _ = checkpoint.load_run_for_inference(run_dir)
    _, ref_params, _, _ = checkpoint.load_run_for_inference(reference)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # 2 -> 1: resume the two-process run's step-3 checkpoint in this (one-device) process.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / checkpoint.CHECKPOINT_DIR / str(STEPS))
    exp = load_experiment(str(run_dir.parent / "tiny.py"))  # this process has one device
    result = run(exp, run_dir=resumed, data_root=run_dir.parent / "data-two", progress=False,
                 sample=False)  # fmt: skip
    assert result.step == STEPS
    assert_losses_equal(train_rows(resumed), train_rows(reference))


def test_one_process_checkpoint_resumes_in_two_with_tensor_parallelism(reference, exp_file):
    # 1 -> 2: the one-process run's step-3 checkpoint, resumed by 2 processes on data=2,tensor=2.
    run_dir = exp_file.parent / "one-to-two"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / checkpoint.CHECKPOINT_DIR / str(STEPS))
    argv = train_argv(exp_file, run_dir, exp_file.parent / "data-one", "data=2,tensor=2",
                      "--no-sample")  # fmt: skip
    results = finish(start_job(argv))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert "resuming" in results[1][2]
    assert_losses_equal(train_rows(run_dir), train_rows(reference))
    assert checkpoint.latest_step(run_dir) == STEPS


def test_sigterm_stops_every_process_and_a_lost_process_stops_the_job(tmp_path, tiny_corpus):
    exp_file = tmp_path / "long.py"
    exp_file.write_text(
        TINY_EXPERIMENT.format(
            source=str(tiny_corpus), steps=2000, eval_interval=1000, ckpt_interval=1000
        )
    )
    run_dir, data_root = tmp_path / "run", tmp_path / "data"
    argv = train_argv(exp_file, run_dir, data_root, "data=2,fsdp=2", "--no-sample")
    procs = start_job(argv)
    wait_for(lambda: last_step(run_dir) >= 3, "three steps", procs)
    # SIGTERM to ONE process: every process stops after the same step, with one checkpoint.
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs, timeout=60)
    assert [code for code, _, _ in results] == [130, 130], [err[-2000:] for _, _, err in results]
    stopped_at = checkpoint.latest_step(run_dir)
    assert stopped_at == last_step(run_dir) >= 3
    assert f"interrupted at step {stopped_at}" in results[0][1]

    # The job resumes under `jaxgpt launch`; a process killed outright stops the other, which says
    # so in one line, and the launcher names the process that died.
    launcher = subprocess.Popen(
        [sys.executable, "-m", "jaxgpt", "launch", "--processes", "2",
         "--devices-per-process", "2", "--", *argv],
        env=base_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: last_step(run_dir) > stopped_at + 2, "more steps", [launcher])
    os.kill(child_with_process_id(launcher.pid, 1), signal.SIGKILL)
    start = time.monotonic()
    [(code, _, err)] = finish([launcher], timeout=90)
    assert time.monotonic() - start < 90
    assert code == 128 + signal.SIGKILL, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1] == "jaxgpt launch: error: process 1 was killed by SIGKILL", err[-3000:]
    # Process 0 stops either by itself, with one line (when the lost peer fails the collective it
    # is in), or — when it is blocked where it cannot notice — by JAX's heartbeat check, which
    # ends it with JAX's own log. Both within the time bound; seen both ways on this machine.
    lost = [line for line in lines if line.startswith("[0] jaxgpt train: error: process 0 of 2")]
    heartbeat = "[0] F" in err and "JAX distributed service detected fatal errors" in err
    assert heartbeat or (
        len(lost) == 1 and lost[0].endswith("start every process again to resume")
    ), err[-3000:]


def child_with_process_id(parent: int, process_id: int) -> int:
    """The pid of the child of `parent` that runs as JAX_PROCESS_ID=`process_id`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"JAX_PROCESS_ID={process_id}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no child of {parent} runs process {process_id}")


# --------------------------------------------------------------------------- settings and errors


@pytest.mark.parametrize(
    "env,message",
    [
        ({"JAX_NUM_PROCESSES": "2"}, "JAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS is not"),
        ({"JAX_PROCESS_ID": "0"}, "JAX_PROCESS_ID is set but JAX_COORDINATOR_ADDRESS is not"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES is not"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID is not"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
         "process id 2 is out of range: expected 0 .. 1"),
        ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
         "expected HOST:PORT"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
         "JAX_NUM_PROCESSES must be an integer"),
    ],
)  # fmt: skip
def test_inconsistent_job_settings_are_refused(env, message):
    with pytest.raises(ConfigError, match=message):
        sharding.distributed_settings(env=env)


def test_job_settings():
    assert sharding.distributed_settings(env={}) is None
    assert sharding.distributed_settings(env={"SLURM_NTASKS": "1"}) is None
    # A cluster JAX detects by itself: nothing to pass.
    assert sharding.distributed_settings(env={"SLURM_NTASKS": "4"}) == (
        sharding.DistributedSettings(None, None, None)
    )
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}  # fmt: skip
    assert sharding.distributed_settings(env=env) == sharding.DistributedSettings(
        "10.0.0.1:1234", 4, 3
    )
    # Flags win over the variables.
    got = sharding.distributed_settings("h:9", 2, 1, env=env)
    assert got == sharding.DistributedSettings("h:9", 2, 1)


def test_unreachable_coordinator_is_one_line_within_the_timeout(exp_file, tmp_path):
    port = free_port()  # nothing listens there
    env = process_env(base_env(1), port, 2, 1, 1)
    argv = [sys.executable, "-m", "jaxgpt", *train_argv(exp_file, tmp_path / "r", tmp_path / "d",
            "data=2"), "--init-timeout", "2"]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"jaxgpt train: error: could not join the 2-process job at coordinator 127.0.0.1:{port} "
        f"within 2 s as process 1: check that process 0 runs there and that every process has "
        f"the same address and process count (--init-timeout waits longer)"
    ]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["launch", "--", "sample", "gpt2"], "only `train` runs as a multi-process job"),
        (["launch", "--processes", "0", "--", "train", "x"], "--processes must be at least 1"),
        (["launch"], "no command given"),
    ],
)
def test_launch_bad_input(argv, message, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_launch_environment():
    env = process_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"},
                      1234, 3, 2, 4)  # fmt: skip
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"], env["JAX_PLATFORMS"]) == (
        "3",
        "2",
        "cpu",
    )
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    json.dumps(env)  # plain strings only


def test_launch_reports_the_cause_of_a_failure():
    # Process 1 killed, process 0 failing because of it: the launcher names process 1.
    assert _first_failure([1, -signal.SIGKILL]) == (1, -signal.SIGKILL)
    assert _first_failure([2, 2]) == (0, 2)
    assert _first_failure([None, 0]) is None
