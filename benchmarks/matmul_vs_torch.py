"""XLA:CPU vs PyTorch on the float32 matmuls of a GPT-2 124M training step, in one process.

What bounds jaxgpt's forward and train rows in `compare_hf.py` on a CPU is mostly the matmul
kernel itself (XLA's YNNPACK or Eigen GEMM vs PyTorch's oneDNN/MKL) and the layout of the backward's
weight-gradient dots (`xᵀ · dy`, a contraction over the leading axis of both operands). This
script times each shape in both libraries, alternating, and prints GFLOP/s and the ratio.

    python benchmarks/matmul_vs_torch.py [--threads N] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# (name, lhs shape, rhs shape, einsum): the GPT-2 124M dots at B·T = 2048 tokens.
SHAPES = [
    ("mlp c_fc      x·W", (2048, 768), (768, 3072), "td,df->tf"),
    ("mlp c_proj    x·W", (2048, 3072), (3072, 768), "tf,fd->td"),
    ("attn c_attn   x·W", (2048, 768), (768, 2304), "td,de->te"),
    ("logits        h·wteᵀ", (2048, 768), (50257, 768), "td,vd->tv"),
    ("logits grad   dl·wte", (2048, 50257), (50257, 768), "tv,vd->td"),
    ("wte grad      dlᵀ·h", (2048, 50257), (2048, 768), "tv,td->vd"),
    ("c_fc grad     xᵀ·dy", (2048, 768), (2048, 3072), "td,tf->df"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"{args.threads} threads, float32; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    rng = np.random.RandomState(0)
    for name, a_shape, b_shape, spec in SHAPES:
        a = rng.randn(*a_shape).astype(np.float32)
        b = rng.randn(*b_shape).astype(np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        xla = jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y))
        fns = {
            "xla": lambda xla=xla, ja=ja, jb=jb: xla(ja, jb).block_until_ready(),
            "torch": lambda spec=spec, ta=ta, tb=tb: torch.einsum(spec, ta, tb),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():
            fn()
        for _ in range(args.repeats):
            for k, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
        contracted = a_shape[0] if spec.split(",")[0][0] == spec.split(",")[1][0] else None
        flops = 2 * a.size * b.size / (contracted or a_shape[-1])
        xla_gf = flops / statistics.median(times["xla"]) / 1e9
        torch_gf = flops / statistics.median(times["torch"]) / 1e9
        print(f"{name:22s} xla {xla_gf:6.0f} GFLOP/s  torch {torch_gf:6.0f} GFLOP/s  "
              f"xla/torch {xla_gf / torch_gf:.2f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
