"""Batch-1 greedy decode: variants of the decode step side by side in one process, against the
weight-read bound measured in the same run (issue #18, gap 1).

Every token of a batch-1 decode reads every weight once, so tokens/s can be at most
`bandwidth / weight bytes` (the bound `benchmarks/compare_hf.py` prints). This script times
alternatives to jaxgpt's decode loop (`jaxgpt.decode.decode_padded`, what `generate` runs) on
the same random GPT-2 weights and prompt, interleaved round by round so that load from other
processes hits them alike, and measures the bandwidth in every round (a multi-threaded sum over
512 MiB, as `compare_hf.py` does). Each variant's greedy tokens must equal the baseline's.
`--batch B` decodes B rows at once (the bound is then B times higher: one weight read per step).

Variants (`--variants`):

  baseline      `decode_padded` on the params as trained (kernels `[in, out]`): layers
                unrolled, one KV cache per layer
  scan          the decode step runs the blocks as a `lax.scan` over weights stacked once
                outside the loop, with one stacked `[L, B·H, S, K]` cache written in place
  split2        every GEMV split into two independent dots over halves of the output columns
                (weights split once, outside), so XLA:CPU may run the halves concurrently
  transposed    every kernel stored `[out, in]` (`jaxgpt.quantize.decode_layout`, once,
                outside), contracted on its minor axis as the logits already contract `wte`
                `[V, D]`; what `jaxgpt sample`, `chat` and `bench decode` run since 2026-11-28
  flatcache     the decode loop written out by hand from the model's pieces, each layer's cache
                one `[B·H, S, K]` array read as B·H rows of one head (jaxgpt's layout)
  bhsk          the same loop with a `[B, H, S, K]` cache (jaxgpt's layout before 2026-11-28:
                at batch 1 XLA:CPU copies every layer's cache four times per token)
  tp2           tensor parallelism over two host devices (needs --devices 2): heads, MLP
                columns and the embedding width split in two, laid out by GSPMD from the input
                shardings (`jaxgpt.sharding`'s rules, plus wte split along D)
  flag:K=V      the baseline compiled with the XLA debug option K=V (`compiler_options`),
                e.g. flag:xla_cpu_multi_thread_eigen=false

    python benchmarks/decode_variants.py --new 256 --repeats 3
    python benchmarks/decode_variants.py --devices 2 --variants baseline tp2 --new 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["baseline", "scan", "split2"])
    parser.add_argument("--model", default="gpt2", help="jaxgpt preset (default gpt2 = 124M)")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together (1)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--devices", type=int, default=1, help="host devices (2 for tp2)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.devices > 1:
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jaxgpt
    import jax
    import numpy as np

    from jaxgpt.config import get_preset
    from jaxgpt.flops import device_name
    from jaxgpt.params import init_params

    config = get_preset(args.model)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    rng = np.random.RandomState(0)
    prompt = rng.randint(0, config.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - params["wpe"].nbytes

    fns = {name: make_variant(name, params, config, prompt, args.new) for name in args.variants}
    first, outputs = {}, {}
    for name, fn in fns.items():  # compile + first run, apart from the timing
        start = time.perf_counter()
        outputs[name] = fn()
        first[name] = time.perf_counter() - start
    reference = outputs[args.variants[0]]
    times: dict[str, list[float]] = {name: [] for name in fns}
    bandwidths = []
    for _ in range(args.repeats):
        bandwidths.append(read_bandwidth())
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    bandwidth = statistics.median(bandwidths)
    bound = args.batch * bandwidth / n_bytes  # every step reads the weights once for all rows

    shape = f"{args.prompt_len} + {args.new} tokens, {args.repeats} interleaved rounds"
    print(f"device: {device_name()} ({jax.device_count()} JAX device(s)); {args.model}, float32, "
          f"batch {args.batch}, {shape}")  # fmt: skip
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (median of rounds; "
          f"{min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f}); weights "
          f"{n_bytes / 1e6:.1f} MB per step; bound {bound:.1f} tokens/s")  # fmt: skip
    print(f"{'variant':<44} {'tokens/s':>9} {'% bound':>8} {'vs first':>9} {'spread':>7} "
          f"{'compile+1st s':>13}  greedy = first")  # fmt: skip
    tokens = args.batch * args.new
    base = tokens / statistics.median(times[args.variants[0]])
    for name, ts in times.items():
        median = statistics.median(ts)
        tok_s = tokens / median
        same = bool((outputs[name] == reference).all())
        spread = 100 * (max(ts) - min(ts)) / median
        print(f"{name:<44} {tok_s:9.1f} {100 * tok_s / bound:7.1f}% {tok_s / base:8.2f}x "
              f"{spread:6.0f}% {first[name]:13.1f}  {same}")  # fmt: skip
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


def read_bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 3) -> float:
    """Bytes/s of the fastest multi-threaded sum over a float32 array of n_bytes (torch, as in
    `compare_hf.py`, so the bound is the same figure)."""
    import torch

    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - start)
    return n_bytes / best


# --------------------------------------------------------------------------- the variants


def make_variant(name, params, config, prompt, n):
    """A zero-argument function running the whole decode (prefill + n tokens) → tokens [B, n]."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxgpt.decode import decode_padded
    from jaxgpt.sampling import make_sampler

    greedy = make_sampler(0.0)
    kv_start = jnp.zeros((prompt.shape[0],), jnp.int32)
    eos, pad = jnp.int32(-1), jnp.int32(0)
    args = (jnp.asarray(prompt), kv_start, None, greedy, eos, pad)

    if name == "baseline":
        return lambda: np.asarray(decode_padded(params, *args, config=config, max_new_tokens=n))
    if name.startswith("flag:"):
        key, _, value = name.removeprefix("flag:").partition("=")
        value = {"true": True, "false": False}.get(value.lower(), value)
        value = int(value) if isinstance(value, str) and value.lstrip("-").isdigit() else value
        lowered = decode_padded.lower(params, *args, config=config, max_new_tokens=n)
        compiled = lowered.compile(compiler_options={key: value})
        return lambda: np.asarray(compiled(params, *args))
    if name == "scan":
        stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *params["blocks"])
        stacked = jax.block_until_ready(stacked)  # once, outside the timed loop
        run = jax.jit(scan_decode, static_argnames=("config", "n"))
        return lambda: np.asarray(run(params, stacked, jnp.asarray(prompt), config=config, n=n))
    if name in ("flatcache", "bhsk"):
        run = jax.jit(handwritten_decode, static_argnames=("config", "n", "layout"))
        layout = "flat" if name == "flatcache" else "bhsk"
        prompt_BT = jnp.asarray(prompt)
        return lambda: np.asarray(run(params, prompt_BT, config=config, n=n, layout=layout))
    if name == "split2":
        split = split_params(params)
        with patched_linear():
            out = decode_padded(split, *args, config=config, max_new_tokens=n)  # traced here
        del out
        return lambda: np.asarray(decode_padded(split, *args, config=config, max_new_tokens=n))
    if name == "transposed":
        from jaxgpt.quantize import decode_layout

        flipped = decode_layout(params)
        return lambda: np.asarray(decode_padded(flipped, *args, config=config, max_new_tokens=n))
    if name == "tp2":
        sharded = tensor_parallel(params)
        return lambda: np.asarray(decode_padded(sharded, *args, config=config, max_new_tokens=n))
    raise SystemExit(f"unknown variant {name!r}")


def scan_decode(params, stacked, prompt_BT, config, n):
    """Prefill with `forward_cached`, then a while loop whose step scans the blocks."""
    import jax
    import jax.numpy as jnp

    from jaxgpt.model import block, embed, forward_cached, init_cache, unembed

    B, T = prompt_BT.shape
    L = config.n_layer
    kv_start_B = jnp.zeros((B,), jnp.int32)
    logits_B1V, cache = forward_cached(
        params, prompt_BT, config, init_cache(config, B, T + n - 1), 0, kv_start_B, last_only=True
    )
    k_LBHSK = jnp.stack([k for k, _ in cache])
    v_LBHSK = jnp.stack([v for _, v in cache])
    tok_B = jnp.argmax(logits_B1V[:, 0], -1).astype(jnp.int32)

    def layer(carry, xs):
        x_BTD, k_LBHSK, v_LBHSK, slot = carry
        p, i = xs
        x_BTD, (k_BHSK, v_BHSK) = block(
            p, x_BTD, config, q_offset=slot, kv_start_B=kv_start_B, cache=(k_LBHSK[i], v_LBHSK[i])
        )
        # Write back only the new slot, in place.
        k_new = jax.lax.dynamic_slice_in_dim(k_BHSK, slot, 1, axis=1)[None]
        v_new = jax.lax.dynamic_slice_in_dim(v_BHSK, slot, 1, axis=1)[None]
        k_LBHSK = jax.lax.dynamic_update_slice(k_LBHSK, k_new, (i, 0, slot, 0))
        v_LBHSK = jax.lax.dynamic_update_slice(v_LBHSK, v_new, (i, 0, slot, 0))
        return (x_BTD, k_LBHSK, v_LBHSK, slot), None

    def step(carry):
        k_LBHSK, v_LBHSK, tok_B, slot, out_BN, j = carry
        x_BTD = embed(params, tok_B[:, None], (slot - kv_start_B)[:, None])
        (x_BTD, k_LBHSK, v_LBHSK, _), _ = jax.lax.scan(
            layer, (x_BTD, k_LBHSK, v_LBHSK, slot), (stacked, jnp.arange(L))
        )
        tok_B = jnp.argmax(unembed(params, x_BTD, config)[:, 0], -1).astype(jnp.int32)
        out_BN = jax.lax.dynamic_update_slice(out_BN, tok_B[:, None], (0, j))
        return k_LBHSK, v_LBHSK, tok_B, slot + 1, out_BN, j + 1

    out_BN = jnp.zeros((B, n), jnp.int32).at[:, 0].set(tok_B)
    init = (k_LBHSK, v_LBHSK, tok_B, jnp.int32(T), out_BN, jnp.int32(1))
    return jax.lax.while_loop(lambda c: c[-1] < n, step, init)[4]


def handwritten_decode(params, prompt_BT, config, n, layout):
    """Prefill with `forward_cached`, then a while loop with the block written out from the
    model's own pieces and each layer's cache laid out as `layout`: "flat" `[B·H, S, K]` read as
    B·H rows of one head (what `jaxgpt.model` does), or "bhsk" `[B, H, S, K]` (what it did)."""
    import jax
    import jax.numpy as jnp

    from jaxgpt.attention import reference_attention
    from jaxgpt.model import (
        embed,
        forward_cached,
        init_cache,
        layer_norm,
        linear,
        mlp,
        project_qkv,
        unembed,
    )

    B, T = prompt_BT.shape
    H, K, D = config.n_head, config.head_dim, config.n_embd
    S = T + n - 1
    eps, dtype = config.layer_norm_epsilon, config.compute_dtype
    kv_start_B = jnp.zeros((B,), jnp.int32)
    logits_B1V, cache = forward_cached(
        params, prompt_BT, config, init_cache(config, B, S), 0, kv_start_B, last_only=True
    )
    if layout == "bhsk":
        cache = [(k.reshape(B, H, S, K), v.reshape(B, H, S, K)) for k, v in cache]
    tok_B = jnp.argmax(logits_B1V[:, 0], -1).astype(jnp.int32)

    def attend(q_BHTK, k_BHTK, v_BHTK, k_c, v_c, slot):
        if layout == "bhsk":
            k_c = jax.lax.dynamic_update_slice(k_c, k_BHTK, (0, 0, slot, 0))
            v_c = jax.lax.dynamic_update_slice(v_c, v_BHTK, (0, 0, slot, 0))
            out_BHTK, _ = reference_attention(
                q_BHTK, k_c, v_c, q_offset=slot, kv_start_B=kv_start_B
            )
            return out_BHTK, k_c, v_c
        k_c = jax.lax.dynamic_update_slice(k_c, k_BHTK.reshape(B * H, 1, K), (0, slot, 0))
        v_c = jax.lax.dynamic_update_slice(v_c, v_BHTK.reshape(B * H, 1, K), (0, slot, 0))
        out_R1TK, _ = reference_attention(
            q_BHTK.reshape(B * H, 1, 1, K), k_c[:, None], v_c[:, None], q_offset=slot,
            kv_start_B=jnp.repeat(kv_start_B, H),
        )  # fmt: skip
        return out_R1TK.reshape(B, H, 1, K), k_c, v_c

    def step(carry):
        cache, tok_B, slot, out_BN, j = carry
        x_BTD = embed(params, tok_B[:, None], (slot - kv_start_B)[:, None])
        new_cache = []
        for p, (k_c, v_c) in zip(params["blocks"], cache):
            h_BTD = layer_norm(p["ln_1"], x_BTD, eps)
            q_BHTK, k_BHTK, v_BHTK = project_qkv(p["attn"], h_BTD, config)
            out_BHTK, k_c, v_c = attend(q_BHTK, k_BHTK, v_BHTK, k_c, v_c, slot)
            new_cache.append((k_c, v_c))
            out_BTD = out_BHTK.transpose(0, 2, 1, 3).reshape(B, 1, D)
            x_BTD = x_BTD + linear(p["attn"]["c_proj"], out_BTD, dtype).astype(jnp.float32)
            mlp_BTD, _ = mlp(p["mlp"], layer_norm(p["ln_2"], x_BTD, eps), config)
            x_BTD = x_BTD + mlp_BTD.astype(jnp.float32)
        tok_B = jnp.argmax(unembed(params, x_BTD, config)[:, 0], -1).astype(jnp.int32)
        out_BN = jax.lax.dynamic_update_slice(out_BN, tok_B[:, None], (0, j))
        return new_cache, tok_B, slot + 1, out_BN, j + 1

    out_BN = jnp.zeros((B, n), jnp.int32).at[:, 0].set(tok_B)
    init = (cache, tok_B, jnp.int32(T), out_BN, jnp.int32(1))
    return jax.lax.while_loop(lambda c: c[-1] < n, step, init)[3]


def split_params(params):
    """Every kernel `[D, N]` as two `[D, N/2]` arrays, and wte's rows as two halves for the
    logits (the whole wte stays for the embedding lookup, which reads one row)."""
    import jax
    import jax.numpy as jnp

    def split(p):
        if isinstance(p, dict) and "kernel" in p:
            k = p["kernel"]
            half = k.shape[1] // 2
            return {**p, "kernel": (jnp.array(k[:, :half]), jnp.array(k[:, half:]))}
        if isinstance(p, dict):
            return {key: split(v) for key, v in p.items()}
        return p

    blocks = [split(b) for b in params["blocks"]]
    V = params["wte"].shape[0]
    halves = (jnp.array(params["wte"][: V // 2]), jnp.array(params["wte"][V // 2 :]))
    return jax.block_until_ready({**params, "blocks": blocks, "wte_halves": halves})


class patched_linear:
    """While tracing: `linear` runs a split kernel as two dots; `unembed` the two wte halves."""

    def __enter__(self):
        import jax.numpy as jnp

        from jaxgpt import model

        self.saved = (model.linear, model.unembed)
        linear, unembed = self.saved

        def split_linear(p, x, dtype):
            if isinstance(p.get("kernel"), tuple):
                y = jnp.concatenate([jnp.matmul(x.astype(dtype), k) for k in p["kernel"]], -1)
            else:
                return linear(p, x, dtype)
            return y + p["bias"] if "bias" in p else y

        def split_unembed(params, x_BTD, config):
            if "wte_halves" not in params:
                return unembed(params, x_BTD, config)
            h = model.layer_norm(params["ln_f"], x_BTD, config.layer_norm_epsilon)
            parts = [jnp.einsum("btd,vd->btv", h, w) for w in params["wte_halves"]]
            return jnp.concatenate(parts, -1)

        model.linear, model.unembed = split_linear, split_unembed

    def __exit__(self, *exc):
        from jaxgpt import model

        model.linear, model.unembed = self.saved


def tensor_parallel(params):
    """`params` on a (tensor=2) mesh: jaxgpt's partition rules, wte split along D."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxgpt import sharding

    if jax.device_count() < 2:
        raise SystemExit("tp2 needs --devices 2")
    mesh = sharding.make_mesh("data=1,fsdp=1,tensor=2")
    shardings = sharding.tree_shardings(params, mesh)
    shardings["wte"] = NamedSharding(mesh, P(None, "tensor"))  # V = 50257 is odd: split D
    return jax.block_until_ready(jax.device_put(params, shardings))


if __name__ == "__main__":
    sys.exit(main())
