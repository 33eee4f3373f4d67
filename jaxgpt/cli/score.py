"""`jaxgpt score --model RM_RUN --input FILE [--output FILE]`: a reward model's scores of answers.

    jaxgpt score --model runs/chat_rm --input pairs.jsonl                  # JSON lines to stdout
    jaxgpt score --model runs/chat_rm --input pairs.jsonl --output scored.jsonl

Each input line is a preference `{"prompt", "chosen", "rejected"}` (as `jaxgpt pairs` writes and
`jaxgpt.preferences` reads) or a conversation `{"messages": [...]}` ending with the assistant
answer to score. Each output line is the input object with the scores added — `chosen_score`,
`rejected_score`, `margin` and `chosen_wins` for a preference, `score` for a conversation — and
the summary gives the pairwise accuracy over the preference lines (see `jaxgpt.reward_model`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt import atomic, chat, jsonl, preferences, reward_model
from jaxgpt.errors import ChatFormatError, InputError, JaxgptError, TokenizerError

CONVERSATION_KEYS = ("messages", "response", "output")  # the chat-data line forms


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="a reward model's scores of answers (preference pairs or conversations)",
        description="Score answers with a reward model (a run trained with model.head=reward): "
        'each line of --input is a preference {"prompt", "chosen", "rejected"} or a conversation '
        '{"messages": [...]} ending with the assistant answer to score. The score is read at the '
        "answer's last token (its <|end|>). Prints the scored lines as JSON (or writes them to "
        "--output) and the pairwise accuracy: how often the chosen answer scores higher. "
        "See docs/chat.md.",
    )
    parser.add_argument("--model", required=True, help="a reward-model run directory")
    parser.add_argument("--input", type=Path, required=True, help="a .jsonl file to score")
    parser.add_argument(
        "--output", type=Path, default=None, help="write the scored lines here (default: stdout)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def check_output(path: Path | None) -> None:
    """Fail before any work if the scores could not be written."""
    if path is None:
        return
    if path.is_dir():
        raise InputError(f"--output {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"--output {path}: the directory {parent} does not exist")


def read_lines(path: Path) -> list[tuple[str, dict[str, Any], Any]]:
    """(where, record, Preference or messages) for each line, checked before the model loads."""
    if not path.is_file():
        raise InputError(f"--input {path} is not a file")
    out = []
    for where, record in jsonl.records(path, what="--input", error=ChatFormatError):
        try:
            if isinstance(record, dict) and any(k in record for k in CONVERSATION_KEYS):
                item: Any = chat.conversation_from_record(record)
            else:
                item = preferences.preference_from_record(record)
        except JaxgptError as err:
            raise ChatFormatError(
                f'{where}: {err} (a line is {{"prompt", "chosen", "rejected"}} or '
                f'{{"messages": [...]}})'
            ) from err
        out.append((where, record, item))
    if not out:
        raise InputError(f"--input {path} holds no lines to score")
    return out


def render(lines: list[tuple[str, dict, Any]], tokenizer) -> list[list[int]]:
    """Token ids of every answer to score: a preference's chosen then rejected side, or the
    conversation; errors name the file and line."""
    sequences = []
    for where, _, item in lines:
        sides = (
            [item.conversation("chosen"), item.conversation("rejected")]
            if isinstance(item, preferences.Preference)
            else [item]
        )
        try:
            sequences += [reward_model.render_answer(m, tokenizer) for m in sides]
        except TokenizerError as err:
            raise TokenizerError(
                f"{where}: the reward model's {tokenizer.name} tokenizer cannot encode this line "
                f"({err}); score text of the kind the reward model was trained on"
            ) from err
        except JaxgptError as err:
            raise type(err)(f"{where}: {err}") from err
    return sequences


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_output(args.output)
    lines = read_lines(args.input)
    model = reward_model.load_reward_model(args.model)
    sequences = render(lines, model.tokenizer)
    for (where, _, _), n in zip(_owners(lines), (len(s) for s in sequences)):
        if n > model.config.block_size:
            raise InputError(
                f"{where}: {n} tokens, more than the reward model's context "
                f"(block_size {model.config.block_size})"
            )
    scores = reward_model.score_ids(
        model.params, model.config, sequences, batch_size=args.batch_size,
        progress=not args.quiet,
    )  # fmt: skip
    rows, chosen, rejected, single = scored_rows(lines, scores)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    summary = summarise(chosen, rejected, single, model.source)
    if args.output is None:
        sys.stdout.write(text)
        print(summary, file=sys.stderr)
    else:
        atomic.write_text(args.output, text)
        print(f"{summary}\nwrote {len(rows)} scored lines to {args.output}")
    return 0


def _owners(lines: list[tuple[str, dict, Any]]) -> list[tuple[str, dict, Any]]:
    """Each sequence's line (a preference line owns two sequences)."""
    out = []
    for line in lines:
        out += [line] * (2 if isinstance(line[2], preferences.Preference) else 1)
    return out


def scored_rows(lines: list[tuple[str, dict, Any]], scores: np.ndarray):
    """The output lines, and the chosen / rejected / single-answer scores for the summary."""
    rows, chosen, rejected, single = [], [], [], []
    i = 0
    for _, record, item in lines:
        if isinstance(item, preferences.Preference):
            c, r = float(scores[i]), float(scores[i + 1])
            i += 2
            chosen.append(c)
            rejected.append(r)
            rows.append({**record, "chosen_score": c, "rejected_score": r, "margin": c - r,
                         "chosen_wins": c > r})  # fmt: skip
        else:
            single.append(float(scores[i]))
            i += 1
            rows.append({**record, "score": single[-1]})
    return rows, np.array(chosen), np.array(rejected), np.array(single)


def summarise(chosen: np.ndarray, rejected: np.ndarray, single: np.ndarray, source: str) -> str:
    parts = []
    if len(chosen):
        acc, se = reward_model.pairwise_accuracy(chosen, rejected)
        parts.append(
            f"{len(chosen)} pairs: pairwise accuracy {acc:.4f} ± {se:.4f} (chosen scores higher), "
            f"mean margin {float(np.mean(chosen - rejected)):.3f}"
        )
    if len(single):
        parts.append(f"{len(single)} answers: mean score {float(np.mean(single)):.3f}")
    return f"{'; '.join(parts)} ({source})"
