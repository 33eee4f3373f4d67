"""Text → token ids → text: the first and last stage of a prompt's journey.

Two tokenizers share one small interface (`encode`, `decode`, `n_vocab`, `eot_token`):

* GPT-2's byte-pair encoding, as a real `tiktoken.Encoding` built offline from the `encoder.json` /
  `vocab.bpe` files shipped inside this package (hash-checked exactly as tiktoken checks its own
  download), so it is tiktoken's "gpt2" encoding without any network access.
* A character-level tokenizer whose vocabulary is the sorted set of characters of a corpus, saved
  as JSON next to the prepared data.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Protocol

import tiktoken

from jaxgpt.errors import TokenizerError

ENDOFTEXT = "<|endoftext|>"

# The sha256 values tiktoken itself verifies after downloading GPT-2's files.
_GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenisation regex (contractions, letters, numbers, punctuation, whitespace), in the
# possessive form tiktoken compiles for its "gpt2" / "r50k_base" encodings.
_GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


class Tokenizer(Protocol):
    """What the rest of jaxgpt needs from a tokenizer (tiktoken.Encoding satisfies it)."""

    name: str

    @property
    def n_vocab(self) -> int: ...

    @property
    def eot_token(self) -> int | None: ...

    def encode(self, text: str, **kwargs) -> list[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...


def _byte_decoder() -> dict[str, int]:
    """GPT-2 stores byte strings as printable unicode: map each such character back to its byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to code points
    256, 257, ... in byte order. This is the inverse of GPT-2's `bytes_to_unicode`.
    """
    printable = [
        b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255)
    ]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def check_ids(tokens: Sequence[int], n_vocab: int) -> list[int]:
    """`tokens` as a list of ints; TokenizerError for an id outside `[0, n_vocab)`."""
    ids = [int(t) for t in tokens]
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise TokenizerError(
            f"token id {bad[0]} is outside this tokenizer's vocabulary [0, {n_vocab - 1}]"
        )
    return ids


class _GPT2Encoding(tiktoken.Encoding):
    """tiktoken's Encoding whose `decode` refuses ids outside the vocabulary with a clear error
    (tiktoken raises a KeyError or OverflowError)."""

    def decode(self, tokens: Sequence[int], errors: str = "replace") -> str:
        return super().decode(check_ids(tokens, self.n_vocab), errors=errors)


def _read_checked(name: str) -> bytes:
    data = (resources.files("jaxgpt") / "assets" / "gpt2-bpe" / name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != _GPT2_FILES[name]:
        raise TokenizerError(
            f"the bundled GPT-2 tokenizer file {name} is corrupt: sha256 {digest}, "
            f"expected {_GPT2_FILES[name]}; reinstall jaxgpt"
        )
    return data


@functools.cache
def _gpt2_encoding() -> tiktoken.Encoding:
    to_byte = _byte_decoder()
    encoder = json.loads(_read_checked("encoder.json"))
    ranks = {
        bytes(to_byte[ch] for ch in token): rank
        for token, rank in encoder.items()
        if token != ENDOFTEXT
    }
    # vocab.bpe lists the merges in priority order; tiktoken's ranks are the encoder ids, and the
    # two agree exactly when merge i produced token 256 + i. Check it, as tiktoken does.
    merges = _read_checked("vocab.bpe").decode("utf-8").split("\n")[1:-1]
    for i, merge in enumerate(merges):
        left, right = merge.split(" ")
        merged = bytes(to_byte[ch] for ch in left + right)
        if ranks.get(merged) != 256 + i:
            raise TokenizerError(f"vocab.bpe merge {i} ({merge!r}) disagrees with encoder.json")
    return _GPT2Encoding(
        name="gpt2",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: encoder[ENDOFTEXT]},
        explicit_n_vocab=len(encoder),
    )


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters of a corpus."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise TokenizerError("a character tokenizer needs at least one character")
        self.name = "char"
        self._index = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(text)

    @property
    def n_vocab(self) -> int:
        return len(self.chars)

    @property
    def eot_token(self) -> None:
        return None

    def encode(self, text: str, **kwargs) -> list[int]:
        unknown = sorted(set(text) - self._index.keys())
        if unknown:
            raise TokenizerError(
                f"characters {unknown[:10]!r} are not in this {self.n_vocab}-character vocabulary"
            )
        return [self._index[ch] for ch in text]

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(self.chars[t] for t in check_ids(tokens, self.n_vocab))

    def to_json(self) -> dict:
        return {"type": "char", "chars": "".join(self.chars)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        path = Path(path)
        try:
            spec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise TokenizerError(f"cannot read a character vocabulary from {path}: {err}") from err
        if spec.get("type") != "char" or not isinstance(spec.get("chars"), str):
            raise TokenizerError(f"{path} is not a jaxgpt character vocabulary")
        return cls(spec["chars"])


def get_tokenizer(name: str = "gpt2", path: str | Path | None = None) -> Tokenizer:
    """A tokenizer by name.

    Args:
      name: "gpt2" for GPT-2's BPE (a `tiktoken.Encoding`, built offline), or "char" for a
        character-level tokenizer whose vocabulary JSON is at `path`.
      path: the vocabulary file, for "char".
    """
    if name == "gpt2":
        return _gpt2_encoding()
    if name == "char":
        if path is None:
            raise TokenizerError("the 'char' tokenizer needs the path of its vocabulary JSON")
        return CharTokenizer.load(path)
    raise TokenizerError(f"unknown tokenizer {name!r}; expected 'gpt2' or 'char'")
