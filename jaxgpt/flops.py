"""Model FLOPs per token and device peak FLOP/s, for throughput and MFU (model FLOPs utilisation).

FLOPs follow the usual accounting (Kaplan et al. 2020; PaLM appendix B): a matmul with N weights
costs 2·N FLOPs per token forward and 4·N backward, plus attention's two T×T products
(QKᵀ and AV: 4·L·T·D per token forward, counting the full square as is customary).
N counts every matmul weight: the blocks and the tied output projection (wte), not wpe.
"""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig
from jaxgpt.params import count_params


def matmul_params(config: GPTConfig) -> int:
    """Weights that enter a matmul per token: all parameters except the position embedding."""
    return count_params(config) - config.block_size * config.n_embd


def flops_per_token(config: GPTConfig, seq_len: int, *, training: bool) -> float:
    """Model FLOPs for one token at context length `seq_len` (training = forward + backward)."""
    forward = 2 * matmul_params(config) + 4 * config.n_layer * seq_len * config.n_embd
    return 3.0 * forward if training else float(forward)


# Dense (no sparsity) peak FLOP/s per device from the vendors' data sheets, by compute dtype.
# "float32" on NVIDIA is plain FP32 (XLA uses TF32 only when asked); TPUs run float32 matmuls as
# several bfloat16 passes, so only the bfloat16 peak is listed for them.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "B200": {"bfloat16": 2250e12, "float16": 2250e12, "float32": 80e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 30e12},
    "A10G": {"bfloat16": 70e12, "float16": 70e12, "float32": 31e12},
    "V100": {"float16": 125e12, "float32": 15.7e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},  # v5e
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v5": {"bfloat16": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12},  # v6e (Trillium)
}


def device_name(device: jax.Device | None = None) -> str:
    """What a benchmark ran on: the accelerator's kind, or for a CPU its model name and cores.

    Ratios between libraries depend on the CPU (its vector units, and which BLAS its vendor
    tunes for), so benchmark reports name it.
    """
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        return device.device_kind
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def device_peak_flops(device: jax.Device | None = None, dtype: str = "float32") -> float | None:
    """The table's peak for `device` (default: the first device) and dtype, or None if unknown.

    On CPU there is no data-sheet figure; use `measure_matmul_flops()` instead.
    """
    device = device or jax.devices()[0]
    kind = device.device_kind
    # Longest names first, so "TPU v5 lite" wins over "TPU v5".
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name in kind:
            table = PEAK_FLOPS[name]
            return table.get(dtype) or table.get("bfloat16")
    return None


def measure_matmul_flops(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """Achieved FLOP/s of a jitted n×n matmul on the default device: a measured peak for CPUs."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for the default device: the table, else a measurement."""
    device = jax.devices()[0]
    peak = device_peak_flops(device, dtype)
    if peak is not None:
        return peak, f"data sheet for {device.device_kind} ({dtype})"
    source = (
        f"no data-sheet figure for {device_name(device)}; measured at start-up with a jitted "
        f"2048x2048 {dtype} matmul"
    )
    return measure_matmul_flops(dtype=dtype), source
