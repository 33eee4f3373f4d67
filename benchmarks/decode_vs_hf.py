"""jaxgpt `generate` vs Hugging Face transformers `generate`, side by side in one process.

Workload (the issue's target): GPT-2 124M shapes with random weights (the same weights in both:
built in transformers, loaded into jaxgpt through `load_hf`), a 64-token prompt + 256 new tokens,
greedy, batch 1 and 8, float32, both libraries on the same number of CPU threads. Runs alternate
between the two libraries so that noise from other processes hits both alike; the figure per
library is the median over --repeats.

    python benchmarks/decode_vs_hf.py [--batch 1 8] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    # XLA:CPU runs on every core; give PyTorch the same number of threads.
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jaxgpt
    import jax
    import numpy as np
    import torch
    import transformers

    from jaxgpt.decode import generate
    from jaxgpt.pretrained import load_hf

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        config, params = load_hf(tmp)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - params["wpe"].nbytes
    print(
        f"GPT-2 124M, random weights, float32; prompt {args.prompt_len} + {args.new} new tokens, "
        f"greedy; {args.threads} threads; jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        flush=True,
    )

    rows = []
    for batch in args.batch:
        rng = np.random.RandomState(batch)
        prompts = rng.randint(0, config.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        prompts_pt = torch.tensor(prompts, dtype=torch.long)

        def run_jax(prompts=prompts):
            return generate(params, config, prompts, args.new, temperature=0)

        def run_hf(prompts_pt=prompts_pt):
            with torch.inference_mode():
                return hf_model.generate(
                    prompts_pt,
                    attention_mask=torch.ones_like(prompts_pt),
                    do_sample=False,
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    use_cache=True,
                ).numpy()

        start = time.perf_counter()
        ours = run_jax()  # compiles
        compile_s = time.perf_counter() - start
        theirs = run_hf()  # warm-up
        assert ours.shape == theirs.shape == (batch, args.prompt_len + args.new)
        same = (ours == theirs).all(axis=0)
        agree = int(np.argmin(same)) if not same.all() else same.size
        times = {"jaxgpt": [], "transformers": []}
        for _ in range(args.repeats):
            for name, fn in (("jaxgpt", run_jax), ("transformers", run_hf)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        tps = {k: batch * args.new / statistics.median(v) for k, v in times.items()}
        ratio = tps["jaxgpt"] / tps["transformers"]
        rows.append((batch, tps, ratio))
        print(
            f"batch {batch}: jaxgpt {tps['jaxgpt']:.1f} tokens/s "
            f"({1e3 * statistics.median(times['jaxgpt']) / args.new:.1f} ms/step), "
            f"transformers {tps['transformers']:.1f} tokens/s "
            f"({1e3 * statistics.median(times['transformers']) / args.new:.1f} ms/step) "
            f"-> ratio {ratio:.2f}x  [first jaxgpt call incl. compile {compile_s:.1f} s; greedy "
            f"tokens identical for the first {agree - args.prompt_len} of {args.new} positions; "
            f"times jax {[round(t, 2) for t in times['jaxgpt']]}, "
            f"hf {[round(t, 2) for t in times['transformers']]}]",
            flush=True,
        )
    bandwidth = read_bandwidth(torch)
    print(
        f"weights read per decode step: {n_bytes / 1e6:.0f} MB (float32, wpe excluded); "
        f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s -> memory-bandwidth bound "
        f"{bandwidth / n_bytes:.1f} steps/s, i.e. {bandwidth / n_bytes:.1f} tokens/s at batch 1 "
        f"and {8 * bandwidth / n_bytes:.0f} tokens/s at batch 8"
    )
    for batch, tps, _ in rows:
        print(
            f"batch {batch}: jaxgpt at {tps['jaxgpt'] / (batch * bandwidth / n_bytes):.0%} "
            f"of the bound, transformers at "
            f"{tps['transformers'] / (batch * bandwidth / n_bytes):.0%}"
        )
    return 0


def read_bandwidth(torch, n_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of the fastest of `repeats` multi-threaded sums over a float32 array of n_bytes."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - start)
    return n_bytes / best


if __name__ == "__main__":
    sys.exit(main())
