"""`jaxgpt bench attention`: each available attention backend, forward and forward+backward.

The workload is one attention layer of the chosen preset (its heads and head width) on random
q, k, v `[B, H, T, K]` with the causal mask, at a few sequence lengths. For each backend the
output is also compared with the XLA reference (max abs error), so a fast wrong kernel shows.

FLOPs count the two T×T matmuls of the forward over the full square, 4·B·H·T²·K (the convention
of `jaxgpt.flops`), and 2.5× that for the backward's five matmuls (no recompute counted), so
forward+backward is 3.5× the forward. On CPU no TFLOP/s are reported for Pallas: it runs in its
interpreter there, which measures the interpreter, not a kernel.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxgpt.attention import multi_head_attention
from jaxgpt.bench.timing import device_peak, peak_memory_bytes, time_fn
from jaxgpt.config import get_preset
from jaxgpt.errors import ConfigError

# Sequence lengths and batch when --seq / --batch are not given: small on CPU, where Pallas is
# interpreted; GPT-2-sized contexts on accelerators.
DEFAULT_SEQS = {"cpu": (64, 128), "accelerator": (512, 1024, 2048)}
DEFAULT_BATCH = {"cpu": 1, "accelerator": 8}
BACKWARD_FLOPS_FACTOR = 2.5


def available_backends(dtype: str) -> list[str]:
    """The concrete backends this platform offers for `dtype` (cuDNN only on NVIDIA, half only)."""
    from jaxgpt.attention import resolve_backend

    backends = []
    for name in ("xla", "cudnn", "pallas"):
        try:
            backends.append(resolve_backend(name, dtype))
        except ConfigError:
            continue
    return backends


def attention_flops(B: int, H: int, T: int, K: int, *, backward: bool) -> float:
    forward = 4.0 * B * H * T * T * K
    return forward * (1.0 + BACKWARD_FLOPS_FACTOR) if backward else forward


def run(args: argparse.Namespace) -> list[dict]:
    config = get_preset(args.model)
    H, K = config.n_head, config.head_dim
    on_cpu = jax.default_backend() == "cpu"
    kind = "cpu" if on_cpu else "accelerator"
    seqs = (args.seq,) if args.seq else DEFAULT_SEQS[kind]
    B = args.batch or DEFAULT_BATCH[kind]
    dtype = jnp.dtype(args.dtype)
    backends = available_backends(args.dtype)
    device = jax.devices()[0].device_kind
    print(
        f"attention: preset {args.model} (H={H}, K={K}), B={B}, {args.dtype}, on {device}; "
        f"backends {', '.join(backends)}",
        file=sys.stderr,
    )
    if on_cpu:
        print(
            "note: on CPU the Pallas kernels run in the Pallas interpreter (interpret=True): their "
            "times measure the interpreter, not a compiled kernel; no TFLOP/s are reported.",
            file=sys.stderr,
        )

    rows = []
    jobs = [(T, b, bwd) for T in seqs for b in backends for bwd in (False, True)]
    for T, backend, backward in tqdm(jobs, desc="attention", file=sys.stderr):
        rng = np.random.RandomState(T)
        q, k, v = (jnp.asarray(rng.randn(B, H, T, K), dtype) for _ in range(3))

        def attend(q, k, v, backend=backend):
            return multi_head_attention(q, k, v, backend=backend)

        if backward:
            loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))
            fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        else:
            fn = jax.jit(attend)
        timing = time_fn(fn, q, k, v, repeats=args.steps)
        row = {
            "backend": backend,
            "pass": "fwd+bwd" if backward else "fwd",
            "seq": T,
            "batch": B,
            "compile_s": timing.first_call_s - timing.median_s,
            "median_ms": timing.median_s * 1e3,
            "spread": timing.spread,
            "tokens_per_s": B * T / timing.median_s,
        }
        if not backward:
            ref = jax.jit(lambda q, k, v: multi_head_attention(q, k, v, backend="xla"))(q, k, v)
            err = jnp.max(jnp.abs(fn(q, k, v).astype(jnp.float32) - ref.astype(jnp.float32)))
            row["max_err_vs_xla"] = float(err)
        interpreted = on_cpu and backend == "pallas"
        if not interpreted:
            achieved = attention_flops(B, H, T, K, backward=backward) / timing.median_s
            row["tflops"] = achieved / 1e12
            row["mfu"] = achieved / device_peak(args.dtype)[0]
        row["note"] = "interpreted" if interpreted else ""
        row["peak_mem_gb"] = peak_memory_bytes()[0] / 1e9
        rows.append(row)
    return rows
