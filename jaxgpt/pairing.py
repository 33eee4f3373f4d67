"""Preference pairs from a chat model: sample several answers per prompt, score them, pair them.

    prompts ─→ the model samples `samples` answers to each (batched KV-cache decoding,
               `jaxgpt.decode.generate`) ─→ a scorer gives each answer a number ─→ pairs

This is the "people rank the model's answers" step of RLHF, with a program as the people: for the
arithmetic demo the scorer is the verifier (`jaxgpt.arithmetic.verify`: 1 if the reply's last
integer is the sum, else 0). Scorers are registered in `SCORERS` by name.

The pairing rule (`pair_answers`), per prompt:

* an answer cut off by the token limit (no `<|end|>`) scores as the worst possible: it is never
  chosen;
* an answer holding another chat token (e.g. one that opens a new turn) is dropped: a preference
  line is text, where that token cannot be written;
* the chosen candidates are the distinct answers with the best score, the rejected candidates the
  distinct answers with a lower one (worst first);
* a prompt whose answers all score the same (all right, or all wrong: a tie) gives no pair —
  there is nothing to prefer;
* otherwise the i-th chosen candidate is paired with the i-th rejected one, for i below
  `max_pairs` and the size of either list, so no answer is in two pairs of a prompt.

Prompts for the demo are drawn from a seed among the training problems; a held-out problem
(A ≡ B mod 7) is never a prompt (`jaxgpt.arithmetic.check_training_messages` guards a prompt file
too). The pairs are written as `jaxgpt.preferences` lines, `"task": "arithmetic"` included for
the demo.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxgpt import arithmetic, atomic, chat, jsonl
from jaxgpt.errors import ChatFormatError, InputError, JaxgptError

Messages = list[dict[str, str]]


# --------------------------------------------------------------------------- scorers


def arithmetic_score(prompt: Messages, reply: str) -> float:
    """1.0 if the reply's last integer is the sum of the two integers of the last user turn."""
    numbers = arithmetic.operands(prompt[-1]["content"])
    if numbers is None:
        raise InputError(
            f"the arithmetic scorer needs a question with two integers, got "
            f"{prompt[-1]['content']!r}"
        )
    return float(arithmetic.verify(reply, *numbers))


Scorer = Callable[[Messages, str], float]
SCORERS: dict[str, Scorer] = {"arithmetic": arithmetic_score}


# --------------------------------------------------------------------------- prompts


def arithmetic_prompts(n: int, seed: int) -> list[Messages]:
    """`n` arithmetic questions among the training problems (never held out), from `seed`."""
    rng = np.random.default_rng([seed, 2])  # a stream of its own: [seed, 0] / [seed, 1] are taken
    pairs = arithmetic.draw_pairs(rng, n, held_out=False)
    phrasings = rng.integers(len(arithmetic.PHRASINGS), size=n)
    return [[{"role": "user", "content": arithmetic.question(a, b, int(p))}]
            for (a, b), p in zip(pairs, phrasings)]  # fmt: skip


def file_prompts(path: str | Path, n: int) -> list[Messages]:
    """The first `n` prompts of a `.jsonl` file: lines `{"prompt": text or messages}` (as in
    preference data; other keys are ignored), each ending with a user turn."""
    out: list[Messages] = []
    for where, record in jsonl.records(path, what="prompts", error=ChatFormatError):
        if len(out) == n:
            break
        try:
            if not isinstance(record, dict) or "prompt" not in record:
                raise ChatFormatError('expected an object with a "prompt"')
            prompt = record["prompt"]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            chat.check_messages(messages)
            if messages[-1]["role"] != "user":
                raise ChatFormatError("the prompt must end with a user turn")
        except JaxgptError as err:
            raise ChatFormatError(f"{where}: {err}") from err
        out.append([dict(m) for m in messages])
    if not out:
        raise InputError(f"{path} holds no prompts")
    return out


# --------------------------------------------------------------------------- pairing


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    score: float
    finished: bool  # ended with <|end|> within the token limit


def pair_answers(answers: Sequence[Answer], max_pairs: int) -> list[tuple[Answer, Answer]]:
    """(chosen, rejected) pairs of one prompt's answers by the rule in the module docstring."""
    distinct: dict[str, float] = {}
    for a in answers:
        distinct.setdefault(a.text, a.score if a.finished else -math.inf)
    best = max(distinct.values())
    chosen = [t for t, s in distinct.items() if s == best]
    rejected = sorted((t for t, s in distinct.items() if s < best), key=lambda t: distinct[t])
    by_text = {a.text: a for a in answers}
    return [(by_text[c], by_text[r]) for c, r in zip(chosen, rejected)][:max_pairs]


@dataclasses.dataclass(frozen=True)
class PairStats:
    prompts: int
    with_pairs: int
    pairs: int
    no_pairs: int  # prompts whose answers all scored the same (a tie: no pair)
    dropped: int  # answers holding a chat token other than the final <|end|>
    mean_score: float


def build_pairs(
    params: Any,
    config: Any,
    tokenizer: Any,
    prompts: list[Messages],
    scorer: Scorer,
    out: str | Path,
    *,
    samples: int = 4,
    temperature: float = 1.0,
    max_pairs: int = 2,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_rows: int = 256,
    task: str = "",
    greedy: bool = False,
    progress: bool = True,
) -> PairStats:
    """Sample `samples` answers per prompt, score and pair them, write `out` (.jsonl, atomic).

    Rows of `batch_rows` (prompts × samples) are decoded together; the draw is a function of
    `seed` and the prompts alone. With `greedy`, each prompt's greedy answer comes first, before
    its samples: a wrong greedy answer is then the first one rejected (the mistakes the model
    makes when it decodes greedily are the ones paired first).
    """
    from jaxgpt.decode import generate

    ids_of = chat.chat_tokens(tokenizer)
    end, specials = ids_of.end, set(dataclasses.astuple(ids_of))
    encoded = [chat.render_prompt(p, tokenizer) for p in prompts]
    longest = max(len(p) for p in encoded)
    if longest >= config.block_size:
        raise InputError(
            f"a prompt has {longest} tokens, leaving no room for an answer in the model's "
            f"context of {config.block_size}"
        )
    new_tokens = min(max_new_tokens, config.block_size - longest)
    per_batch = max(1, batch_rows // samples)
    key = jax.random.key(seed)
    lines: list[dict[str, Any]] = []
    with_pairs = dropped = 0
    scores: list[float] = []
    bar = tqdm(total=len(prompts), desc="sampling", unit=" prompt", disable=not progress)
    with bar:
        for start in range(0, len(prompts), per_batch):
            chunk = encoded[start : start + per_batch]
            rows = [p for p in chunk for _ in range(samples)]
            outs = generate(params, config, rows, new_tokens, key=jax.random.fold_in(key, start),
                            temperature=temperature, eos_id=end)  # fmt: skip
            firsts = []
            if greedy:
                firsts = generate(params, config, chunk, new_tokens, temperature=0.0, eos_id=end)
            for i, prompt in enumerate(prompts[start : start + per_batch]):
                answers = []
                mine = outs[i * samples : (i + 1) * samples]
                for out_row in ([firsts[i]] if greedy else []) + mine:
                    new = out_row[len(chunk[i]) :]
                    finished = bool(new) and new[-1] == end
                    body = new[:-1] if finished else new
                    if specials.intersection(body):
                        dropped += 1
                        continue
                    text = tokenizer.decode(body)
                    answers.append(Answer(text, scorer(prompt, text), finished))
                scores += [a.score for a in answers]
                pairs = pair_answers(answers, max_pairs) if answers else []
                with_pairs += bool(pairs)
                lines += [_line(prompt, c, r, task) for c, r in pairs]
            bar.update(min(per_batch, len(prompts) - start))
    with atomic.staged_file(out) as handle:
        handle.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    n = len(prompts)
    mean = float(np.mean(scores)) if scores else math.nan
    return PairStats(n, with_pairs, len(lines), n - with_pairs, dropped, mean)


def _line(prompt: Messages, chosen: Answer, rejected: Answer, task: str) -> dict[str, Any]:
    single = len(prompt) == 1
    line = {
        "prompt": prompt[0]["content"] if single else prompt,
        "chosen": chosen.text,
        "rejected": rejected.text,
        "scores": [chosen.score, rejected.score if rejected.finished else None],
    }
    if task:
        line["task"] = task
    return line


def check_prompts(prompts: list[Messages], task: str) -> None:
    """For the arithmetic task, refuse a held-out problem among the prompts."""
    if task == "arithmetic":
        for n, prompt in enumerate(prompts, start=1):
            try:
                arithmetic.check_training_messages(prompt)
            except InputError as err:
                raise InputError(f"prompt {n}: {err}") from err


def summary(stats: PairStats, out: Path) -> str:
    return (
        f"wrote {stats.pairs:,} pairs to {out}: {stats.with_pairs:,} of {stats.prompts:,} "
        f"prompts gave pairs, {stats.no_pairs:,} gave none (all answers scored the same); "
        f"mean score of the samples {stats.mean_score:.3f}; {stats.dropped:,} answers holding a "
        f"chat token dropped"
    )
