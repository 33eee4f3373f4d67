"""`jaxgpt bench decode`: prefill time, ms per decode step and tokens/s of `jaxgpt.decode`.

Times the same jitted loop `generate` uses (`decode_padded`, greedy) on random weights, at batch 1
and 8 (or --batch), in --dtype, with the weights stored as --weights (float32, or bfloat16 / int8
through `jaxgpt.quantize`; `weights_MB` is what a step reads). Compilation is the first call
minus a steady-state call and is reported apart. TFLOP/s and MFU are for the decode steps (2·N
plus attention at the mean context length per token); at small batch a decode step is bound by
reading the weights, not by FLOPs, so a low MFU there is expected. Prompt length (--seq) defaults
to 64 and new tokens to 256, both shrunk to fit the model's block_size (the "tiny" preset: 16 +
48).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxgpt.bench.timing import device_peak, peak_memory_bytes, time_fn
from jaxgpt.config import get_preset
from jaxgpt.decode import decode_padded
from jaxgpt.errors import InputError
from jaxgpt.flops import flops_per_token
from jaxgpt.model import forward_cached, init_cache
from jaxgpt.params import init_params
from jaxgpt.quantize import decode_layout, quantize_params, weight_bytes
from jaxgpt.sampling import Greedy


@functools.partial(jax.jit, static_argnames=("config", "max_len"))
def _prefill(params, tokens_BT, kv_start_B, *, config, max_len):
    cache = init_cache(config, tokens_BT.shape[0], max_len)
    return forward_cached(params, tokens_BT, config, cache, 0, kv_start_B, last_only=True)


def run(args: argparse.Namespace) -> list[dict]:
    config = get_preset(args.model, dtype=args.dtype)
    prompt_len = args.seq or min(64, config.block_size // 4)
    new_tokens = min(256, config.block_size - prompt_len)
    if new_tokens < 2:
        raise InputError(
            f"--seq {prompt_len} leaves no room to decode within block_size {config.block_size}"
        )
    params = decode_layout(quantize_params(init_params(config, jax.random.key(0)), args.weights))
    batches = [args.batch] if args.batch else [1, 8]
    rows = []
    for batch in tqdm(batches, desc="decode", unit="batch"):
        tokens_BT = jnp.asarray(
            np.random.RandomState(batch).randint(0, config.vocab_size, (batch, prompt_len)),
            jnp.int32,
        )
        kv_start_B = jnp.zeros((batch,), jnp.int32)
        prefill = time_fn(
            functools.partial(_prefill, config=config, max_len=prompt_len + new_tokens - 1),
            params, tokens_BT, kv_start_B, repeats=args.steps,
        )  # fmt: skip
        loop = time_fn(
            functools.partial(decode_padded, config=config, max_new_tokens=new_tokens),
            params, tokens_BT, kv_start_B, None, Greedy(), jnp.int32(-1), jnp.int32(0),
            repeats=args.steps,
        )  # fmt: skip
        step_s = (loop.median_s - prefill.median_s) / (new_tokens - 1)
        if (
            step_s <= 0
        ):  # timing noise larger than the whole loop: no figure rather than a wrong one
            step_s = float("nan")
        # Model FLOPs of a decode step at the mean context length over the generated tokens.
        step_flops = batch * flops_per_token(config, prompt_len + new_tokens // 2, training=False)
        rows.append(
            {
                "model": args.model,
                "dtype": args.dtype,
                "weights": args.weights,
                "batch": batch,
                "prompt": prompt_len,
                "new_tokens": new_tokens,
                "compile_s": loop.first_call_s - loop.median_s,
                "prefill_ms": 1e3 * prefill.median_s,
                "ms_per_step": 1e3 * step_s,
                "tokens_per_s": batch * new_tokens / loop.median_s,
                "decode_tokens_per_s": batch / step_s,
                "tflops": step_flops / step_s / 1e12,
                "mfu": step_flops / step_s / device_peak(args.dtype)[0],
                "weights_MB": weight_bytes(params) / 1e6,
                "spread": loop.spread,
                "peak_mem_gb": peak_memory_bytes()[0] / 1e9,
            }
        )
    return rows
