"""Weight formats side by side: quality and batch-1 decode speed of float32, bfloat16 and int8.

    python benchmarks/quantize_quality.py                       # GPT-2 124M shapes, random weights
    python benchmarks/quantize_quality.py --trained-char 300     # + a char model trained here

For each format (`jaxgpt.quantize.quantize_params`): max |logit − float32 logit| over a prompt,
greedy-token agreement with float32 over --new tokens (positions equal, and the first position
that differs), the validation loss (trained model only), and batch-1 greedy decode tokens/s of the
jitted loop `generate` uses, timed interleaved (format by format, --repeats rounds, medians) so
that a shared machine's load hits every format alike. The "trained" model is a small character
model (4 layers, 128 wide, context 320) trained for N AdamW steps (batch 16 × 320 characters) on
90 % of the bundled play in this process; its validation loss is on the other 10 %.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.config import GPTConfig, get_preset
from jaxgpt.data import corpus_files
from jaxgpt.decode import decode_padded
from jaxgpt.flops import device_name
from jaxgpt.model import forward
from jaxgpt.objectives import next_token_loss
from jaxgpt.params import init_params
from jaxgpt.quantize import WEIGHT_FORMATS, quantize_params, weight_bytes
from jaxgpt.sampling import Greedy


def train_char_model(steps: int) -> tuple[GPTConfig, dict, np.ndarray, np.ndarray]:
    text = corpus_files("shakespeare")[0].read_text(encoding="utf-8")
    chars = sorted(set(text))
    data = np.asarray([chars.index(c) for c in text], np.int32)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    # A context of 320 holds the default 64-token prompt and 256 greedy tokens.
    config = GPTConfig(vocab_size=len(chars), block_size=320, n_layer=4, n_head=4, n_embd=128)
    optimizer = optax.adamw(2e-3)

    @jax.jit
    def step(params, opt_state, batch_BT1):
        loss, grads = jax.value_and_grad(next_token_loss)(params, batch_BT1, config, None)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = init_params(config, jax.random.key(0))
    opt_state = optimizer.init(params)
    rng = np.random.RandomState(0)
    for _ in range(steps):
        starts = rng.randint(0, len(train) - 321, 16)
        params, opt_state, loss = step(
            params, opt_state, np.stack([train[s : s + 321] for s in starts])
        )
    print(f"trained {steps} steps, last train loss {float(loss):.4f}")
    return config, params, train, val


def val_loss(params, config, val: np.ndarray, batches: int = 8) -> float:
    rng = np.random.RandomState(1)
    evaluate = jax.jit(next_token_loss, static_argnums=2)
    losses = []
    for _ in range(batches):
        starts = rng.randint(0, len(val) - 321, 16)
        batch = np.stack([val[s : s + 321] for s in starts])
        losses.append(float(evaluate(params, batch, config, None)))
    return float(np.mean(losses))


def compare(name, config, params, prompt, args, val=None) -> None:
    if len(prompt) + args.new > config.block_size:
        raise SystemExit(f"{name}: prompt {len(prompt)} + {args.new} new tokens exceed the "
                         f"block_size {config.block_size}")  # fmt: skip
    tokens_BT = jnp.asarray(prompt[None, :], jnp.int32)
    kv_start_B = jnp.zeros((1,), jnp.int32)
    formats = {w: quantize_params(params, w) for w in WEIGHT_FORMATS}
    fwd = jax.jit(forward, static_argnames="config")
    ref_logits = fwd(params, tokens_BT, config)

    def decode(p):
        return decode_padded(p, tokens_BT, kv_start_B, None, Greedy(), jnp.int32(-1),
                             jnp.int32(0), config=config, max_new_tokens=args.new)  # fmt: skip

    new = {w: np.asarray(jax.block_until_ready(decode(p)))[0] for w, p in formats.items()}
    times = {w: [] for w in formats}
    for _ in range(args.repeats):
        for w, p in formats.items():
            start = time.perf_counter()
            jax.block_until_ready(decode(p))
            times[w].append(time.perf_counter() - start)
    base = statistics.median(times["float32"])
    print(f"== {name}: prompt {len(prompt)} + {args.new} greedy tokens, batch 1, "
          f"{args.repeats} interleaved repeats")  # fmt: skip
    print("weights   weights_MB  max|dlogit|  max|logit|  agree  first_diff  val_loss  "
          "tokens/s  spread  vs_f32")  # fmt: skip
    for w, p in formats.items():
        err = float(jnp.max(jnp.abs(fwd(p, tokens_BT, config) - ref_logits)))
        same = new[w] == new["float32"]
        first = int(np.argmin(same)) if not same.all() else -1
        loss = f"{val_loss(p, config, val):8.4f}" if val is not None else "       -"
        median = statistics.median(times[w])
        spread = (max(times[w]) - min(times[w])) / median
        print(f"{w:9s} {weight_bytes(p) / 1e6:10.1f} {err:12.3g} "
              f"{float(jnp.max(jnp.abs(ref_logits))):11.3g} {same.mean():6.3f} {first:11d} {loss} "
              f"{args.new / median:9.2f} {spread:6.2f} {base / median:7.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="gpt2", help="preset for the random-weights model ('none': skip it)"
    )
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=256, help="greedy tokens (default 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--trained-char", type=int, default=0, metavar="STEPS",
        help="also train a char model this many steps and compare on it",
    )  # fmt: skip
    args = parser.parse_args()
    print(f"device: {device_name()}; jax {jax.__version__}")
    if args.trained_char:
        config, params, _, val = train_char_model(args.trained_char)
        compare("trained char model", config, params, val[: args.prompt_len], args, val)
    if args.model == "none":
        return
    config = get_preset(args.model)
    params = init_params(config, jax.random.key(0))
    prompt = np.random.RandomState(0).randint(0, config.vocab_size, args.prompt_len)
    compare(f"{args.model} random weights", config, params, prompt, args)


if __name__ == "__main__":
    main()
