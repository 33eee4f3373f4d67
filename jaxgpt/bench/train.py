"""`jaxgpt bench train`: the real training step — `jaxgpt.train.make_train_step` jitted by
`jit_train_step` (state buffers donated) with AdamW and global-norm clipping at 1.0, dropout 0 —
on random `[batch, seq + 1]` windows.

The state is threaded through the repeats (each call consumes the previous call's donated state),
so donation works exactly as in `jaxgpt train`. FLOPs per token are the training count of
`jaxgpt.flops` (6·N plus the attention term).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from jaxgpt.bench.timing import throughput_row, time_fn
from jaxgpt.config import get_preset
from jaxgpt.experiment import OptimSection, ScheduleSection
from jaxgpt.flops import flops_per_token
from jaxgpt.optim import make_optimizer
from jaxgpt.params import init_params
from jaxgpt.train import init_train_state, jit_train_step, make_train_step


def run(args: argparse.Namespace) -> list[dict]:
    config = get_preset(
        args.model, dtype=args.dtype, embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0
    )
    batch = args.batch or 8
    seq = args.seq or min(256, config.block_size)
    optimizer = make_optimizer(OptimSection(grad_clip=1.0), ScheduleSection())
    step_fn = jit_train_step(make_train_step(config, optimizer))
    state = init_train_state(init_params(config, jax.random.key(0)), optimizer)
    windows = np.random.RandomState(0).randint(0, config.vocab_size, (1, batch, seq + 1))
    batch_ABT1 = jax.device_put(windows.astype(np.int32))
    key = jax.random.key(1)

    def one_step():
        # The previous state is donated to this call and replaced by the new one.
        nonlocal state
        state, metrics = step_fn(state, batch_ABT1, key)
        return state, metrics

    timing = time_fn(one_step, repeats=args.steps)
    row = {"model": args.model, "batch": batch, "seq": seq, "dtype": args.dtype}
    row.update(
        throughput_row(timing, batch * seq, flops_per_token(config, seq, training=True), args.dtype)
    )
    return [row]
