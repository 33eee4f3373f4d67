"""Timing that a benchmark can trust: compilation measured apart from steady state, every timed
region closed with `block_until_ready`, and the median and spread over repeats reported."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax


@dataclass(frozen=True)
class Timing:
    """Seconds for the first call (compile + run) and for each steady-state repeat."""

    first_call_s: float
    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def spread(self) -> float:
        """(max - min) / median over the repeats: how noisy the measurement was."""
        return (max(self.times_s) - min(self.times_s)) / self.median_s

    def as_dict(self) -> dict[str, float]:
        return {
            "first_call_s": self.first_call_s,
            "median_s": self.median_s,
            "min_s": min(self.times_s),
            "max_s": max(self.times_s),
            "spread": self.spread,
            "repeats": len(self.times_s),
        }


def time_fn(
    fn: Callable[..., Any],
    *args: Any,
    repeats: int = 5,
    warmup: int = 1,
    setup: Callable[[], tuple] | None = None,
) -> Timing:
    """Time `fn(*args)`.

    The first call (which compiles) is timed on its own; `warmup` more calls are untimed; then
    `repeats` calls are timed one by one. With `setup`, each call gets fresh arguments from
    `setup()` (outside the timed region) — needed when `fn` donates its inputs.
    """

    def call() -> float:
        call_args = setup() if setup is not None else args
        start = time.perf_counter()
        jax.block_until_ready(fn(*call_args))
        return time.perf_counter() - start

    first = call()
    for _ in range(warmup):
        call()
    return Timing(first_call_s=first, times_s=tuple(call() for _ in range(repeats)))


def peak_memory_bytes(device: jax.Device | None = None) -> tuple[int | None, str]:
    """Peak memory: the device allocator's peak where the backend reports it, else process RSS."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


_PEAKS: dict[str, tuple[float, str]] = {}


def device_peak(dtype: str) -> tuple[float, str]:
    """`jaxgpt.flops.peak_flops`, measured at most once per process and dtype."""
    if dtype not in _PEAKS:
        from jaxgpt.flops import peak_flops

        _PEAKS[dtype] = peak_flops(dtype)
    return _PEAKS[dtype]


def throughput_row(timing: Timing, tokens: int, flops_per_token: float, dtype: str) -> dict:
    """The columns every workload reports: step time, tokens/s, achieved TFLOP/s and MFU."""
    peak, _ = device_peak(dtype)
    seconds = timing.median_s
    achieved = tokens * flops_per_token / seconds
    memory, _ = peak_memory_bytes()
    return {
        "compile_s": timing.first_call_s - seconds,
        "step_ms": 1e3 * seconds,
        "spread": timing.spread,
        "tokens_per_s": tokens / seconds,
        "tflops": achieved / 1e12,
        "mfu": achieved / peak,
        "peak_mem_gb": memory / 1e9,
    }
