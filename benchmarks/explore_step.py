"""What one "next token" press of `jaxgpt explore` costs, with and without the session's KV cache.

    python benchmarks/explore_step.py --shape shakespeare   # 4 layers x 128, characters
    python benchmarks/explore_step.py --shape gpt2          # GPT-2 124M shapes

Random weights (only the shapes matter for the time). Prints medians over `--presses` presses
after a warm-up, in ms, of the server's work for one press (`Explorer.next_token` + `analyze`,
what `/api/next` runs, without HTTP and JSON):
  * cached: the session holds the sequence, so the press samples from the kept logits and runs
    one token through `forward_cached(capture=True)` at the next cache slot;
  * prefilled: the longer sequence in a new session, i.e. the capture pass over all its tokens
    (padded to 16/32/64) — what every press computed before the cache;
and of the two model passes alone (`Explorer.capture`), without the logit lens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from jaxgpt.cli.common import LoadedModel
from jaxgpt.config import GPTConfig, get_preset
from jaxgpt.explore.analysis import Explorer
from jaxgpt.params import init_params
from jaxgpt.tokenizer import CharTokenizer, get_tokenizer

PROMPTS = {
    "shakespeare": "First Citizen:\nBefore we proceed any further, hea",  # 49 characters
    "gpt2": "Hola mundo. Esta es una prueba de tokenización real.",  # 20 GPT-2 tokens
}


def build(shape: str) -> LoadedModel:
    if shape == "gpt2":
        config, tokenizer = get_preset("gpt2"), get_tokenizer("gpt2")
    else:
        tokenizer = CharTokenizer(
            "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
        )
        config = GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128,
                           vocab_size=tokenizer.n_vocab)  # fmt: skip
    return LoadedModel(config, init_params(config, jax.random.key(0)), tokenizer, shape)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(PROMPTS), default="shakespeare")
    parser.add_argument("--presses", type=int, default=5)
    args = parser.parse_args()
    explorer = Explorer(build(args.shape))
    ids = explorer.encode(PROMPTS[args.shape])
    settings = {"temperature": 0}
    counter = iter(range(10**6))

    def cached_press():  # the session holds ids: sample, then extend by one token
        session = f"c{next(counter)}"
        explorer.analyze(ids, session=session)  # (outside the timed part: see below)
        start = time.perf_counter()
        token = explorer.next_token(ids, settings, session)
        explorer.analyze([*ids, token], session=session)
        return 1e3 * (time.perf_counter() - start)

    def prefilled_press():  # the same work with the longer sequence computed afresh
        token = explorer.next_token(ids, settings, "warm")
        explorer.analyze([*ids, token], session=f"p{next(counter)}")

    token = explorer.next_token(ids, settings, "warm")
    for _ in range(2):  # warm-up: every compilation
        cached_press()
        prefilled_press()
    cached = statistics.median(cached_press() for _ in range(args.presses))
    prefilled = median_ms(prefilled_press, args.presses)

    def step_only():
        session = f"s{next(counter)}"
        explorer.capture(ids, session)
        start = time.perf_counter()
        explorer.capture([*ids, token], session)
        return 1e3 * (time.perf_counter() - start)

    step = statistics.median(step_only() for _ in range(args.presses))
    prefill = median_ms(lambda: explorer.capture([*ids, token], f"f{next(counter)}"), args.presses)
    print(f"{args.shape}: {len(ids)}-token prompt, {args.presses} presses (medians)")
    print(f"  press with the session's KV cache   {cached:8.1f} ms")
    print(f"  press computing the sequence afresh  {prefilled:8.1f} ms")
    print(f"  model pass alone: one cached token   {step:8.1f} ms")
    print(f"  model pass alone: prefill of {len(ids) + 1:3d}      {prefill:8.1f} ms")


if __name__ == "__main__":
    main()
