"""The Pallas kernels against the XLA reference, compiled on the device (no interpreter, no pytest).

    python benchmarks/kernel_check.py --json kernels.json          # GPU/TPU shapes
    python benchmarks/kernel_check.py --tiny --json kernels.json   # CPU dry run (interpreter)

`benchmarks/device_check.sh` runs it with `JAXGPT_PALLAS_INTERPRET=0`, so on a machine without a
kernel compiler it raises instead of quietly interpreting. Checks, each against
`jaxgpt.attention.reference_attention`: the flash kernel's output and its q/k/v gradients (causal,
a cache offset with ragged rows, a partial tail block, float32 and bfloat16), the decode kernel
(ragged rows, one row with no valid key), and one decode step of a whole tiny model through the
pallas backend against the xla backend. The float32 checks run with
`jax_default_matmul_precision=highest`: NVIDIA's default float32 dot is TF32 (10-bit mantissa), in
the Triton kernels and in XLA alike, which would hide a real error behind 1e-3 rounding.

Writes one JSON row per check (name, max error, bound, ok) and exits 1 naming the failures.
It needs no pytest (the device machine may not have it); tests/test_kernels.py holds the same
checks at tiny shapes for CI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.attention import reference_attention
from jaxgpt.config import get_preset
from jaxgpt.kernels import decode_attention, flash_attention
from jaxgpt.kernels import platform as plat
from jaxgpt.model import forward_cached, init_cache
from jaxgpt.params import init_params

# Relative to the largest reference entry (bfloat16 rounding is relative).
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}

# name: ((B, H, T, S, K), q_offset, kv_start_B, dtype)
DEVICE_CASES = {
    "flash-causal-T1024-bf16": ((2, 4, 1024, 1024, 64), 0, None, "bfloat16"),
    "flash-tail-left-padded-T1000-f32": ((2, 2, 1000, 1000, 64), 0, [0, 300], "float32"),
    "flash-cache-offset-ragged-f32": ((2, 3, 100, 612, 64), 512, [0, 77], "float32"),
    "flash-head128-bf16": ((1, 2, 256, 256, 128), 0, [0], "bfloat16"),
}
TINY_CASES = {"flash-tail-left-padded-f32": ((2, 2, 40, 40, 16), 0, [0, 21], "float32")}


def max_err(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def relative_bound(ref: jax.Array, dtype: str) -> float:
    return TOLERANCE[dtype] * max(1.0, float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))


def check_flash(name: str, case: tuple) -> list[dict]:
    (B, H, T, S, K), q_offset, kv_start, dtype = case
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(B, H, T, K), dtype)
    k, v = (jnp.asarray(rng.randn(B, H, S, K), dtype) for _ in range(2))
    cotangent = jnp.asarray(rng.randn(B, H, T, K), dtype)
    kv_start_B = None if kv_start is None else jnp.asarray(kv_start, jnp.int32)
    kw = dict(q_offset=q_offset, kv_start_B=kv_start_B)

    def value_and_grads(attend):
        def loss(q, k, v):
            out = attend(q, k, v)
            return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
            q, k, v
        )
        return (out, *grads)

    got = value_and_grads(lambda q, k, v: flash_attention(q, k, v, **kw))
    ref = value_and_grads(lambda q, k, v: reference_attention(q, k, v, **kw)[0])
    rows = []
    for part, x, x_ref in zip(("out", "dq", "dk", "dv"), got, ref):
        err, bound = max_err(x, x_ref), relative_bound(x_ref, dtype)
        rows.append({"check": f"{name}:{part}", "max_err": err, "bound": bound, "ok": err < bound})
    return rows


def check_decode(tiny: bool) -> list[dict]:
    """One query per row over a cache; rows start at 0, 30, 90 and one past the query (no key)."""
    S, K = (100, 16) if tiny else (1024, 64)
    rng = np.random.RandomState(1)
    q = jnp.asarray(rng.randn(4, 2, 1, K), jnp.float32)
    k, v = (jnp.asarray(rng.randn(4, 2, S, K), jnp.float32) for _ in range(2))
    offset = S - 5
    kv_start_B = jnp.asarray([0, 30, 90, offset + 2], jnp.int32)
    got = jax.jit(
        lambda q, k, v: decode_attention(q, k, v, q_offset=offset, kv_start_B=kv_start_B)
    )(q, k, v)
    ref, _ = reference_attention(q, k, v, q_offset=offset, kv_start_B=kv_start_B)
    err, bound = max_err(got, ref), relative_bound(ref, "float32")
    return [{"check": f"decode-ragged-S{S}", "max_err": err, "bound": bound, "ok": err < bound}]


def check_model_decode_step() -> list[dict]:
    """A whole tiny model: prefill with xla, then one cached step through pallas vs xla."""
    config = get_preset("tiny")
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, config.vocab_size, (2, 11)), jnp.int32)
    kv_start_B = jnp.asarray([0, 4], jnp.int32)
    step = jax.jit(forward_cached, static_argnums=2)
    _, cache = step(params, tokens[:, :10], config, init_cache(config, 2, 24), 0, kv_start_B)
    ref, _ = step(params, tokens[:, 10:], config, cache, 10, kv_start_B)
    got, _ = step(params, tokens[:, 10:], config.replace(attention="pallas"), cache, 10, kv_start_B)
    err, bound = max_err(got, ref), 1e-4
    return [{"check": "model-decode-step-pallas-vs-xla", "max_err": err, "bound": bound,
             "ok": err < bound}]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    interpreted = plat.use_interpreter()
    print(f"kernel check on {jax.devices()[0].device_kind}, interpreter "
          f"{'ON' if interpreted else 'OFF'}", file=sys.stderr)  # fmt: skip
    rows = []
    for name, case in (TINY_CASES if args.tiny else DEVICE_CASES).items():
        rows += check_flash(name, case)
    rows += check_decode(args.tiny) + check_model_decode_step()
    for row in rows:
        row["interpreted"] = interpreted
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['check']:45s} max err {row['max_err']:.3g}"
              f" (bound {row['bound']:.3g})")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    failed = [row["check"] for row in rows if not row["ok"]]
    if failed:
        print(f"kernel check FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
