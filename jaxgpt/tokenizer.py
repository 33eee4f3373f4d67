"""Text → token ids → text: the first and last stage of a prompt's journey.

Two tokenizers share one small interface (`encode`, `decode`, `n_vocab`, `eot_token`):

* GPT-2's byte-pair encoding, as a real `tiktoken.Encoding` built offline from the `encoder.json` /
  `vocab.bpe` files shipped inside this package (hash-checked exactly as tiktoken checks its own
  download), so it is tiktoken's "gpt2" encoding without any network access.
* A character-level tokenizer whose vocabulary is the sorted set of characters of a corpus, saved
  as JSON next to the prepared data.

Either may carry extra *special tokens* (the chat format's turn markers, `jaxgpt.chat`), with ids
after the base vocabulary: GPT-2's from 50257 on, the character tokenizer's after its characters.
`encode_ordinary` never produces them — text that merely looks like a special token is ordinary
text — and `encode_single_token(name)` gives a special token's id (both are tiktoken's names).
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

    @property
    def special_tokens_set(self) -> set[str]: ...

    def encode(self, text: str, **kwargs) -> list[int]: ...

    def encode_ordinary(self, text: str) -> list[int]: ...

    def encode_single_token(self, text: str) -> int: ...

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


def read_bundled_bpe(name: str) -> bytes:
    """A bundled GPT-2 BPE file ("encoder.json" or "vocab.bpe"), checked against its sha256."""
    data = (resources.files("jaxgpt") / "assets" / "gpt2-bpe" / name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != _GPT2_FILES[name]:
        raise TokenizerError(
            f"the bundled GPT-2 tokenizer file {name} is corrupt: sha256 {digest}, "
            f"expected {_GPT2_FILES[name]}; reinstall jaxgpt"
        )
    return data


def check_special_tokens(special_tokens: Sequence[str]) -> tuple[str, ...]:
    """The special tokens as a tuple, refusing duplicates, empty names and non-strings."""
    special_tokens = tuple(special_tokens)
    bad = [t for t in special_tokens if not isinstance(t, str) or not t]
    if bad or len(set(special_tokens)) != len(special_tokens):
        raise TokenizerError(
            f"special tokens must be distinct non-empty strings, got {list(special_tokens)!r}"
        )
    return special_tokens


@functools.cache
def _gpt2_encoding(special_tokens: tuple[str, ...] = ()) -> tiktoken.Encoding:
    """GPT-2's BPE, with `special_tokens` (beyond <|endoftext|>) at ids 50257, 50258, ..."""
    to_byte = _byte_decoder()
    encoder = json.loads(read_bundled_bpe("encoder.json"))
    ranks = {
        bytes(to_byte[ch] for ch in token): rank
        for token, rank in encoder.items()
        if token != ENDOFTEXT
    }
    # vocab.bpe lists the merges in priority order; tiktoken's ranks are the encoder ids, and the
    # two agree exactly when merge i produced token 256 + i. Check it, as tiktoken does.
    merges = read_bundled_bpe("vocab.bpe").decode("utf-8").split("\n")[1:-1]
    for i, merge in enumerate(merges):
        left, right = merge.split(" ")
        merged = bytes(to_byte[ch] for ch in left + right)
        if ranks.get(merged) != 256 + i:
            raise TokenizerError(f"vocab.bpe merge {i} ({merge!r}) disagrees with encoder.json")
    if ENDOFTEXT in special_tokens:
        raise TokenizerError(f"{ENDOFTEXT} is already GPT-2's token {encoder[ENDOFTEXT]}")
    special = {ENDOFTEXT: encoder[ENDOFTEXT]}
    special.update({name: len(encoder) + i for i, name in enumerate(special_tokens)})
    return _GPT2Encoding(
        name="gpt2",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=special,
        explicit_n_vocab=len(encoder) + len(special_tokens),
    )


def added_special_tokens(tokenizer: Tokenizer) -> tuple[str, ...]:
    """The special tokens added to the base vocabulary, in id order (GPT-2's <|endoftext|> is part
    of its base vocabulary, not added)."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.special_tokens
    names = tokenizer.special_tokens_set - {ENDOFTEXT}
    return tuple(sorted(names, key=tokenizer.encode_single_token))


def add_special_tokens(tokenizer: Tokenizer, special_tokens: Sequence[str]) -> Tokenizer:
    """`tokenizer` with `special_tokens` appended after its vocabulary (those it has are kept)."""
    new = [t for t in check_special_tokens(special_tokens) if t not in tokenizer.special_tokens_set]
    if not new:
        return tokenizer
    if isinstance(tokenizer, CharTokenizer):
        return CharTokenizer(tokenizer.chars, tokenizer.special_tokens + tuple(new))
    return _gpt2_encoding(added_special_tokens(tokenizer) + tuple(new))


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters of a corpus,
    followed by the special tokens (if any)."""

    def __init__(self, chars: Iterable[str], special_tokens: Sequence[str] = ()):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise TokenizerError("a character tokenizer needs at least one character")
        self.special_tokens = check_special_tokens(special_tokens)
        self.name = "char"
        self._index = {ch: i for i, ch in enumerate(self.chars)}
        self._special = {t: len(self.chars) + i for i, t in enumerate(self.special_tokens)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(text)

    @property
    def n_vocab(self) -> int:
        return len(self.chars) + len(self.special_tokens)

    @property
    def special_tokens_set(self) -> set[str]:
        return set(self.special_tokens)

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

    def encode_ordinary(self, text: str) -> list[int]:
        """Characters only: a special token's text is encoded character by character."""
        return self.encode(text)

    def encode_single_token(self, text: str) -> int:
        """The id of a special token or of one character (KeyError otherwise, as tiktoken)."""
        if text in self._special:
            return self._special[text]
        return self._index[text]

    def decode(self, tokens: Sequence[int]) -> str:
        n = len(self.chars)
        return "".join(
            self.chars[t] if t < n else self.special_tokens[t - n]
            for t in check_ids(tokens, self.n_vocab)
        )

    def to_json(self) -> dict:
        spec = {"type": "char", "chars": "".join(self.chars)}
        if self.special_tokens:
            spec["special_tokens"] = list(self.special_tokens)
        return spec

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
        return cls(spec["chars"], _special_from_spec(spec, path))


def _special_from_spec(spec: dict, where: object) -> tuple[str, ...]:
    special = spec.get("special_tokens", [])
    if not isinstance(special, list):
        raise TokenizerError(f"{where}: special_tokens must be a list of strings")
    return check_special_tokens(special)


def tokenizer_to_json(tokenizer: Tokenizer) -> dict:
    """The `tokenizer.json` description of a tokenizer (read back by `tokenizer_from_json`):
    `{"type": "char", "chars": ...}` or `{"type": "gpt2"}`, plus `"special_tokens": [...]` when
    special tokens were added."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.to_json()
    special = added_special_tokens(tokenizer)
    return {"type": "gpt2", **({"special_tokens": list(special)} if special else {})}


def tokenizer_from_json(spec: dict, where: object = "tokenizer.json") -> Tokenizer:
    """The tokenizer a `tokenizer_to_json` dict describes; `where` names its file in errors."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "char" and isinstance(spec.get("chars"), str):
        return CharTokenizer(spec["chars"], _special_from_spec(spec, where))
    if kind == "gpt2":
        return _gpt2_encoding(_special_from_spec(spec, where))
    raise TokenizerError(f"{where} does not describe a jaxgpt tokenizer (type 'char' or 'gpt2')")


def get_tokenizer(
    name: str = "gpt2", path: str | Path | None = None, *, special_tokens: Sequence[str] = ()
) -> Tokenizer:
    """A tokenizer by name.

    Args:
      name: "gpt2" for GPT-2's BPE (a `tiktoken.Encoding`, built offline), or "char" for a
        character-level tokenizer whose vocabulary JSON is at `path`.
      path: the vocabulary file, for "char".
      special_tokens: extra special tokens, appended after the vocabulary (for "char", after
        those its file lists).
    """
    if name == "gpt2":
        return _gpt2_encoding(check_special_tokens(special_tokens))
    if name == "char":
        if path is None:
            raise TokenizerError("the 'char' tokenizer needs the path of its vocabulary JSON")
        return add_special_tokens(CharTokenizer.load(path), special_tokens)
    raise TokenizerError(f"unknown tokenizer {name!r}; expected 'gpt2' or 'char'")
