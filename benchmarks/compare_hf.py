"""jaxgpt vs Hugging Face transformers (GPT2LMHeadModel on PyTorch), side by side in one process.

Rows (pick with --rows):

  forward   logits of a [B, T] batch (no cache), B=8, T=256
  train     one training step: forward, cross-entropy, backward, global-norm clip 1.0, AdamW;
            dropout 0; jaxgpt runs its real step (`make_train_step` + `jit_train_step`, donated)
  decode1   greedy generation with a KV cache, batch 1: 64-token prompt + N new tokens (jaxgpt's
            weights in the decode layout, `jaxgpt.quantize.decode_layout`, as `jaxgpt sample`)
  decode8   the same at batch 8

Both libraries get the same weights (made by `jaxgpt.init_params` for the preset, written with
`save_hf` and loaded by transformers), the same shapes, the same dtype (bfloat16 means float32
weights with bfloat16 matmuls: jaxgpt's `dtype=bfloat16`, torch's CPU autocast) and the same
number of threads (XLA:CPU uses every core, so torch gets `os.cpu_count()` unless --threads).
Each row warms both up (jaxgpt's first call compiles; reported apart), then alternates the two
--repeats times so that load from other processes hits both alike; the figure is the median.
The decode rows also show the memory-bandwidth bound: float32 weight bytes read per step
divided by a measured read bandwidth.

    python benchmarks/compare_hf.py                                   # everything, GPT-2 124M
    python benchmarks/compare_hf.py --rows decode1 --new 64 --repeats 2  # a quick look
    python benchmarks/compare_hf.py --model mini --rows forward train    # small shapes
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROWS = ("forward", "train", "decode1", "decode8")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--model", default="gpt2", help="jaxgpt preset (default gpt2 = 124M)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=8, help="batch of forward/train (8)")
    parser.add_argument("--seq", type=int, default=256, help="sequence of forward/train (256)")
    parser.add_argument("--prompt-len", type=int, default=64, help="decode prompt (64)")
    parser.add_argument("--new", type=int, default=256, help="decode new tokens (256)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats (5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    for name in ("batch", "seq", "prompt_len", "new", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def read_bandwidth(torch, n_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of the fastest of `repeats` multi-threaded sums over a float32 array of n_bytes."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - start)
    return n_bytes / best


def side_by_side(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Warm each fn up once (timed: compile), then time them alternately `repeats` times."""
    first = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        out[name] = {
            "median_s": median,
            "spread": (max(ts) - min(ts)) / median,
            "first_call_s": first[name],
        }
    return out


def main() -> int:
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jaxgpt
    import contextlib

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from jaxgpt.config import get_preset
    from jaxgpt.decode import generate
    from jaxgpt.experiment import OptimSection, ScheduleSection
    from jaxgpt.flops import device_name, flops_per_token
    from jaxgpt.model import forward
    from jaxgpt.optim import decay_mask, make_optimizer
    from jaxgpt.params import init_params
    from jaxgpt.pretrained import save_hf
    from jaxgpt.quantize import decode_layout
    from jaxgpt.train import init_train_state, jit_train_step, make_train_step

    torch.set_num_threads(args.threads)
    config = get_preset(args.model, dtype=args.dtype)
    params = init_params(config, jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(config, params, tmp)
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp)
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    bf16 = args.dtype == "bfloat16"

    def autocast():
        if bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    device = device_name()
    load = os.getloadavg()
    print(
        f"preset {args.model} ({sum(x.size for x in jax.tree.leaves(params)) / 1e6:.0f}M params), "
        f"random weights, {args.dtype}; {device}, {args.threads} threads; "
        f"jax {jax.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    rng = np.random.RandomState(0)
    results = []

    def report(row: str, shape: str, tokens: int, flops_tok: float | None, timed: dict, note=""):
        ours, theirs = timed["jaxgpt"], timed["transformers"]
        result = {
            "row": row,
            "shape": shape,
            "jaxgpt_tokens_per_s": tokens / ours["median_s"],
            "hf_tokens_per_s": tokens / theirs["median_s"],
            "ratio": theirs["median_s"] / ours["median_s"],
            "jaxgpt_ms": 1e3 * ours["median_s"],
            "hf_ms": 1e3 * theirs["median_s"],
            "jaxgpt_spread": ours["spread"],
            "hf_spread": theirs["spread"],
            "jaxgpt_compile_s": ours["first_call_s"] - ours["median_s"],
            "note": note,
        }
        if flops_tok is not None:
            result["jaxgpt_gflops"] = result["jaxgpt_tokens_per_s"] * flops_tok / 1e9
            result["hf_gflops"] = result["hf_tokens_per_s"] * flops_tok / 1e9
        results.append(result)
        print(
            f"{row}: jaxgpt {result['jaxgpt_tokens_per_s']:.1f} tokens/s, transformers "
            f"{result['hf_tokens_per_s']:.1f} tokens/s -> {result['ratio']:.2f}x  {note}",
            flush=True,
        )

    B, T = args.batch, args.seq
    if "forward" in args.rows:
        tokens = rng.randint(0, config.vocab_size, (B, T)).astype(np.int32)
        tokens_pt = torch.tensor(tokens, dtype=torch.long)
        jit_forward = jax.jit(forward, static_argnames=("config",))
        tokens_jax = jax.device_put(tokens)

        def hf_forward():
            with torch.inference_mode(), autocast():
                return hf_model(tokens_pt).logits

        timed = side_by_side(
            {
                "jaxgpt": lambda: jit_forward(params, tokens_jax, config).block_until_ready(),
                "transformers": hf_forward,
            },
            args.repeats,
        )
        diff = np.abs(
            np.asarray(jit_forward(params, tokens_jax, config), np.float32)
            - hf_forward().float().numpy()
        ).max()
        report("forward", f"B={B} T={T}", B * T, flops_per_token(config, T, training=False),
               timed, f"max |logits diff| {diff:.1e}")  # fmt: skip

    if "train" in args.rows:
        windows = rng.randint(0, config.vocab_size, (1, B, T + 1)).astype(np.int32)
        optim = OptimSection(lr=1e-4, grad_clip=1.0)
        optimizer = make_optimizer(optim, ScheduleSection(warmup_steps=0))
        step_fn = jit_train_step(make_train_step(config, optimizer))
        state = init_train_state(jax.tree.map(jnp.copy, params), optimizer)
        batch_jax, key = jax.device_put(windows), jax.random.key(0)
        losses: dict[str, list[float]] = {"jaxgpt": [], "transformers": []}

        def jax_step():
            nonlocal state
            state, metrics = step_fn(state, batch_jax, key)  # the old state is donated
            losses["jaxgpt"].append(float(metrics["loss"]))

        # The same AdamW on the torch side: decay on the ≥2-D weights (jaxgpt's decay_mask).
        # Train a copy, so the decode rows still run both libraries on the same weights.
        hf_train = copy.deepcopy(hf_model).train()
        flat_mask = jax.tree.leaves(decay_mask(params))
        named = list(hf_train.named_parameters())
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        assert sum(flat_mask) == len(decay), "decay groups differ"
        torch_opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
        )  # fmt: skip
        inputs_pt = torch.tensor(windows[0, :, :-1], dtype=torch.long)
        targets_pt = torch.tensor(windows[0, :, 1:], dtype=torch.long)

        def hf_step():
            with autocast():
                logits = hf_train(inputs_pt).logits
                loss = torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), targets_pt.reshape(-1)
                )
            torch_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf_train.parameters(), optim.grad_clip)
            torch_opt.step()
            losses["transformers"].append(float(loss.detach()))

        timed = side_by_side({"jaxgpt": jax_step, "transformers": hf_step}, args.repeats)
        note = (
            f"first-step loss jaxgpt {losses['jaxgpt'][0]:.4f} vs "
            f"transformers {losses['transformers'][0]:.4f}"
        )
        report("train", f"B={B} T={T}", B * T, flops_per_token(config, T, training=True),
               timed, note)  # fmt: skip
        del state, hf_train, torch_opt

    decode_rows = [r for r in ("decode1", "decode8") if r in args.rows]
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - params["wpe"].nbytes
    bandwidth = read_bandwidth(torch) if decode_rows else None
    decode_params = decode_layout(params)  # what `jaxgpt sample` / `chat` decode with
    for row in decode_rows:
        batch = int(row.removeprefix("decode"))
        prompts = rng.randint(0, config.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        prompts_pt = torch.tensor(prompts, dtype=torch.long)
        outputs = {}

        def jax_decode(prompts=prompts, outputs=outputs):
            outputs["jaxgpt"] = generate(decode_params, config, prompts, args.new, temperature=0)

        def hf_decode(prompts_pt=prompts_pt, outputs=outputs):
            with torch.inference_mode(), autocast():
                outputs["transformers"] = hf_model.generate(
                    prompts_pt, attention_mask=torch.ones_like(prompts_pt), do_sample=False,
                    max_new_tokens=args.new, min_new_tokens=args.new, use_cache=True,
                ).numpy()  # fmt: skip

        timed = side_by_side({"jaxgpt": jax_decode, "transformers": hf_decode}, args.repeats)
        same = (outputs["jaxgpt"] == outputs["transformers"]).all(axis=0)[args.prompt_len :]
        agree = int(np.argmin(same)) if not same.all() else same.size
        bound = batch * bandwidth / n_bytes
        note = (
            f"greedy tokens identical for the first {agree}/{args.new}; weight-read bound "
            f"{bound:.1f} tokens/s ({n_bytes / 1e6:.0f} MB/step at {bandwidth / 1e9:.1f} GB/s)"
        )
        flops_tok = flops_per_token(config, args.prompt_len + args.new // 2, training=False)
        report(row, f"B={batch} {args.prompt_len}+{args.new}", batch * args.new, flops_tok,
               timed, note)  # fmt: skip
        results[-1]["bound_tokens_per_s"] = bound

    load = os.getloadavg()
    print(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    header = ("row", "shape", "jaxgpt tok/s", "transformers tok/s", "ratio", "spread j/t")
    lines = [header]
    for r in results:
        spread = f"{r['jaxgpt_spread']:.0%}/{r['hf_spread']:.0%}"
        lines.append((r["row"], r["shape"], f"{r['jaxgpt_tokens_per_s']:.1f}",
                      f"{r['hf_tokens_per_s']:.1f}", f"{r['ratio']:.2f}x", spread))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    if args.json is not None:
        meta = {"model": args.model, "dtype": args.dtype, "threads": args.threads, "device": device}
        args.json.write_text(json.dumps({**meta, "rows": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
