"""`jaxgpt sample --model MODEL --prompt TEXT`: continue a prompt with a GPT-2 model.

With one sample the text is streamed: each token is printed as soon as the decoder has it.
Continuations longer than the model's context slide the window (`jaxgpt.decode`'s policy).
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from pathlib import Path

import jax

from jaxgpt.cli.common import load_model
from jaxgpt.config import PRESETS
from jaxgpt.decode import check_request, generate, stream_generate
from jaxgpt.errors import InputError
from jaxgpt.quantize import check_weights, decode_layout, quantize_params
from jaxgpt.sampling import make_sampler
from jaxgpt.tokenizer import ENDOFTEXT, Tokenizer

# Decode steps per compiled call while streaming (see "Streaming" in docs/generation.md).
STREAM_CHUNK = 4


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate text from a prompt",
        description="Continue a prompt with a GPT-2 model (KV-cache decoding in a jitted loop). "
        "The text goes to stdout, streamed as it is generated (one sample); timing to stderr. "
        "Continuations longer than the model's context slide the window: when the context is "
        "full, the model continues from the last half of it.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a Hugging Face GPT-2 directory, a jaxgpt training run directory, or a preset name "
        f"with RANDOM weights ({', '.join(PRESETS)})",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--prompt", default=None,
        help=f"prompt text (default: {ENDOFTEXT} for GPT-2's tokenizer, a newline for a "
        f"character-level run)",
    )  # fmt: skip
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
    parser.add_argument(
        "--no-stream",
        action="store_true",
        help="print the text when it is complete instead of token by token",
    )
    parser.set_defaults(func=run)


def read_prompt(args: argparse.Namespace) -> str | None:
    if args.prompt_file is not None:
        try:
            return args.prompt_file.read_text(encoding="utf-8")
        except OSError as err:
            raise InputError(f"cannot read --prompt-file {args.prompt_file}: {err}") from err
        except UnicodeDecodeError as err:
            raise InputError(
                f"--prompt-file {args.prompt_file} is not UTF-8 text (byte {err.start}: "
                f"{err.reason}); save it as UTF-8"
            ) from err
    return args.prompt


def run(args: argparse.Namespace) -> int:
    if args.num_samples < 1:
        raise InputError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampler = make_sampler(args.temperature, args.top_k, args.top_p)  # validates before loading
    check_weights(args.weights)
    text = read_prompt(args)
    model = load_model(args.model, seed=args.seed)
    params = decode_layout(quantize_params(model.params, args.weights))
    tokenizer = model.tokenizer
    if text is None:  # unconditional: GPT-2's document separator; a char vocabulary has none
        text = ENDOFTEXT if tokenizer.eot_token is not None else "\n"
    # GPT-2's tokenizer: "<|endoftext|>" in the prompt is the special token, not literal text.
    special = {"allowed_special": {ENDOFTEXT}} if tokenizer.eot_token is not None else {}
    prompt = tokenizer.encode(text, **special)
    if not prompt:
        raise InputError("the prompt is empty: give --prompt TEXT or a non-empty --prompt-file")
    check_request(model.config, prompt, args.max_new_tokens, slide=True)  # before any output
    config = model.config
    slides = len(prompt) + args.max_new_tokens > config.block_size
    print(
        f"sampling {args.num_samples} x {args.max_new_tokens} tokens from {model.source} "
        f"({args.weights} weights) (prompt: {len(prompt)} tokens"
        + (
            f"; prompt + continuation exceed the context of {config.block_size} tokens: "
            f"whenever it is full the model goes on from its last {config.block_size // 2}"
            if slides
            else ""
        )
        + ")",
        file=sys.stderr,
    )
    settings = dict(
        key=jax.random.key(args.seed), sampler=sampler, eos_id=tokenizer.eot_token, slide=True
    )
    start = time.perf_counter()
    if args.num_samples == 1 and not args.no_stream:
        n_new = print_stream(
            tokenizer,
            prompt,
            stream_generate(
                params, config, prompt, args.max_new_tokens, chunk=STREAM_CHUNK, **settings
            ),
        )
    else:
        rows = generate(
            params, config, [prompt] * args.num_samples, args.max_new_tokens, **settings
        )
        n_new = sum(len(row) - len(prompt) for row in rows)
        for i, row in enumerate(rows):
            if args.num_samples > 1:
                print(f"---------- sample {i + 1} of {args.num_samples}")
            print(tokenizer.decode(row))
    seconds = time.perf_counter() - start
    print(
        f"{n_new} new tokens in {seconds:.2f} s: {n_new / seconds:.1f} tokens/s "
        f"(including compilation on first use)",
        file=sys.stderr,
    )
    return 0


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """One token's UTF-8 bytes (a GPT-2 token may hold part of a character)."""
    single = getattr(tokenizer, "decode_single_token_bytes", None)
    if single is not None:
        return single(token_id)
    return tokenizer.decode([token_id]).encode("utf-8")


def print_stream(tokenizer: Tokenizer, prompt: list[int], stream) -> int:
    """Print the prompt, then each chunk of new tokens as it arrives; return the count.

    Bytes go through an incremental UTF-8 decoder (errors replaced, as `tokenizer.decode` does),
    so a character split across tokens is printed once it is complete: the text printed equals
    `tokenizer.decode(prompt + new tokens)`.
    """
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout
    out.write(text.decode(b"".join(token_bytes(tokenizer, t) for t in prompt)))
    out.flush()
    n_new = 0
    for new_1K in stream:
        new = new_1K[0].tolist()
        if tokenizer.eot_token in new:
            new = new[: new.index(tokenizer.eot_token) + 1]
        n_new += len(new)
        out.write(text.decode(b"".join(token_bytes(tokenizer, t) for t in new)))
        out.flush()
    out.write(text.decode(b"", final=True) + "\n")
    out.flush()
    return n_new
