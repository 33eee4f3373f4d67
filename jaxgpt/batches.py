"""Where a run's batches come from: token windows of a text corpus, or packed conversations.

The training loop asks a `BatchSource` for the micro-batches of step `s` and for the fixed
evaluation batches; what it gets back is what the run's objective (`jaxgpt.objectives`) takes:

    text   int32 `[A, B, T+1]` windows of the token stream     → objective "next_token"
    chat   dict of packed `[A, B, T+1]` rows (tokens, segments,  → objective "sft"
           positions, mask; see `jaxgpt.packing`)
    preference  dict of `[A, B, T+1]` pairs (chosen, chosen_mask,  → objective "dpo"
           rejected, rejected_mask; see `jaxgpt.preferences`) and,
           given a reference model, its per-token log-probabilities

Both are pure functions of (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have seen, and each process of a multi-process run reads only its rows.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt import data, packing
from jaxgpt.errors import ConfigError

EVAL_SEED = 1234  # eval batches are fixed across evaluations and runs

Rows = tuple[int, int] | None


@dataclass(frozen=True)
class BatchSource:
    """A run's data: `train(step, rows)` → `[A, B, T+1]` micro-batches (an array or a dict of
    them); `evaluate(split, i, rows)` → the i-th fixed `[B, T+1]` batch of "train" or "val"."""

    objective: str
    train: Callable[[int, Rows], Any]
    evaluate: Callable[[str, int, Rows], Any]


def text_source(
    data_dir: Path,
    batch_size: int,
    block_size: int,
    accum: int,
    seed: int,
    align_documents: bool = False,
) -> BatchSource:
    """Uniform windows of the prepared token files (`jaxgpt.data.get_batch`); with
    `align_documents`, windows that begin at a document's <|endoftext|> (GPT-2 BPE data)."""
    tokens = {split: data.load_tokens(data_dir, split) for split in ("train", "val")}
    for split, toks in tokens.items():
        data.check_fits(toks, block_size, split)
    starts = dict.fromkeys(tokens)
    if align_documents:
        eot = data.tokenizer_from_meta(data.load_meta(data_dir)).eot_token
        if eot is None:
            raise ConfigError(
                f"data.align_documents needs documents separated by <|endoftext|> (GPT-2 BPE "
                f"data); {data_dir} holds character tokens"
            )
        starts = {s: data.document_starts(t, eot, block_size, s) for s, t in tokens.items()}

    def train(step: int, rows: Rows) -> np.ndarray:
        return data.get_batch(tokens["train"], batch_size, block_size, seed, step, accum=accum,
                              rows=rows, starts=starts["train"])  # fmt: skip

    def evaluate(split: str, i: int, rows: Rows) -> np.ndarray:
        return data.get_batch(tokens[split], batch_size, block_size, EVAL_SEED, i, rows=rows,
                              starts=starts[split])[0]  # fmt: skip

    return BatchSource("next_token", train, evaluate)


def chat_source(
    data_dir: Path, batch_size: int, block_size: int, accum: int, seed: int
) -> BatchSource:
    """Conversations packed into rows (`jaxgpt.packing.get_packed_batch`), trained on the mask.

    Says how much of the data is trained (the mask fraction) and refuses a mask that is all
    ones or all zeros — the silent failure of SFT pipelines whose mask got lost.
    """
    from jaxgpt import chat_data

    docs = {split: chat_data.load_documents(data_dir, split) for split in ("train", "val")}
    chat_data.describe_mask(docs["train"], block_size + 1, f"{data_dir} (train)")
    first = packing.get_packed_batch(docs["train"], batch_size, block_size, seed, 0, accum=accum)
    trained = packing.loss_weights(first["mask"], first["segments"])
    print(
        f"  a step trains {int(trained.sum()):,} of its {trained.size:,} predictions "
        f"({100 * trained.mean():.1f}%)",
        file=sys.stderr,
    )

    def train(step: int, rows: Rows) -> dict[str, np.ndarray]:
        return packing.get_packed_batch(docs["train"], batch_size, block_size, seed, step,
                                        accum=accum, rows=rows)  # fmt: skip

    def evaluate(split: str, i: int, rows: Rows) -> dict[str, np.ndarray]:
        batch = packing.get_packed_batch(docs[split], batch_size, block_size, EVAL_SEED, i,
                                         rows=rows)  # fmt: skip
        return {k: v[0] for k, v in batch.items()}

    return BatchSource("sft", train, evaluate)


ReferenceLogprobs = Callable[[np.ndarray], np.ndarray]


def preference_source(
    data_dir: Path,
    batch_size: int,
    block_size: int,
    accum: int,
    seed: int,
    *,
    reference: ReferenceLogprobs | None = None,
    precompute: bool = True,
    progress: bool = True,
) -> BatchSource:
    """Preference pairs (`jaxgpt.preferences.get_pair_batch`), for DPO.

    `reference` maps int32 rows `[N, T+1]` to the reference model's per-token log-probabilities
    `[N, T+1]` float32 (`ref[:, t]` = log p(token t | tokens before it), 0 at t = 0; see
    `jaxgpt.preferences.reference_logprobs`). With it, every batch also holds `chosen_reference`
    and `rejected_reference`: computed once for every training pair when the source is made
    (`precompute`), or for each batch as it is drawn. Either way a batch is a pure function of
    (seed, step). The fixed evaluation batches are computed as they are drawn.
    """
    from jaxgpt import preferences

    pairs = {split: preferences.load_pairs(data_dir, split) for split in ("train", "val")}
    for split, p in pairs.items():
        preferences.check_fits(p, block_size, f"{data_dir} ({split})")
    preferences.describe(pairs["train"], f"{data_dir} (train)")
    row_len = block_size + 1
    table = None
    if reference is not None and precompute:
        table = preferences.reference_table(pairs["train"], row_len, reference, progress=progress)

    def with_reference(batch: dict[str, np.ndarray], index_AB: np.ndarray, split: str):
        if reference is None:
            return batch
        for side in preferences.SIDES:
            if table is not None and split == "train":
                batch[f"{side}_reference"] = table[side][index_AB]
            else:
                rows_NT1 = batch[side].reshape(-1, row_len)
                batch[f"{side}_reference"] = reference(rows_NT1).reshape(batch[side].shape)
        return batch

    def train(step: int, rows: Rows) -> dict[str, np.ndarray]:
        index_AB = preferences.pair_indices(pairs["train"].count, batch_size, seed, step,
                                            accum=accum, rows=rows)  # fmt: skip
        batch = preferences.pair_rows(pairs["train"], index_AB, row_len)
        return with_reference(batch, index_AB, "train")

    def evaluate(split: str, i: int, rows: Rows) -> dict[str, np.ndarray]:
        index_B = preferences.pair_indices(pairs[split].count, batch_size, EVAL_SEED, i,
                                           rows=rows)[0]  # fmt: skip
        batch = preferences.pair_rows(pairs[split], index_B, row_len)
        return with_reference(batch, index_B, split)

    return BatchSource("dpo", train, evaluate)


def make_source(
    data_dir: Path,
    batch_size: int,
    block_size: int,
    accum: int,
    seed: int,
    *,
    align_documents: bool = False,
    **options: Any,
) -> BatchSource:
    """The source for a prepared data directory, by the format its meta.json names: chat,
    preference (`options` go to `preference_source`) or text (`align_documents`: windows at
    document starts; conversations are packed whole anyway)."""
    fmt = data.load_meta(data_dir).get("format", "text")
    if fmt == "preference":
        return preference_source(data_dir, batch_size, block_size, accum, seed, **options)
    if fmt == "chat":
        return chat_source(data_dir, batch_size, block_size, accum, seed)
    return text_source(data_dir, batch_size, block_size, accum, seed, align_documents)


def tokenizer_of(meta: dict[str, Any]):
    """The tokenizer a prepared data directory was made with (its chat tokens included)."""
    if meta.get("format") in ("chat", "preference"):
        from jaxgpt import chat_data

        return chat_data.tokenizer_from_meta(meta)
    return data.tokenizer_from_meta(meta)


def is_chat(meta: dict[str, Any]) -> bool:
    """Whether a prepared data directory holds conversations (`jaxgpt.chat_data`)."""
    return meta.get("format") == "chat"
