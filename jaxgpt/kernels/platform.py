"""What the Pallas kernels need to know about the platform they run on.

One kernel source serves three targets: Triton on NVIDIA/AMD GPUs, Mosaic on TPUs, and the Pallas
interpreter on CPU (which has no kernel compiler). The choice is made from `jax.default_backend()`
when a kernel is traced, so the same call works everywhere and tests on CPU exercise the very
kernel bodies that GPUs and TPUs compile.

The environment variable `JAXGPT_PALLAS_INTERPRET` overrides that choice: `1` forces the
interpreter everywhere, `0` forbids it (a kernel traced on CPU then raises instead of quietly
running interpreted) — `benchmarks/device_check.sh` sets `0`, so a GPU check cannot pass by
accident in the interpreter.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.experimental import pallas as pl

from jaxgpt.errors import ConfigError

INTERPRET_ENV = "JAXGPT_PALLAS_INTERPRET"


def platform() -> str:
    """ "cpu", "gpu" or "tpu" — the platform the kernels will be traced for."""
    return jax.default_backend()


def use_interpreter() -> bool:
    """CPU has no Pallas compiler: run kernels in the interpreter there (see INTERPRET_ENV)."""
    compiled = platform() in ("gpu", "tpu")
    setting = os.environ.get(INTERPRET_ENV, "")
    if setting not in ("", "0", "1"):
        raise ConfigError(f"{INTERPRET_ENV} must be 0, 1 or unset, got {setting!r}")
    if setting == "0" and not compiled:
        raise ConfigError(
            f"{INTERPRET_ENV}=0 forbids the Pallas interpreter, but JAX is running on "
            f"{platform()!r}, which has no Pallas compiler (no GPU or TPU visible)"
        )
    return setting == "1" or not compiled


def compiler_params(n_grid_dims: int) -> Any:
    """Backend compiler parameters: Triton on GPU (explicitly, not Mosaic GPU), Mosaic on TPU.

    Every grid axis is independent (each program writes its own output block), so on TPU all are
    marked "parallel" (megacore chips split them across their cores).
    """
    if platform() == "gpu":
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=4, num_stages=2)
    if platform() == "tpu":
        from jax.experimental.pallas import tpu as pl_tpu

        return pl_tpu.CompilerParams(dimension_semantics=("parallel",) * n_grid_dims)
    return None


def scalar_table_spec(length: int) -> pl.BlockSpec:
    """BlockSpec for a small int32 table read with dynamic scalar indices (offsets, row starts).

    TPUs read scalars from SMEM; elsewhere the whole (power-of-two sized) table is one block.
    """
    if platform() == "tpu":
        from jax.experimental.pallas import tpu as pl_tpu

        return pl.BlockSpec(memory_space=pl_tpu.SMEM)
    return pl.BlockSpec((length,), lambda *_: (0,))
