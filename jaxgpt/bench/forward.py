"""`jaxgpt bench forward`: the jitted forward pass (inference, no cache) at [batch, seq]."""

from __future__ import annotations

import argparse

import jax
import numpy as np

from jaxgpt.bench.timing import throughput_row, time_fn
from jaxgpt.config import get_preset
from jaxgpt.flops import flops_per_token
from jaxgpt.model import forward
from jaxgpt.params import init_params


def run(args: argparse.Namespace) -> list[dict]:
    config = get_preset(args.model, dtype=args.dtype)
    batch = args.batch or 8
    seq = args.seq or min(256, config.block_size)
    params = init_params(config, jax.random.key(0))
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq)).astype(np.int32)
    tokens = jax.device_put(tokens)
    fn = jax.jit(forward, static_argnames=("config",))
    timing = time_fn(lambda p, t: fn(p, t, config), params, tokens, repeats=args.steps)
    row = {"model": args.model, "batch": batch, "seq": seq, "dtype": args.dtype}
    row.update(
        throughput_row(
            timing, batch * seq, flops_per_token(config, seq, training=False), args.dtype
        )
    )
    return [row]
