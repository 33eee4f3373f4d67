"""`jaxgpt launch --processes N [--devices-per-process K] -- train EXPERIMENT ...`: a local job.

Starts N `jaxgpt train` processes on this machine that form one multi-process JAX job, the way
N hosts would: each gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES,
its JAX_PROCESS_ID, JAX_PLATFORMS=cpu and K simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=K). Their output lines are prefixed with the
process id. When one process fails, the others stop too (killed if they have not noticed within
GRACE_S) and the launcher exits with that process's code; Ctrl-C and SIGTERM are passed on to
every process (each checkpoints and exits).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

from jaxgpt.errors import InputError

GRACE_S = 45  # after one process fails, how long the others get to notice and exit on their own
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="run `jaxgpt train` as N cooperating processes on this machine (try multi-host)",
        description="Start N local processes that form one multi-process JAX job on CPU devices, "
        "e.g. `jaxgpt launch --processes 2 --devices-per-process 2 -- train shakespeare_char "
        "--mesh data=2,fsdp=2`. Output lines are prefixed with [process id]; if one process "
        "fails the others are stopped. See docs/sharding.md.",
    )
    parser.add_argument(
        "--processes", type=int, default=2, metavar="N", help="number of processes (2)"
    )
    parser.add_argument(
        "--devices-per-process", type=int, default=1, metavar="K",
        help="simulated CPU devices in each process (1); the job has N x K devices",
    )  # fmt: skip
    parser.add_argument(
        "--port", type=int, default=None, help="coordinator port on 127.0.0.1 (a free one)"
    )
    parser.add_argument(
        "job", nargs=argparse.REMAINDER, metavar="-- train EXPERIMENT ...",
        help="the jaxgpt command every process runs",
    )  # fmt: skip
    parser.set_defaults(func=run)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], port: int, n: int, i: int, devices: int) -> dict[str, str]:
    """The environment of process `i` of `n`: the JAX job variables and `devices` CPU devices."""
    flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return dict(
        base,
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(n),
        JAX_PROCESS_ID=str(i),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"]),
        PYTHONUNBUFFERED="1",
    )


def _relay(stream: IO[bytes], out: IO[str], prefix: str, lock: threading.Lock) -> None:
    """Copy `stream` to `out`, `prefix` before every line (and every progress-bar redraw)."""
    pending = b""
    while chunk := stream.read1(65536):
        pending += chunk
        while True:
            cut = min((i for i in (pending.find(b"\n"), pending.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            piece, pending = pending[: cut + 1], pending[cut + 1 :]
            _write(out, prefix, piece, lock)
    if pending:
        _write(out, prefix, pending + b"\n", lock)


def _write(out: IO[str], prefix: str, piece: bytes, lock: threading.Lock) -> None:
    text = piece.decode("utf-8", errors="replace")
    # A progress bar's redraw ends in "\r": it stays on one terminal line, behind the prefix.
    text = "\r" + prefix + text[:-1] if text.endswith("\r") else prefix + text
    with lock:
        out.write(text)
        out.flush()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run(args: argparse.Namespace) -> int:
    command = list(args.job)  # (not `args.command`: that names the jaxgpt subcommand)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise InputError("no command given: expected `-- train EXPERIMENT ...` after the options")
    if command[0] != "train":
        raise InputError(
            f"only `train` runs as a multi-process job, got {command[0]!r}; "
            f"e.g. jaxgpt launch --processes 2 -- train shakespeare_char"
        )
    if args.processes < 1:
        raise InputError(f"--processes must be at least 1, got {args.processes}")
    if args.devices_per_process < 1:
        raise InputError(
            f"--devices-per-process must be at least 1, got {args.devices_per_process}"
        )
    if args.port is not None and not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1 .. 65535, got {args.port}")
    port = args.port or free_port()
    n = args.processes
    print(
        f"jaxgpt launch: {n} processes x {args.devices_per_process} CPU device(s), coordinator "
        f"127.0.0.1:{port}: jaxgpt {' '.join(command)}",
        file=sys.stderr,
    )
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    for i in range(n):
        env = process_env(dict(os.environ), port, n, i, args.devices_per_process)
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxgpt", *command], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        procs.append(proc)
        for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            t = threading.Thread(target=_relay, args=(stream, out, f"[{i}] ", lock), daemon=True)
            t.start()
            relays.append(t)
    return _supervise(procs, relays)


def _supervise(procs: list[subprocess.Popen], relays: list[threading.Thread]) -> int:
    """Wait for every process; on a failure stop the others. The job's exit code."""
    signalled: list[int] = []

    def forward(signum, frame) -> None:
        signalled.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed: tuple[int, int] | None = None  # (process id, exit code) of the first failure
    stop_deadline = None
    try:
        while any(p.poll() is None for p in procs):
            if failed is None and not signalled:
                failed = _first_failure([p.poll() for p in procs])
            if failed is not None and stop_deadline is None:
                i, code = failed
                print(
                    f"jaxgpt launch: process {i} {_describe(code)}; the others stop when they "
                    f"notice (or are killed in {GRACE_S} s)",
                    file=sys.stderr,
                )
                # No SIGTERM: a process asked to stop would try to agree with the lost one first.
                # Each fails in its next collective and says so; JAX's heartbeat (30 s) catches the
                # rest.
                stop_deadline = time.monotonic() + GRACE_S
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                for q in procs:
                    if q.poll() is None:
                        q.kill()
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for t in relays:
        t.join(timeout=5)
    if failed is None and not signalled:
        failed = _first_failure([p.returncode for p in procs])
    if failed is not None:
        i, code = failed
        print(f"jaxgpt launch: error: process {i} {_describe(code)}", file=sys.stderr)
        return code if code > 0 else 128 - code
    if signalled:
        return 130 if signalled[0] == signal.SIGINT else 128 + signal.SIGTERM
    return 0


def _first_failure(codes: list[int | None]) -> tuple[int, int] | None:
    """(process id, exit code) of the failure to report: one killed by a signal is the cause,
    the others' errors its consequence; then the lowest id."""
    failures = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
    return min(failures, key=lambda f: (f[1] >= 0, f[0])) if failures else None
