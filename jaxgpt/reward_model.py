"""A reward model's scores of answers: what `jaxgpt score` prints and what PPO's rollouts earn.

A reward model is the GPT-2 trunk with a scalar head (`GPTConfig.head == "reward"`,
`jaxgpt.heads`), started from an SFT run and trained on preference pairs with the Bradley–Terry
loss (the `reward` objective of `jaxgpt.objectives`). It reads a whole conversation and gives one
number: the score head at the last token of the final assistant turn, its `<|end|>`
(`jaxgpt.heads.sequence_scores`). Everything before that token can change the score; the model is
causal, so nothing after it can, and rows padded on the right score exactly as they would alone.

    score_conversations(params, config, tokenizer, conversations) → float32 [N]
    score_ids(params, config, sequences)                          → float32 [N]
    score_preferences(params, config, tokenizer, preferences)     → (chosen [N], rejected [N])

Rows go through a jitted `sequence_scores` in chunks of `batch_size`, each padded to a length
bucket (a power of two, at most `block_size`), so a file of any size compiles a few shapes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxgpt import chat, heads
from jaxgpt.config import GPTConfig
from jaxgpt.errors import ChatFormatError, InputError, JaxgptError
from jaxgpt.params import Params
from jaxgpt.tokenizer import Tokenizer, tokenizer_to_json

MIN_BUCKET = 16  # the shortest padded row length compiled

_jit_sequence_scores = jax.jit(heads.sequence_scores, static_argnums=3)


def score_ids(
    params: Params,
    config: GPTConfig,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
    progress: bool = False,
    what: str = "sequence",
) -> np.ndarray:
    """The reward of each token sequence, float32 `[N]`, read at its last token.

    Args:
      params, config: a reward model (`config.head == "reward"`).
      sequences: N lists of token ids in the reward model's tokenizer, each a conversation
        rendered by `jaxgpt.chat` and ending with the `<|end|>` of the answer to score (e.g. a
        PPO rollout's prompt ids, its reply ids and `<|end|>`: a reply cut short without its
        `<|end|>` is read at its last token, which the reward model was never trained to read).
        At most `config.block_size` ids each.
      batch_size: rows per compiled call.
      what: how an error names one sequence ("conversation", "line" ...).

    Returns:
      float32 `[N]`; the same value whatever the other sequences of the call (padding is on the
      right and the model is causal).
    """
    heads.require_head(config, ("reward",), "scoring answers")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    lengths = [len(s) for s in sequences]
    for i, n in enumerate(lengths):
        if not 0 < n <= config.block_size:
            raise InputError(
                f"{what} {i + 1} has {n} tokens; the reward model reads 1 to block_size = "
                f"{config.block_size}"
            )
    out = np.zeros(len(sequences), np.float32)
    rows = min(batch_size, _bucket(len(sequences), 1))
    with tqdm(total=len(sequences), desc="score", unit=" answer", disable=not progress) as bar:
        for lo in range(0, len(sequences), rows):
            chunk = sequences[lo : lo + rows]
            width = min(_bucket(max(lengths[lo : lo + rows]), MIN_BUCKET), config.block_size)
            tokens_BT = np.zeros((rows, width), np.int32)
            last_B = np.zeros(rows, np.int32)
            for b, ids in enumerate(chunk):
                tokens_BT[b, : len(ids)] = ids
                last_B[b] = len(ids) - 1
            scores_B = _jit_sequence_scores(params, tokens_BT, last_B, config)
            out[lo : lo + len(chunk)] = np.asarray(scores_B)[: len(chunk)]
            bar.update(len(chunk))
    return out


def _bucket(n: int, smallest: int) -> int:
    """The smallest power of two ≥ max(n, smallest)."""
    size = smallest
    while size < n:
        size *= 2
    return size


def render_answer(messages: Sequence[dict[str, Any]], tokenizer: Tokenizer) -> list[int]:
    """A conversation ending with the assistant answer to score → its ids (ending with `<|end|>`).

    A ChatFormatError if the conversation is not in the chat format or does not end with an
    assistant turn; a TokenizerError if the reward model's tokenizer cannot encode its text.
    """
    messages = chat.check_messages(messages)
    if messages[-1]["role"] != "assistant":
        raise ChatFormatError(
            f"the last message is a {messages[-1]['role']} turn; a reward model scores the "
            f"assistant answer that ends the conversation"
        )
    ids, _ = chat.render_conversation(messages, tokenizer)
    return ids


def score_conversations(
    params: Params,
    config: GPTConfig,
    tokenizer: Tokenizer,
    conversations: Sequence[Sequence[dict[str, Any]]],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """The reward of each conversation's final assistant answer, float32 `[N]` — PPO's entry.

    Args:
      params, config, tokenizer: a reward model and its tokenizer (`jaxgpt.cli.common.load_model`
        with `heads=("reward",)`, or `load_reward_model`); `tokenizer` has the chat tokens.
      conversations: N conversations in the chat format (`[{"role", "content"}, ...]`), each
        ending with the assistant answer to score, e.g. `prompt_messages + [{"role":
        "assistant", "content": reply_text}]`.
      batch_size, progress: rows per compiled call; a progress bar.

    Returns:
      float32 `[N]`, higher for answers the reward model prefers; comparable between answers to
      the same prompt (the Bradley–Terry loss fixes only differences of scores).

    Raises:
      ChatFormatError / TokenizerError / InputError (one line, naming the conversation) for a
      conversation that is not one, text the tokenizer cannot encode, or one longer than
      `config.block_size` tokens.
    """
    sequences = []
    for i, messages in enumerate(conversations):
        try:
            sequences.append(render_answer(messages, tokenizer))
        except JaxgptError as err:
            raise type(err)(f"conversation {i + 1}: {err}") from err
    return score_ids(params, config, sequences, batch_size=batch_size, progress=progress,
                     what="conversation")  # fmt: skip


def score_preferences(
    params: Params,
    config: GPTConfig,
    tokenizer: Tokenizer,
    preferences: Sequence[Any],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen `[N]`, rejected `[N]`) rewards of `jaxgpt.preferences.Preference` pairs: each side
    is the prompt followed by that answer, scored as by `score_conversations`."""
    sides = [[p.conversation(side) for p in preferences] for side in ("chosen", "rejected")]
    flat = score_conversations(params, config, tokenizer, sides[0] + sides[1],
                               batch_size=batch_size, progress=progress)  # fmt: skip
    return flat[: len(preferences)], flat[len(preferences) :]


def pairwise_accuracy(chosen_N: np.ndarray, rejected_N: np.ndarray) -> tuple[float, float]:
    """(share of pairs whose chosen answer scores strictly higher, its standard error)."""
    if len(chosen_N) == 0:
        raise InputError("no pairs to score")
    wins = np.asarray(chosen_N) > np.asarray(rejected_N)
    p = float(wins.mean())
    return p, float(np.sqrt(p * (1 - p) / len(wins)))


def check_tokenizer(reward_tokenizer: Tokenizer, tokenizer: Tokenizer, where: str) -> None:
    """Refuse token ids made by another tokenizer than the reward model's (`where` names them):
    the reward model would read them as other text."""
    if tokenizer_to_json(reward_tokenizer) != tokenizer_to_json(tokenizer):
        raise InputError(
            f"{where} are {tokenizer.name} tokens ({tokenizer.n_vocab} ids), but the reward model "
            f"reads another table ({reward_tokenizer.name}, {reward_tokenizer.n_vocab} ids); its "
            f"scores of them would be of other text"
        )


def check_fits(longest: int, block_size: int, where: str) -> None:
    """Refuse conversations longer than the T = block_size tokens a reward model reads in
    training: the `reward` objective reads the score at the answer's `<|end|>`, which must be
    among the T input tokens of the `[T+1]` row."""
    if longest > block_size:
        raise InputError(
            f"{where}: the longest conversation has {longest} tokens, but a reward model with "
            f"model.block_size = {block_size} reads at most {block_size} (the answer's <|end|> "
            f"must be an input); raise model.block_size or shorten those pairs"
        )


def check_prepared_fits(data_dir: Any, block_size: int) -> None:
    """`check_fits` for both splits of a prepared preference directory."""
    from jaxgpt import preferences

    for split in preferences.SPLITS:
        pairs = preferences.load_pairs(data_dir, split)
        check_fits(pairs.longest(), block_size, f"{data_dir} ({split})")


def prepared_sequences(pairs: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(chosen, rejected) token ids of every pair of a prepared split
    (`jaxgpt.preferences.Pairs`); each ends with its answer's `<|end|>`."""
    return tuple(
        [side.doc(i)[0] for i in range(pairs.count)] for side in (pairs.chosen, pairs.rejected)
    )


def evaluate_pairs(
    params: Params, config: GPTConfig, chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]], *, batch_size: int = 64,
) -> dict[str, float]:  # fmt: skip
    """Pairwise accuracy (± standard error), mean margin and count of scored pairs."""
    scores = score_ids(params, config, [*chosen, *rejected], batch_size=batch_size)
    chosen_N, rejected_N = scores[: len(chosen)], scores[len(chosen) :]
    acc, se = pairwise_accuracy(chosen_N, rejected_N)
    margin = float(np.mean(chosen_N - rejected_N))
    return {"accuracy": acc, "stderr": se, "margin": margin, "n": len(chosen)}


def stage_figures(
    exp: Any,
    params: Params,
    config: GPTConfig,
    tokenizer: Tokenizer,
    data_dir: Any,
    last_eval: dict[str, float],
    *,
    arithmetic_task: bool,
    run_dir: Any = None,
) -> dict[str, Any]:
    """The reward-model part of report.json: pairwise accuracy on every val pair, each scored
    once (their prompts are never trained on: the split is by prompt), and for the arithmetic
    demo started from a chat run, on pairs of held-out problems made for this evaluation only
    (`held_out_pairs`, written to `run_dir/held_out_pairs.jsonl`)."""
    from jaxgpt import checkpoint, preferences

    t0 = time.perf_counter()
    pairs = preferences.load_pairs(data_dir, "val")
    val = evaluate_pairs(params, config, *prepared_sequences(pairs))
    figures: dict[str, Any] = {
        "init": exp.model.init,
        "val_pairs": {**val, "eval_wall_s": round(time.perf_counter() - t0, 1)},
        "val_reward_accuracy_last_eval": last_eval.get("val_reward_accuracy"),
    }
    if arithmetic_task and run_dir is not None and checkpoint.is_run_dir(exp.model.init):
        t0 = time.perf_counter()
        path = Path(run_dir) / HELD_OUT_PAIRS
        built = held_out_pairs(exp.model.init, path)
        held_out = preferences.read_preferences(path)
        scored: dict[str, Any] = {"n": 0}  # no pairs when every prompt's answers tie
        if held_out:
            chosen, rejected = score_preferences(params, config, tokenizer, held_out, batch_size=64)
            acc, se = pairwise_accuracy(chosen, rejected)
            scored = {"accuracy": acc, "stderr": se, "margin": float(np.mean(chosen - rejected)),
                      "n": len(chosen)}  # fmt: skip
        figures["held_out_pairs"] = {
            **scored, "prompts": built.prompts, "file": HELD_OUT_PAIRS,
            "eval_wall_s": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
    return figures


HELD_OUT_PAIRS = "held_out_pairs.jsonl"


def held_out_pairs(init: str, out: Any, *, n: int = 500, seed: int = 2) -> Any:
    """Pairs of `n` held-out arithmetic problems (A ≡ B mod 7, `arithmetic.held_out_problems`),
    built from the chat run `init` exactly as `jaxgpt pairs` builds training pairs (4 answers
    per prompt at temperature 1, scored by the verifier, `jaxgpt.pairing.build_pairs`) and
    written to `out`. For evaluation only: no stage may train on them. Returns the PairStats."""
    from jaxgpt import arithmetic, pairing
    from jaxgpt.cli.common import load_model

    sft = load_model(init)
    prompts = [
        [{"role": "user", "content": arithmetic.question(a, b, p)}]
        for a, b, p in arithmetic.held_out_problems(n, seed)
    ]
    return pairing.build_pairs(
        sft.params, sft.config, sft.tokenizer, prompts, pairing.SCORERS["arithmetic"], out,
        seed=seed, progress=False,
    )  # fmt: skip


def load_reward_model(spec: str, **overrides: Any):
    """A reward model from a run directory (or Hugging Face directory) as
    `jaxgpt.cli.common.LoadedModel`; a language model or PPO policy is refused in one line."""
    from jaxgpt.cli.common import load_model

    return load_model(spec, heads=("reward",), **overrides)
