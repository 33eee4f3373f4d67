"""`jaxgpt chat --model RUN_OR_HF_DIR`: talk to a chat model in the terminal, or answer a file.

Three forms:

    jaxgpt chat --model runs/chat_sft                          # interactive, replies streamed
    jaxgpt chat --model runs/chat_sft --prompt "What is 4 + 5?"    # one reply, then exit
    jaxgpt chat --model runs/chat_sft --input in.jsonl --output out.jsonl   # a file, in batches

The interactive form keeps the conversation and its KV cache across turns
(`jaxgpt.conversation`): each turn prefills only its own tokens (`/stats` shows how many, and
how many a fresh prefill would take). Generation stops at the end-of-turn token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxgpt import atomic, chat
from jaxgpt.cli.common import load_model
from jaxgpt.config import PRESETS
from jaxgpt.errors import InputError, JaxgptError
from jaxgpt.sampling import make_sampler


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a fine-tuned model (interactive, one prompt, or a .jsonl file)",
        description="Chat with a model fine-tuned on conversations (jaxgpt train chat_sft, or a "
        "Hugging Face GPT-2 exported with the chat tokens). Replies stream token by token; the "
        "KV cache is kept across turns. With --prompt, print one reply and exit; with --input/"
        '--output, answer every conversation of a .jsonl file (one {"messages": [...]} per '
        "line, ending with a user turn) and write each line back with the reply appended.",
    )
    parser.add_argument(
        "--model", required=True,
        help=f"a jaxgpt run directory or Hugging Face GPT-2 directory with chat tokens "
        f"(presets {', '.join(PRESETS)} have none)",
    )  # fmt: skip
    parser.add_argument("--system", default=None, help="a system message opening the chat")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (0.7)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="per reply (256)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (0)")
    once = parser.add_mutually_exclusive_group()
    once.add_argument("--prompt", default=None, help="answer this one message and exit")
    once.add_argument("--input", type=Path, default=None, help="a .jsonl file of conversations")
    parser.add_argument("--output", type=Path, default=None, help="where --input's answers go")
    parser.add_argument("--batch-size", type=int, default=32, help="--input rows per batch (32)")
    parser.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """Every argument checked before the model is loaded."""
    make_sampler(args.temperature, args.top_k, args.top_p)
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if (args.input is None) != (args.output is None):
        raise InputError("--input and --output go together: give both or neither")
    if args.input is not None:
        if not args.input.is_file():
            raise InputError(f"--input {args.input} is not a file")
        if not args.output.parent.is_dir():
            raise InputError(f"--output {args.output}: directory {args.output.parent} is missing")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    conversations = read_input(args.input, args.system) if args.input is not None else None
    model = load_model(args.model, seed=args.seed, decoding=True)
    chat.chat_tokens(model.tokenizer)  # a model without chat tokens: say how to get one
    if conversations is not None:
        return answer_file(args, model, conversations)
    session = new_session(args, model)
    if args.prompt is not None:
        for piece in session.reply(args.prompt):
            print(piece, end="", flush=True)
        print()
        return 0
    return interactive(session, model.source)


def new_session(args: argparse.Namespace, model):
    from jaxgpt.conversation import Conversation

    return Conversation(
        model.params, model.config, model.tokenizer, system=args.system,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, seed=args.seed,
    )  # fmt: skip


def interactive(session, source: str) -> int:
    print(f"chatting with {source}; /stats shows the cache reuse, /quit (or Ctrl-D) ends",
          file=sys.stderr)  # fmt: skip
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if text.strip() in ("/quit", "/exit"):
            return 0
        if text.strip() == "/stats":
            print(format_stats(session.turn_stats), file=sys.stderr)
            continue
        if not text.strip():
            continue
        print("assistant> ", end="", flush=True)
        try:
            for piece in session.reply(text):
                print(piece, end="", flush=True)
        except JaxgptError as err:
            print(f"\n(error: {err})", file=sys.stderr)
        print()


def format_stats(stats) -> str:
    lines = ["turn  prefilled  fresh prefill  generated"]
    for i, s in enumerate(stats, 1):
        note = "  (context full: restarted)" if s.restarted else ""
        lines.append(f"{i:>4}  {s.prefilled:>9}  {s.without_reuse:>13}  {s.generated:>9}{note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- --input / --output


def read_input(path: Path, system: str | None) -> list[dict]:
    """The input lines as dicts with a "messages" list ending in a user turn (checked)."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read --input {path}: {err}") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg}); expected JSONL") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]  # a bare question
        elif isinstance(record, dict) and "messages" in record:
            messages = record["messages"]
        else:
            raise InputError(f'{where}: expected {{"messages": [...]}} or {{"prompt": "..."}}')
        try:
            messages = chat.check_messages(messages)
        except JaxgptError as err:
            raise InputError(f"{where}: {err}") from None
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        if messages[-1]["role"] != "user":
            raise InputError(f"{where}: the conversation must end with a user turn to answer")
        rows.append({**(record if isinstance(record, dict) else {}), "messages": messages})
    if not rows:
        raise InputError(f"--input {path} holds no conversations")
    return rows


def answer_file(args: argparse.Namespace, model, rows: list[dict]) -> int:
    """Answer every conversation in batches (greedy when --temperature 0) and write the file."""
    import jax
    from tqdm import tqdm

    from jaxgpt.decode import generate

    tok, config = model.tokenizer, model.config
    end = chat.chat_tokens(tok).end
    prompts = [chat.render_prompt(r["messages"], tok) for r in rows]
    for i, p in enumerate(prompts):
        if len(p) >= config.block_size:
            raise InputError(f"--input conversation {i + 1} has {len(p)} tokens; the model's "
                             f"context is {config.block_size}")  # fmt: skip
    key = jax.random.key(args.seed)
    out_lines = []
    bar = tqdm(total=len(rows), desc="answering", unit=" conv", file=sys.stderr)
    for start in range(0, len(rows), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        n = min(args.max_new_tokens, config.block_size - max(len(p) for p in chunk))
        outs = generate(
            model.params, config, chunk, n, key=jax.random.fold_in(key, start),
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=end,
        )  # fmt: skip
        for row, prompt, out in zip(rows[start : start + args.batch_size], chunk, outs):
            reply = tok.decode([t for t in out[len(prompt) :] if t != end])
            messages = [*row["messages"], {"role": "assistant", "content": reply}]
            out_lines.append(json.dumps({**row, "messages": messages}, ensure_ascii=False))
        bar.update(len(chunk))
    bar.close()
    atomic.write_text(args.output, "\n".join(out_lines) + "\n")
    print(f"wrote {len(out_lines)} answered conversations to {args.output}", file=sys.stderr)
    return 0
