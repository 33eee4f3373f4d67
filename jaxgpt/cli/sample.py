"""`jaxgpt sample --model MODEL --prompt TEXT`: continue a prompt with a GPT-2 model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

from jaxgpt.cli.common import load_model
from jaxgpt.config import PRESETS
from jaxgpt.decode import generate
from jaxgpt.errors import InputError
from jaxgpt.quantize import check_weights, quantize_params
from jaxgpt.sampling import make_sampler
from jaxgpt.tokenizer import ENDOFTEXT


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate text from a prompt",
        description="Continue a prompt with a GPT-2 model (KV-cache decoding in one jitted loop). "
        "The text goes to stdout; timing to stderr.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a Hugging Face GPT-2 directory, a jaxgpt training run directory, or a preset name "
        f"with RANDOM weights ({', '.join(PRESETS)})",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None, help=f"prompt text (default: {ENDOFTEXT})")
    source.add_argument(
        "--prompt-file", type=Path, default=None, help="read the prompt from this file"
    )
    parser.add_argument("--max-new-tokens", type=int, default=100, help="default 100")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    parser.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling: keep probability mass p"
    )
    parser.add_argument(
        "--weights",
        default="float32",
        metavar="{float32,bfloat16,int8}",
        help="store the weights in this format: bfloat16 halves and int8 (per-channel scales) "
        "quarters the bytes each token reads (default float32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    parser.add_argument(
        "--num-samples", type=int, default=1, help="independent continuations (default 1)"
    )
    parser.set_defaults(func=run)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            return args.prompt_file.read_text()
        except OSError as err:
            raise InputError(f"cannot read --prompt-file {args.prompt_file}: {err}") from err
    return ENDOFTEXT if args.prompt is None else args.prompt


def run(args: argparse.Namespace) -> int:
    if args.num_samples < 1:
        raise InputError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampler = make_sampler(args.temperature, args.top_k, args.top_p)  # validates before loading
    check_weights(args.weights)
    text = read_prompt(args)
    model = load_model(args.model, seed=args.seed)
    params = quantize_params(model.params, args.weights)
    tokenizer = model.tokenizer
    # GPT-2's tokenizer: "<|endoftext|>" in the prompt is the special token, not literal text.
    special = {"allowed_special": {ENDOFTEXT}} if tokenizer.eot_token is not None else {}
    prompt = tokenizer.encode(text, **special)
    if not prompt:
        raise InputError("the prompt is empty: give --prompt TEXT or a non-empty --prompt-file")
    print(
        f"sampling {args.num_samples} x {args.max_new_tokens} tokens from {model.source} "
        f"({args.weights} weights) "
        f"(prompt: {len(prompt)} tokens)",
        file=sys.stderr,
    )
    start = time.perf_counter()
    rows = generate(
        params,
        model.config,
        [prompt] * args.num_samples,
        args.max_new_tokens,
        key=jax.random.key(args.seed),
        sampler=sampler,
        eos_id=tokenizer.eot_token,
    )
    seconds = time.perf_counter() - start
    n_new = sum(len(row) - len(prompt) for row in rows)
    for i, row in enumerate(rows):
        if args.num_samples > 1:
            print(f"---------- sample {i + 1} of {args.num_samples}")
        print(tokenizer.decode(row))
    print(
        f"{n_new} new tokens in {seconds:.2f} s: {n_new / seconds:.1f} tokens/s "
        f"(including compilation on first use)",
        file=sys.stderr,
    )
    return 0
