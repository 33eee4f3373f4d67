"""Preference data: prompts with a chosen and a rejected answer, for DPO and reward models.

A preference data set is one or more `.jsonl` files, one pair per line, in the common form of
public preference sets::

    {"prompt": "What is 45 + 38?", "chosen": "45+38: ... so 83", "rejected": "... so 73"}
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}], "chosen": ..., "rejected": ...}

`prompt` is one user message (a string) or a conversation ending with a user turn; `chosen` and
`rejected` are the two assistant replies to it. A line may carry `"task": "arithmetic"` (the pairs
`jaxgpt pairs` builds for the arithmetic demo): then no line may hold a held-out problem
(`jaxgpt.arithmetic.check_training_messages`), and the runs trained on it are scored on them.

`prepare_preferences` renders both sides with `jaxgpt.chat.render_conversation(prompt + [answer])`
and keeps the mask only on the final answer (its content and `<|end|>`): that answer is what DPO
and a reward model compare, the prompt's own assistant turns are the same on both sides. All
pairs of one prompt go to the same split (a seeded hash of the prompt), so no val prompt is
trained on. Per split it writes `<split>.<side>.bin` (tokens), `<split>.<side>.mask.bin` (uint8)
and `<split>.<side>.idx.npy` (offsets) for side = chosen, rejected, then `meta.json`
(`"format": "preference"`), everything staged and swapped in whole (`jaxgpt.atomic`).

`get_pair_batch` draws pairs as a pure function of (seed, step), like `jaxgpt.data.get_batch`, so
a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxgpt import arithmetic, atomic, chat, data, jsonl
from jaxgpt.errors import ChatFormatError, InputError, JaxgptError
from jaxgpt.packing import Documents
from jaxgpt.tokenizer import (
    CharTokenizer,
    Tokenizer,
    get_tokenizer,
    tokenizer_from_json,
    tokenizer_to_json,
)

META_VERSION = 1
FORMAT = "preference"
SIDES = ("chosen", "rejected")
SPLITS = ("train", "val")
ARITHMETIC = "arithmetic"  # a line's "task": the arithmetic demo (held-out problems refused)

# --------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class Preference:
    """One preference: a prompt (messages ending with a user turn) and two replies to it."""

    prompt: tuple[dict[str, str], ...]
    chosen: str
    rejected: str
    task: str = ""  # "arithmetic" for the demo's pairs
    where: str = dataclasses.field(default="", compare=False)  # "file:line", for errors

    def conversation(self, side: str) -> list[dict[str, str]]:
        """The prompt followed by the `side` ("chosen" or "rejected") answer."""
        return [*self.prompt, {"role": "assistant", "content": getattr(self, side)}]

    def prompt_key(self) -> str:
        """The prompt as canonical JSON: pairs with the same key share a prompt."""
        return json.dumps(self.prompt, sort_keys=True, ensure_ascii=False)


def preference_from_record(record: Any) -> Preference:
    """One `.jsonl` line's object → a Preference; a ChatFormatError naming the problem."""
    if not isinstance(record, dict):
        raise ChatFormatError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("prompt", *SIDES) if k not in record]
    if missing:
        raise ChatFormatError(
            f'missing "{missing[0]}": a preference line needs "prompt", "chosen" and "rejected"'
        )
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    prompt = chat.check_messages(prompt)
    if prompt[-1]["role"] != "user":
        raise ChatFormatError(
            f'"prompt" must end with a user turn for the answers to reply to, but its last '
            f"message is a {prompt[-1]['role']} turn"
        )
    for side in SIDES:
        if not isinstance(record[side], str):
            raise ChatFormatError(
                f'"{side}" must be a string (the assistant\'s reply), got '
                f"{type(record[side]).__name__}"
            )
    if record["chosen"] == record["rejected"]:
        raise ChatFormatError('"chosen" and "rejected" are identical: the pair prefers nothing')
    task = record.get("task", "")
    if task not in ("", ARITHMETIC):
        raise ChatFormatError(f'"task" must be {ARITHMETIC!r} or absent, got {task!r}')
    return Preference(tuple(dict(m) for m in prompt), record["chosen"], record["rejected"], task)


def read_preferences(path: str | Path) -> list[Preference]:
    """The preferences of a `.jsonl` file, each checked; any problem is a ChatFormatError of one
    line naming the file and line (not UTF-8, not JSON, a missing field, identical answers, a
    prompt that is not a conversation ending with a user turn, a held-out arithmetic problem)."""
    out = []
    for where, record in jsonl.records(path, what="preference data", error=ChatFormatError):
        try:
            preference = preference_from_record(record)
            if preference.task == ARITHMETIC:
                arithmetic.check_training_messages(list(preference.prompt))
        except JaxgptError as err:
            raise ChatFormatError(f"{where}: {err}") from err
        out.append(dataclasses.replace(preference, where=where))
    return out


def preference_files(source: str | Path) -> list[Path]:
    """The .jsonl files of a preference data set: one file, or every .jsonl under a directory."""
    hint = "pass a .jsonl file or a directory of them (`jaxgpt pairs` builds one from a chat model)"
    return jsonl.files(source, "preference data", hint)


def source_preferences(source: str | Path) -> Iterator[Preference]:
    for path in preference_files(source):
        yield from read_preferences(path)


def source_digest(source: str | Path) -> str:
    """sha256 over the data set's files, to tell whether prepared data is stale."""
    return jsonl.digest(preference_files(source))


# --------------------------------------------------------------------------- prepare


def split_of(prompt_key: str, seed: int, val_fraction: float) -> str:
    """ "val" or "train" for a prompt: a seeded hash of its text, the same wherever it appears."""
    h = hashlib.blake2b(f"{seed}\0{prompt_key}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(h, "little") / 2**64 < val_fraction else "train"


def preference_tokenizer(source: str | Path, name: str | Tokenizer) -> Tokenizer:
    """The chat tokenizer to render with: a given one (e.g. the model's), "gpt2", or "char"
    (the characters of the data set)."""
    if not isinstance(name, str):
        return chat.with_chat_tokens(name)
    if name == "gpt2":
        return chat.with_chat_tokens(get_tokenizer("gpt2"))
    if name != "char":
        raise InputError(f"tokenizer must be 'char' or 'gpt2', got {name!r}")
    chars: set[str] = set()
    for pref in source_preferences(source):
        for m in pref.prompt:
            chars.update(m["content"])
        chars.update(pref.chosen + pref.rejected)
    if not chars:
        raise InputError(f"preference data {str(source)!r} holds no text")
    return chat.with_chat_tokens(CharTokenizer(chars))


def render_pair(pref: Preference, tok: Tokenizer) -> dict[str, tuple[list[int], list[int]]]:
    """{side: (ids, mask)}: the prompt plus that answer, the mask on the final answer only."""
    n_prompt = len(chat.render_prompt(list(pref.prompt), tok)) - 1  # without <|assistant|>
    out = {}
    for side in SIDES:
        ids, mask = chat.render_conversation(pref.conversation(side), tok)
        out[side] = (ids, [0] * n_prompt + mask[n_prompt:])
    return out


def prepare_preferences(
    source: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | Tokenizer = "char",
    val_fraction: float = 0.05,
    split_seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Render a preference data set into `out_dir` (see the module docstring); returns its meta.

    `tokenizer` is "char", "gpt2" or a Tokenizer (a model's own: data for fine-tuning a run must
    be in that run's tokens). The first prompt goes to train and the second to val whatever the
    draw, so both splits hold pairs.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    tok = preference_tokenizer(source, tokenizer)
    dtype = np.dtype(np.uint8 if tok.n_vocab <= 256 else np.uint16)
    tasks: set[str] = set()
    with atomic.staged_directory(Path(out_dir), "the data directory") as tmp:
        writers = {(s, side): _SideWriter(tmp, s, side, dtype) for s in SPLITS for side in SIDES}
        splits: dict[str, str] = {}  # prompt key → split
        try:
            for pref in tqdm(source_preferences(source), desc="rendering", unit=" pair",
                             disable=not progress):  # fmt: skip
                key = pref.prompt_key()
                if key not in splits:
                    first = ("train", "val")[len(splits)] if len(splits) < 2 else None
                    splits[key] = first or split_of(key, split_seed, val_fraction)
                try:
                    rendered = render_pair(pref, tok)
                except JaxgptError as err:
                    raise InputError(f"{pref.where}: {err}") from err
                for side, (ids, mask) in rendered.items():
                    writers[splits[key], side].add(ids, mask)
                tasks.add(pref.task)
        finally:
            for w in writers.values():
                w.close()
        counts = {f"{s}_pairs": writers[s, "chosen"].count for s in SPLITS}
        if counts["train_pairs"] == 0 or counts["val_pairs"] == 0:
            raise InputError(
                f"preference data {str(source)!r} has {len(splits)} distinct prompt(s); at least "
                f"2 are needed (all pairs of a prompt go to one split, train or val)"
            )
        if len(tasks) > 1:
            raise InputError(
                f"preference data {str(source)!r} mixes lines with and without "
                f'"task": "{ARITHMETIC}"'
            )
        for s in SPLITS:
            counts[f"{s}_prompts"] = sum(v == s for v in splits.values())
            counts[f"{s}_tokens"] = sum(writers[s, side].offsets[-1] for side in SIDES)
        meta = {
            "version": META_VERSION, "format": FORMAT, "tokenizer": tok.name,
            "tokenizer_spec": tokenizer_to_json(tok), "vocab_size": tok.n_vocab,
            "dtype": dtype.name, "source": str(source), "source_sha256": source_digest(source),
            "task": tasks.pop() if tasks else "", "val_fraction": val_fraction,
            "split_seed": split_seed, **counts,
        }  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    return meta


class _SideWriter:
    """Appends one side's rendered conversations to its token, mask and offset files."""

    def __init__(self, out: Path, split: str, side: str, dtype: np.dtype):
        self.out, self.stem, self.dtype = out, f"{split}.{side}", dtype
        self.tokens = (out / f"{self.stem}.bin").open("wb")
        self.mask = (out / f"{self.stem}.mask.bin").open("wb")
        self.offsets = [0]

    @property
    def count(self) -> int:
        return len(self.offsets) - 1

    def add(self, ids: list[int], mask: list[int]) -> None:
        np.asarray(ids, self.dtype).tofile(self.tokens)
        np.asarray(mask, np.uint8).tofile(self.mask)
        self.offsets.append(self.offsets[-1] + len(ids))

    def close(self) -> None:
        self.tokens.close()
        self.mask.close()
        np.save(self.out / f"{self.stem}.idx.npy", np.asarray(self.offsets, np.int64))


def ensure_prepared(exp: Any, data_dir: Path, *, progress: bool = True) -> Path:
    """The prepared preference data of an experiment (`data.format = "preference"`), prepared
    again when missing, made from other files, or split or tokenised differently.

    The pairs are rendered with the tokenizer of `model.init` when it is a run directory: data
    for fine-tuning a model must be in that model's tokens (a character table made from the
    pairs alone would number the characters differently).
    """
    from jaxgpt import checkpoint

    d = exp.data
    tokenizer: str | Tokenizer = d.tokenizer
    if checkpoint.is_run_dir(exp.model.init):
        tokenizer = chat.with_chat_tokens(checkpoint.load_tokenizer(exp.model.init))
        if tokenizer.name != d.tokenizer:
            raise InputError(
                f"model.init {exp.model.init!r} uses the {tokenizer.name!r} tokenizer, but "
                f"data.tokenizer is {d.tokenizer!r}"
            )
    want = {"version": META_VERSION, "format": FORMAT, "source": str(d.source),
            "source_sha256": source_digest(d.source), "val_fraction": d.val_fraction,
            "split_seed": d.split_seed, "tokenizer": d.tokenizer}  # fmt: skip
    if not isinstance(tokenizer, str):
        want["tokenizer_spec"] = tokenizer_to_json(tokenizer)
    if data.is_prepared(data_dir, want):
        return data_dir
    print(f"preparing preference data {d.source!r} → {data_dir}", file=sys.stderr)
    meta = prepare_preferences(
        d.source, data_dir, tokenizer=tokenizer, val_fraction=d.val_fraction,
        split_seed=d.split_seed, progress=progress,
    )  # fmt: skip
    print(
        f"  {meta['train_pairs']:,} train / {meta['val_pairs']:,} val pairs, vocabulary "
        f"{meta['vocab_size']}",
        file=sys.stderr,
    )
    return data_dir


# --------------------------------------------------------------------------- loading, batches


@dataclasses.dataclass(frozen=True)
class Pairs:
    """The pairs of a prepared split: pair i is `chosen.doc(i)` preferred to `rejected.doc(i)`."""

    chosen: Documents
    rejected: Documents

    def __post_init__(self) -> None:
        if self.chosen.count != self.rejected.count:
            raise InputError(
                f"{self.chosen.count} chosen but {self.rejected.count} rejected answers: the "
                f"prepared data is inconsistent; run `jaxgpt prepare` again"
            )

    @property
    def count(self) -> int:
        return self.chosen.count

    def side(self, name: str) -> Documents:
        return getattr(self, name)

    def longest(self) -> int:
        return int(max(self.chosen.lengths().max(), self.rejected.lengths().max()))


def load_pairs(data_dir: str | Path, split: str) -> Pairs:
    """The pairs of a prepared split (memory-mapped tokens and masks)."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    sides = {}
    for side in SIDES:
        stem = data_dir / f"{split}.{side}"
        try:
            offsets = np.load(f"{stem}.idx.npy")
            tokens = _memmap(Path(f"{stem}.bin"), np.dtype(meta["dtype"]))
            mask = _memmap(Path(f"{stem}.mask.bin"), np.dtype(np.uint8))
        except (OSError, ValueError) as err:
            raise InputError(
                f"{data_dir} holds no complete {split} split ({err}); run `jaxgpt prepare` again"
            ) from err
        sides[side] = Documents(tokens, mask, offsets)
    return Pairs(**sides)


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared preference directory; an InputError if it holds other data."""
    meta = data.load_meta(data_dir)
    if meta.get("format") != FORMAT:
        raise InputError(
            f"{data_dir} holds {meta.get('format', 'text')!r} data, not preference pairs; "
            f"prepare them with `jaxgpt prepare --format preference`"
        )
    return meta


def tokenizer_from_meta(meta: dict[str, Any]) -> Tokenizer:
    """The chat tokenizer a preference directory was rendered with."""
    return tokenizer_from_json(meta["tokenizer_spec"], "meta.json")


def check_fits(pairs: Pairs, block_size: int, where: str) -> None:
    """Refuse pairs longer than a row (block_size + 1 tokens): DPO compares whole answers, and a
    cut one would be judged on a part of it."""
    row_len = block_size + 1
    long = int(np.count_nonzero(pairs.chosen.lengths() > row_len)) + int(
        np.count_nonzero(pairs.rejected.lengths() > row_len)
    )
    if long:
        raise InputError(
            f"{where}: {long} answer(s) are longer than block_size + 1 = {row_len} tokens (the "
            f"longest has {pairs.longest()}); shorten or drop those pairs, or use a model with a "
            f"longer context"
        )


def pair_indices(
    count: int,
    batch_size: int,
    seed: int,
    step: int,
    *,
    accum: int = 1,
    rows: tuple[int, int] | None = None,
) -> np.ndarray:
    """Which pairs step `step` trains on: `[accum, batch_size]` (or this process's `rows`) indices
    drawn uniformly with replacement by a generator seeded with (seed, step)."""
    index_AB = np.random.default_rng([seed, step]).integers(0, count, (accum, batch_size))
    return index_AB if rows is None else index_AB[:, rows[0] : rows[1]]


def get_pair_batch(
    pairs: Pairs,
    batch_size: int,
    block_size: int,
    seed: int,
    step: int,
    *,
    accum: int = 1,
    rows: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """`[accum, batch_size, block_size + 1]` pairs for `step`: a dict of int32 arrays.

    Keys `chosen`, `chosen_mask`, `rejected`, `rejected_mask`: each pair's two conversations,
    right-padded with 0 (mask 0 on padding). `mask[t] = 1` marks token t as part of the final
    answer, so the trained predictions of a row are `tokens[1:]` where `mask[1:]` is 1 (as in
    chat data). The pairs are `pair_indices(...)`, a pure function of (seed, step);
    `rows=(start, stop)` keeps only this process's rows of each micro-batch. A pair longer than
    `block_size + 1` tokens is refused (an InputError, see `check_fits`), never cut.
    """
    index_AB = pair_indices(pairs.count, batch_size, seed, step, accum=accum, rows=rows)
    return pair_rows(pairs, index_AB, block_size + 1)


def pair_rows(pairs: Pairs, index_AB: np.ndarray, row_len: int) -> dict[str, np.ndarray]:
    """The pairs `index_AB` (any shape) as right-padded `[..., row_len]` rows (see
    `get_pair_batch`)."""
    out: dict[str, np.ndarray] = {}
    for side in SIDES:
        docs = pairs.side(side)
        tokens, mask = (np.zeros((*index_AB.shape, row_len), np.int32) for _ in range(2))
        for where, i in np.ndenumerate(index_AB):
            ids, doc_mask = docs.doc(int(i))
            if len(ids) > row_len:
                raise InputError(
                    f"pair {int(i)}'s {side} answer has {len(ids)} tokens, more than block_size "
                    f"+ 1 = {row_len}"
                )
            tokens[where][: len(ids)] = ids
            mask[where][: len(ids)] = doc_mask
        out[side], out[f"{side}_mask"] = tokens, mask
    return out


def describe(pairs: Pairs, where: str) -> str:
    """One line on what a preference split holds (printed when a run starts)."""
    tokens = {s: int(np.count_nonzero(pairs.side(s).mask)) for s in SIDES}
    line = (
        f"{where}: {pairs.count:,} pairs; answers average {tokens['chosen'] / pairs.count:.1f} "
        f"(chosen) and {tokens['rejected'] / pairs.count:.1f} (rejected) tokens"
    )
    print(line, file=sys.stderr)
    return line


# --------------------------------------------------------------------------- the reference model


def reference_logprobs(params: Any, config: Any, *, chunk: int = 32):
    """`fn(rows_NT1) -> [N, T+1]` float32: a frozen model's log-probability of each token given
    the ones before it in its row (`jaxgpt.eval.logprobs`), 0 at position 0.

    Rows go through in chunks of `chunk` (the last one padded), so one shape is compiled and a
    row's values do not depend on which other rows come with it.
    """
    import jax

    from jaxgpt.eval import logprobs

    score = jax.jit(logprobs, static_argnums=1)

    def fn(rows_NT1: np.ndarray) -> np.ndarray:
        n, row_len = rows_NT1.shape
        if row_len - 1 > config.block_size:
            raise InputError(
                f"rows of {row_len} tokens need a context of {row_len - 1}, but the reference "
                f"model's block_size is {config.block_size}"
            )
        out = np.zeros((n, row_len), np.float32)
        for lo in range(0, n, chunk):
            part = np.zeros((chunk, row_len), np.int32)
            part[: min(chunk, n - lo)] = rows_NT1[lo : lo + chunk]
            out[lo : lo + chunk, 1:] = np.asarray(score(params, config, part))[: n - lo]
        return out

    return fn


def reference_table(
    pairs: Pairs, row_len: int, reference, *, chunk: int = 64, progress: bool = True
) -> dict[str, np.ndarray]:
    """{side: `[pairs, row_len]` float32}: `reference` (see `reference_logprobs`) on every pair,
    computed once so that each step only looks its rows up."""
    table = {side: np.zeros((pairs.count, row_len), np.float32) for side in SIDES}
    with tqdm(total=pairs.count, desc="reference log-probs", unit=" pair",
              disable=not progress, leave=False) as bar:  # fmt: skip
        for lo in range(0, pairs.count, chunk):
            index = np.arange(lo, min(lo + chunk, pairs.count))
            rows = pair_rows(pairs, index, row_len)
            for side in SIDES:
                table[side][index] = reference(rows[side])
            bar.update(len(index))
    return table
