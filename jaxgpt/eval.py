"""Log-probabilities of given tokens, and the evaluations built on them.

    tokens [B, T] → forward → logits [B, T-1, V] → log p(tokens[:, t+1] | tokens[:, :t+1])  [B, T-1]

`logprobs` is the building block: DPO, PPO and every evaluation here sum it under a mask.

* **Perplexity** of a prepared split (`perplexity`): the split is one token stream, read in windows
  of `block_size + 1` tokens that start every `stride` tokens; each window scores only the tokens
  no earlier window scored, so every token after the first is scored exactly once. A token scored
  in a later window sees at least `block_size - stride + 1` tokens of left context (the whole
  prefix in the first window). `stride = block_size` is the cheapest (windows share one token);
  `stride = 1` gives every token the full context (one window per token). Reports the mean
  negative log-likelihood per token (nats), its exponential (perplexity), and bits per byte:
  the total in bits over the UTF-8 bytes of the scored tokens' text.
* **Multiple choice** (`evaluate_choices`, HellaSwag and a generic JSONL): each choice is the
  continuation `" " + choice` of the context; `acc` picks the choice with the largest *sum* of its
  tokens' log-probabilities, `acc_norm` the largest *mean per token* (the completion-style scoring
  of llm.c's and build-nanogpt's `hellaswag.py`, see docs/eval.md).

Batches have a bounded set of shapes (rows padded to a fixed count, lengths to a power of two), so
a whole evaluation compiles a handful of times. Padding goes on the right: attention is causal, so
it never changes the scores of the real tokens before it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxgpt import jsonl
from jaxgpt.config import GPTConfig
from jaxgpt.errors import InputError, JaxgptError
from jaxgpt.model import forward
from jaxgpt.params import Params
from jaxgpt.tokenizer import CharTokenizer, Tokenizer

# --------------------------------------------------------------------------- log-probabilities


def logprobs(params: Params, config: GPTConfig, tokens_BT: jax.Array) -> jax.Array:
    """`log p(tokens[:, t+1] | tokens[:, :t+1])` for t = 0 … T-2: float32 `[B, T-1]`.

    A pure function (jit it with `static_argnames="config"`); T ≤ block_size + 1, because the
    last token is only a target. Computed as `logit[target] - logsumexp(logits)`: only the
    target logits and the log-normaliser are formed, no `[B, T, V]` array of log-softmax values.
    """
    logits_BTV = forward(params, tokens_BT[:, :-1], config).astype(jnp.float32)
    targets_BT = tokens_BT[:, 1:]
    target_logits_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return target_logits_BT - jax.nn.logsumexp(logits_BTV, axis=-1)


@functools.partial(jax.jit, static_argnames="config")
def masked_logprob_sum(
    params: Params, config: GPTConfig, tokens_BT: jax.Array, mask_BT1: jax.Array
) -> jax.Array:
    """Per row, the sum of `logprobs` where `mask_BT1` ([B, T-1], 0/1) is 1: float32 `[B]`."""
    return jnp.sum(jnp.where(mask_BT1 > 0, logprobs(params, config, tokens_BT), 0.0), axis=-1)


def _score_rows(
    params: Params, config: GPTConfig, tokens_BT: np.ndarray, mask_BT1: np.ndarray
) -> np.ndarray:
    # Under jit an out-of-range id would be clamped silently: refuse it here, on the host.
    if tokens_BT.max() >= config.vocab_size:
        raise InputError(
            f"token id {int(tokens_BT.max())} is outside the model's vocabulary "
            f"[0, {config.vocab_size - 1}]: the tokens come from another tokenizer"
        )
    return np.asarray(masked_logprob_sum(params, config, jnp.asarray(tokens_BT), mask_BT1))


# --------------------------------------------------------------------------- perplexity


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Scores of a token stream: every token after the first, once."""

    loss: float  # mean negative log-likelihood per scored token, in nats
    perplexity: float  # exp(loss)
    bits_per_byte: float  # total negative log-likelihood in bits / UTF-8 bytes of the scored text
    tokens: int  # tokens scored (the stream's length minus one)
    bytes: int  # UTF-8 bytes of the scored tokens' text
    context: int  # block_size: the most tokens any prediction sees
    stride: int


def windows(n_tokens: int, block_size: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """The strided windows over a stream of `n_tokens`: `(start, first_target, end)` each.

    A window holds tokens `[start, end)`, at most `block_size + 1` of them; it scores the targets
    `[first_target, end)` — those no earlier window scored. Starts advance by `stride`.
    """
    if not 1 <= stride <= block_size:
        raise InputError(f"stride must be in [1, block_size = {block_size}], got {stride}")
    start, scored_up_to = 0, 1  # token 0 has no context, so it is never a target
    while scored_up_to < n_tokens:
        end = min(start + block_size + 1, n_tokens)
        yield start, scored_up_to, end
        scored_up_to = end
        start += stride


def utf8_bytes(tokenizer: Tokenizer, tokens: Sequence[int]) -> int:
    """UTF-8 bytes of the text of `tokens` as the tokenizer decodes it.

    GPT-2's BPE decodes to bytes directly (exact even where a token holds part of a character);
    its end-of-text token separates documents and counts as no bytes.
    """
    ids = np.asarray(tokens)
    if hasattr(tokenizer, "decode_bytes"):  # tiktoken
        if tokenizer.eot_token is not None:
            ids = ids[ids != tokenizer.eot_token]
        return len(tokenizer.decode_bytes(ids.tolist()))
    return len(tokenizer.decode(ids.tolist()).encode("utf-8"))


def perplexity(
    params: Params,
    config: GPTConfig,
    tokens: np.ndarray,
    tokenizer: Tokenizer,
    *,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> PerplexityResult:
    """Loss, perplexity and bits per byte of a token stream (see the module docstring).

    `tokens` may be a memory-mapped split (it is read one batch of windows at a time); `stride`
    defaults to `block_size // 2`.
    """
    n = len(tokens)
    if n < 2:
        raise InputError(f"need at least 2 tokens to score one, got {n}")
    T = config.block_size
    stride = max(T // 2, 1) if stride is None else stride
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    spans = list(windows(n, T, stride))
    total = 0.0
    with tqdm(total=n - 1, unit="tok", desc="perplexity", disable=not progress, leave=False) as bar:
        for i in range(0, len(spans), batch_size):
            # Every batch is [batch_size, T + 1]: short windows and missing rows are masked out.
            tokens_BT = np.zeros((batch_size, T + 1), np.int32)
            mask_BT1 = np.zeros((batch_size, T), np.float32)
            for row, (start, first, end) in enumerate(spans[i : i + batch_size]):
                tokens_BT[row, : end - start] = tokens[start:end]
                mask_BT1[row, first - start - 1 : end - start - 1] = 1.0
            total += float(_score_rows(params, config, tokens_BT, mask_BT1).sum())
            bar.update(int(mask_BT1.sum()))
    n_bytes = sum(utf8_bytes(tokenizer, tokens[i : i + (1 << 20)]) for i in range(1, n, 1 << 20))
    loss = -total / (n - 1)
    return PerplexityResult(
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_byte=-total / math.log(2) / n_bytes if n_bytes else math.nan,
        tokens=n - 1,
        bytes=n_bytes,
        context=T,
        stride=stride,
    )


def check_data_tokenizer(meta: dict[str, Any], tokenizer: Tokenizer, config: GPTConfig, where: str):
    """Raise unless a prepared split was tokenised as the model expects (`where`: its meta.json)."""
    data_name = meta.get("tokenizer")
    model_name = "char" if isinstance(tokenizer, CharTokenizer) else getattr(tokenizer, "name", "?")
    same = data_name == model_name
    if same and model_name == "char":
        same = "".join(tokenizer.chars) == meta.get("chars")
    if not same or meta.get("vocab_size", 0) > config.vocab_size:
        raise InputError(
            f"{where}: the data was tokenised with {data_name!r} (vocabulary "
            f"{meta.get('vocab_size')}) but the model uses {model_name!r} (vocabulary "
            f"{tokenizer.n_vocab}, embedding {config.vocab_size}); prepare it with the model's "
            f"tokenizer"
        )


# --------------------------------------------------------------------------- multiple choice


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: a context, its candidate continuations, the right one."""

    context: str
    choices: tuple[str, ...]
    label: int
    where: str = dataclasses.field(default="", compare=False)  # "file:line", for error messages


@dataclasses.dataclass(frozen=True)
class ChoiceResult:
    """Accuracy over multiple-choice items, and every choice's score."""

    acc: float  # argmax of the summed log-probability of the choice's tokens
    acc_stderr: float | None  # sample standard error of the mean; None with fewer than 2 items
    acc_norm: float  # argmax of the mean log-probability per token of the choice
    acc_norm_stderr: float | None
    items: int
    logprob_sums: tuple[tuple[float, ...], ...]  # [item][choice]
    choice_tokens: tuple[tuple[int, ...], ...]  # [item][choice]: tokens scored


# Accepted formats: name → (context field, choices field, label field).
FORMATS = {"hellaswag": ("ctx", "endings", "label"), "mc": ("context", "choices", "answer")}


def read_choices(path: str | Path, fmt: str, *, limit: int | None = None) -> list[ChoiceItem]:
    """Multiple-choice items from a JSONL file, checked line by line.

    `fmt` "hellaswag" reads HellaSwag's published fields (`ctx`, `endings`, `label`); "mc" reads
    `context`, `choices`, `answer`. Blank lines are skipped; anything else wrong is an
    `InputError` naming the file and line.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown multiple-choice format {fmt!r}; expected one of {list(FORMATS)}")
    ctx_key, choices_key, label_key = FORMATS[fmt]
    items: list[ChoiceItem] = []
    for where, row in jsonl.records(path, what="multiple-choice items"):
        if limit is not None and len(items) >= limit:
            break
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        items.append(_parse_item(row, where, ctx_key, choices_key, label_key))
    if not items:
        raise InputError(f"{path}: no items")
    return items


def _parse_item(row: dict, where: str, ctx_key: str, choices_key: str, label_key: str):
    missing = [k for k in (ctx_key, choices_key, label_key) if k not in row]
    if missing:
        raise InputError(f"{where}: missing field {missing[0]!r}")
    context, choices, label = row[ctx_key], row[choices_key], row[label_key]
    if not isinstance(context, str) or not context:
        raise InputError(f"{where}: {ctx_key!r} must be a non-empty string")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise InputError(f"{where}: {choices_key!r} must be a list of strings")
    if len(choices) < 2:
        raise InputError(f"{where}: {choices_key!r} has {len(choices)} choice(s); need at least 2")
    # HellaSwag's own files store the label as an int; the Hugging Face copy as a digit string.
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise InputError(
            f"{where}: {label_key!r} must be an index in [0, {len(choices) - 1}], got {label!r}"
        )
    return ChoiceItem(context, tuple(choices), label, where)


def bucket_length(n: int, cap: int) -> int:
    """The padded length of a row of n tokens: the next power of two ≥ 16, at most `cap`."""
    return min(max(16, 1 << (n - 1).bit_length()), cap)


def _encode_rows(items: Sequence[ChoiceItem], tokenizer: Tokenizer, max_len: int):
    """(tokens, n_choice_tokens) per (item, choice) row; contexts cut on the left to fit.

    Text is text: a literal "<|endoftext|>" in an item is encoded as characters, not as GPT-2's
    special token (tiktoken would otherwise refuse it).
    """
    rows: list[tuple[list[int], int]] = []
    for i, item in enumerate(items):
        try:
            context = tokenizer.encode(item.context, disallowed_special=())
            for choice in item.choices:
                ids = tokenizer.encode(" " + choice, disallowed_special=())
                if len(ids) >= max_len:
                    raise InputError(
                        f"a choice of {len(ids)} tokens leaves no room for context in "
                        f"block_size + 1 = {max_len} tokens"
                    )
                keep = max_len - len(ids)
                rows.append((context[-keep:] + ids, len(ids)))
        except JaxgptError as err:
            raise InputError(f"{item.where or f'item {i + 1}'}: {err}") from err
    return rows


@dataclasses.dataclass(frozen=True)
class EncodedChoices:
    """Multiple-choice items tokenised once and laid out in padded batches, to score many times
    (`score_choices`; training scores its `eval.tasks` this way at every evaluation)."""

    items: tuple[ChoiceItem, ...]
    # (row indices, tokens [batch, L], choice mask [batch, L-1]) per batch; L a bucket length
    batches: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]
    choice_tokens: tuple[int, ...]  # tokens scored in each (item, choice) row


def encode_choices(
    items: Sequence[ChoiceItem], tokenizer: Tokenizer, config: GPTConfig, *, batch_size: int = 16
) -> EncodedChoices:
    """Tokenise every choice of every item and group the rows into padded batches.

    Rows are grouped by padded length (`bucket_length`) and cut into batches of `batch_size`
    rows. A context longer than the model's window keeps its last tokens. An item the tokenizer
    cannot encode, or whose tokens fall outside the model's vocabulary, is an `InputError` naming
    its file and line.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    cap = config.block_size + 1
    rows = _encode_rows(items, tokenizer, cap)
    by_length: dict[int, list[int]] = {}
    for r, (ids, _) in enumerate(rows):
        by_length.setdefault(bucket_length(len(ids), cap), []).append(r)
    batches = []
    for length, members in sorted(by_length.items()):
        for i in range(0, len(members), batch_size):
            batch = np.asarray(members[i : i + batch_size])
            tokens_BT = np.zeros((batch_size, length), np.int32)
            mask_BT1 = np.zeros((batch_size, length - 1), np.float32)
            for row, r in enumerate(batch):
                ids, n_choice = rows[r]
                tokens_BT[row, : len(ids)] = ids
                mask_BT1[row, len(ids) - 1 - n_choice : len(ids) - 1] = 1.0
            batches.append((batch, tokens_BT, mask_BT1))
    encoded = EncodedChoices(tuple(items), tuple(batches), tuple(n for _, n in rows))
    _check_vocabulary(encoded, config)
    return encoded


def _check_vocabulary(encoded: EncodedChoices, config: GPTConfig) -> None:
    # Under jit an out-of-range id would be clamped silently: refuse it here, naming the item.
    starts = np.cumsum([0] + [len(item.choices) for item in encoded.items])
    for rows, tokens_BT, _ in encoded.batches:
        too_big = tokens_BT[: len(rows)].max(axis=1) >= config.vocab_size
        if too_big.any():
            item = encoded.items[int(np.searchsorted(starts, rows[too_big][0], side="right")) - 1]
            raise InputError(
                f"{item.where or 'an item'}: token id {int(tokens_BT.max())} is outside the "
                f"model's vocabulary [0, {config.vocab_size - 1}]: the tokenizer is another model's"
            )


def score_choices(
    params: Params, config: GPTConfig, encoded: EncodedChoices, *, progress: bool = False
) -> ChoiceResult:
    """Score `encoded`'s rows with `params` and reduce them to the two accuracies.

    The jitted `masked_logprob_sum` compiles once per batch shape; later calls reuse it.
    """
    sums = np.zeros(len(encoded.choice_tokens), np.float64)
    total = len(encoded.choice_tokens)
    bar = tqdm(total=total, unit="choice", desc="scoring", disable=not progress, leave=False)
    with bar:
        for rows, tokens_BT, mask_BT1 in encoded.batches:
            scored = masked_logprob_sum(params, config, jnp.asarray(tokens_BT), mask_BT1)
            sums[rows] = np.asarray(scored)[: len(rows)]
            bar.update(len(rows))
    return _choice_result(encoded.items, sums, list(encoded.choice_tokens))


def evaluate_choices(
    params: Params,
    config: GPTConfig,
    tokenizer: Tokenizer,
    items: Sequence[ChoiceItem],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> ChoiceResult:
    """Score every choice of every item (see the module docstring) and the two accuracies:
    `score_choices(params, config, encode_choices(items, tokenizer, config, ...))`."""
    encoded = encode_choices(items, tokenizer, config, batch_size=batch_size)
    return score_choices(params, config, encoded, progress=progress)


def _choice_result(items: Sequence[ChoiceItem], sums: np.ndarray, counts: list[int]):
    by_item_sums, by_item_counts, correct, correct_norm = [], [], [], []
    r = 0
    for item in items:
        k = len(item.choices)
        s, c = sums[r : r + k], np.asarray(counts[r : r + k], np.float64)
        r += k
        by_item_sums.append(tuple(float(x) for x in s))
        by_item_counts.append(tuple(int(x) for x in c))
        correct.append(float(np.argmax(s) == item.label))
        correct_norm.append(float(np.argmax(s / c) == item.label))
    acc, acc_err = _mean_stderr(correct)
    acc_norm, acc_norm_err = _mean_stderr(correct_norm)
    return ChoiceResult(
        acc=acc,
        acc_stderr=acc_err,
        acc_norm=acc_norm,
        acc_norm_stderr=acc_norm_err,
        items=len(items),
        logprob_sums=tuple(by_item_sums),
        choice_tokens=tuple(by_item_counts),
    )


def _mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean, and its standard error `sqrt(s² / n)` with the sample variance s² (n - 1)."""
    x = np.asarray(values)
    if len(x) < 2:
        return float(x.mean()), None
    return float(x.mean()), float(np.sqrt(x.var(ddof=1) / len(x)))


# --------------------------------------------------------------------------- during training


def load_tasks(
    tasks: Sequence[tuple[str, str, Path]],
    tokenizer: Tokenizer,
    config: GPTConfig,
    *,
    limit: int | None = None,
) -> dict[str, EncodedChoices]:
    """The multiple-choice files of a run's `eval.tasks` (`(name, format, path)` triples, see
    `jaxgpt.experiment.eval_tasks`), read, checked and encoded once, by name.

    Called before training starts: a missing file, a bad item or text the tokenizer cannot
    encode is an `InputError` starting with `eval.tasks` and naming the file (and line).
    """
    out = {}
    for name, fmt, path in tasks:
        if not Path(path).is_file():
            raise InputError(f"eval.tasks: {fmt}:{path}: no such file")
        try:
            items = read_choices(path, fmt, limit=limit)
            out[name] = encode_choices(items, tokenizer, config)
        except InputError as err:
            raise InputError(f"eval.tasks ({fmt}): {err}") from err
    return out


def score_tasks(params: Params, config: GPTConfig, tasks: dict[str, EncodedChoices]):
    """`{"task/<name>/acc": …, "task/<name>/acc_norm": …}` for `load_tasks`' output."""
    out = {}
    for name, encoded in tasks.items():
        result = score_choices(params, config, encoded)
        out[f"task/{name}/acc"], out[f"task/{name}/acc_norm"] = result.acc, result.acc_norm
    return out
