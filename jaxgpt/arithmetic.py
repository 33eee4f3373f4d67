"""The arithmetic chat demo: problems, conversations, and the verifier that scores replies.

A user asks for the sum of two integers A, B in [0, 99] ("What is 45 + 38?" and a few other
phrasings, sometimes several questions in one conversation); the assistant answers with a short
worked line (column addition) that ends with the sum::

    user:      What is 45 + 38?
    assistant: 45+38: 5+8=13 4+3+1=8 so 83

The task is learnable by a small model on a 2-core CPU and checkable by a program, so how well a
stage (SFT, a reward model, PPO, DPO) works is a number: exact-match accuracy of the last integer
of the reply (`verify`).

Held-out problems: the pairs with A ≡ B (mod 7) — 1,430 of the 10,000 ordered pairs — never
appear in any training data of any stage (`is_held_out`). Every generator here refuses to emit
them for training, so accuracy on them measures generalisation, not memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt.errors import InputError

MAX_OPERAND = 99
HELD_OUT_MODULUS = 7

# How a user may ask; `{a}` and `{b}` are the operands.
PHRASINGS = (
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "How much is {a} + {b}?",
    "{a} + {b} = ?",
)
SYSTEM_PROMPT = "You add numbers."

_LAST_INTEGER = re.compile(r"-?\d+")


def is_held_out(a: int, b: int) -> bool:
    """Whether (a, b) is a held-out problem: a ≡ b (mod 7). No stage may train on it."""
    return (a - b) % HELD_OUT_MODULUS == 0


def answer(a: int, b: int) -> str:
    """The assistant's reply: column addition worked in one line, ending with the sum.

    45 + 38 → "45+38: 5+8=13 4+3+1=8 so 83": the operands copied, the ones, the tens with the
    carry, then the result. Every step is a one-digit sum the model sees in training whatever
    the held-out pairs are, so the scratchpad lets it generalise to them; copying the operands
    first puts the digits it needs next to where it adds them.
    """
    ones = a % 10 + b % 10
    tens = a // 10 + b // 10 + ones // 10
    steps = f"{a % 10}+{b % 10}={ones} {a // 10}+{b // 10}+{ones // 10}={tens}"
    return f"{a}+{b}: {steps} so {a + b}"


def question(a: int, b: int, phrasing: int = 0) -> str:
    return PHRASINGS[phrasing % len(PHRASINGS)].format(a=a, b=b)


def verify(reply: str, a: int, b: int) -> bool:
    """Exact match: the last integer in the reply is a + b."""
    found = _LAST_INTEGER.findall(reply)
    return bool(found) and int(found[-1]) == a + b


def draw_pairs(rng: np.random.Generator, n: int, *, held_out: bool) -> list[tuple[int, int]]:
    """`n` operand pairs, uniformly among the training pairs or among the held-out ones."""
    out: list[tuple[int, int]] = []
    while len(out) < n:
        a, b = (int(x) for x in rng.integers(0, MAX_OPERAND + 1, size=2))
        if is_held_out(a, b) == held_out:
            out.append((a, b))
    return out


def conversation(
    rng: np.random.Generator, *, held_out: bool = False, max_turns: int = 2
) -> list[dict[str, str]]:
    """One chat: an optional system prompt, then 1..max_turns question/answer turns."""
    turns = 1 if rng.random() < 0.7 else int(rng.integers(2, max_turns + 1))
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.2 else []
    for a, b in draw_pairs(rng, turns, held_out=held_out):
        phrasing = int(rng.integers(len(PHRASINGS)))
        messages.append({"role": "user", "content": question(a, b, phrasing)})
        messages.append({"role": "assistant", "content": answer(a, b)})
    return messages


def training_conversations(n: int, seed: int) -> Iterator[list[dict[str, str]]]:
    """`n` training conversations (never a held-out pair), deterministic in `seed`."""
    rng = np.random.default_rng([seed, 0])
    for _ in range(n):
        yield conversation(rng)


def held_out_problems(n: int, seed: int) -> list[tuple[int, int, int]]:
    """`n` held-out problems (a, b, phrasing), deterministic in `seed`."""
    rng = np.random.default_rng([seed, 1])
    return [(a, b, int(rng.integers(len(PHRASINGS)))) for a, b in draw_pairs(rng, n, held_out=True)]


def operands(text: str) -> tuple[int, int] | None:
    """The two integers of a question ("What is 45 + 38?" → (45, 38)); None unless exactly two."""
    numbers = [int(x) for x in _LAST_INTEGER.findall(text)]
    return (numbers[0], numbers[1]) if len(numbers) == 2 else None


def check_training_messages(messages: list[dict[str, str]]) -> None:
    """Raise InputError if a conversation holds a held-out problem (in any user turn)."""
    for message in messages:
        if message.get("role") != "user":
            continue
        numbers = operands(message.get("content", ""))
        if numbers is not None and is_held_out(*numbers):
            raise InputError(
                f"training data holds the held-out problem {numbers[0]} + {numbers[1]} "
                f"(A ≡ B mod {HELD_OUT_MODULUS})"
            )


def write_jsonl(path: str | Path, conversations: Iterator[list[dict[str, str]]]) -> int:
    """Write `{"messages": [...]}` lines (the chat data format); returns the line count."""
    from jaxgpt import atomic

    count = 0
    with atomic.staged_file(path) as handle:
        for messages in conversations:
            check_training_messages(messages)
            handle.write(json.dumps({"messages": messages}) + "\n")
            count += 1
    return count


def accuracy(replies: list[str], problems: list[tuple[int, int, int]]) -> tuple[float, float]:
    """(exact-match accuracy, its standard error) of `replies` to `problems`."""
    if len(replies) != len(problems) or not problems:
        raise InputError(f"{len(replies)} replies for {len(problems)} problems")
    hits = np.array([verify(r, a, b) for r, (a, b, _) in zip(replies, problems)], np.float64)
    p = float(hits.mean())
    return p, float(np.sqrt(p * (1 - p) / len(hits)))


# --------------------------------------------------------------------------- scoring a model


def reply_prompts(problems: list[tuple[int, int, int]], tokenizer: Any) -> list[list[int]]:
    """The chat prompts (ids ending with the open assistant turn) asking each problem."""
    from jaxgpt import chat

    return [
        chat.render_prompt([{"role": "user", "content": question(a, b, p)}], tokenizer)
        for a, b, p in problems
    ]


def evaluate_model(
    params: Any,
    config: Any,
    tokenizer: Any,
    *,
    n: int = 500,
    seed: int = 1,
    batch_size: int = 100,
    max_new_tokens: int = 40,
) -> dict[str, Any]:
    """Greedy replies of a chat model to `n` held-out problems, scored by `verify`.

    Returns {"accuracy", "stderr", "n", "examples"} (a few problem/reply pairs to look at).
    """
    from jaxgpt import chat
    from jaxgpt.decode import generate

    problems = held_out_problems(n, seed)
    prompts = reply_prompts(problems, tokenizer)
    end = chat.chat_tokens(tokenizer).end
    max_new_tokens = min(max_new_tokens, config.block_size - max(len(p) for p in prompts))
    replies: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        rows = generate(params, config, chunk, max_new_tokens, temperature=0.0, eos_id=end)
        for prompt, row in zip(chunk, rows):
            new = [t for t in row[len(prompt) :] if t != end]
            replies.append(tokenizer.decode(new))
    acc, se = accuracy(replies, problems)
    examples = [
        {"question": question(a, b, p), "reply": r, "correct": verify(r, a, b)}
        for (a, b, p), r in zip(problems[:5], replies[:5])
    ]
    return {"accuracy": acc, "stderr": se, "n": n, "examples": examples}
