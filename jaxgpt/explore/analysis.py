"""What the explorer page draws, computed once per request from the real forward pass.

    text or token ids (≤ max_tokens), for one page session
      → a new sequence: `forward_cached(..., capture=True)` over the ids right-padded to 16, 32
        or 64 tokens, into a fresh KV cache (a few compilations; causal attention makes the
        padding invisible to the real positions, and later tokens overwrite its cache slots)
      → the session's sequence plus one token ("next token"): the same call on that one token
        at the next cache slot — earlier positions are read from the KV cache, never recomputed
      → tokens (piece, id, bytes), embeddings x_embed [T, D], attention [L, H, T, T] (lower
        triangle), ‖x‖ after each stage [L+1, T], the logit lens at one position, and the
        final logits of the top candidates at the last position

Causal attention is why extending works: a new token changes nothing at earlier positions, so
their captured rows are kept and only the new position's row is appended (its attention row
reads every earlier key from the cache). `next_token` samples from the last position's logits
with `make_sampler`'s settings and the keys `generate(ids, 1, key=key(seed))` uses. Every
function raises `InputError` with a message for the page on bad input.
"""

from __future__ import annotations

import functools
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.cli.common import LoadedModel
from jaxgpt.errors import InputError
from jaxgpt.model import KVCache, forward_cached, init_cache
from jaxgpt.sampling import Greedy, Sampler, make_sampler
from jaxgpt.trace import _read_out, token_piece

MAX_TOKENS = 64  # longest sequence the page analyses (attention is T×T per head per layer)
MAX_TEXT_CHARS = 2000
CANDIDATES = 100  # top tokens whose logits the page filters client-side
LENS_TOP = 5
MAX_SESSIONS = 8  # page sessions whose sequence and KV cache are kept (the oldest goes first)
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# The decoder's cached forward pass with its intermediates; the cache passed in is donated.
_capture_cached = jax.jit(
    functools.partial(forward_cached, capture=True),
    static_argnames=("config",),
    donate_argnames=("cache",),
)


@jax.jit
def _sample(sampler: Sampler, logits_BV: jax.Array, key: jax.Array) -> jax.Array:
    return sampler(logits_BV, key)


@dataclass
class PageSequence:
    """One page session's sequence: its ids, the KV cache holding them (slots 0..T-1) and the
    captured intermediates of every position, as numpy (`Explorer.capture`'s dict)."""

    ids: list[int]
    cache: KVCache
    cap: dict[str, np.ndarray]


def session_id(value: Any) -> str:
    """The page session a request belongs to ("" when it names none: scripts share one)."""
    if value is None:
        return ""
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise InputError("session must be 1 to 64 letters, digits, '-' or '_'")
    return value


def sampling_settings(data: dict[str, Any]) -> tuple[float, int | None, float | None]:
    """(temperature, top_k, top_p) from a request, checked; a sampler is built from them."""
    temperature = _number(data.get("temperature", 1.0), "temperature", 0.0, 100.0)
    top_k = data.get("top_k")
    top_p = data.get("top_p")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
        raise InputError(f"top-k must be a whole number >= 1 (or off), got {top_k!r}")
    if top_p is not None:
        top_p = _number(top_p, "top-p", 0.0, 1.0)
    make_sampler(temperature, top_k, top_p)  # its own checks (top_k >= 1, top_p > 0)
    return temperature, top_k, top_p


@dataclass(frozen=True)
class Explorer:
    """A loaded model and the limits of the page."""

    model: LoadedModel
    # Per page session (bounded, least recently used first out): the sequence, its KV cache and
    # its captures, so "next token" extends by one token and clicking a position (the logit lens)
    # reads the pass already made instead of running the model again.
    _sessions: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)

    @property
    def max_tokens(self) -> int:
        return min(MAX_TOKENS, self.model.config.block_size)

    def info(self) -> dict[str, Any]:
        c = self.model.config
        return {
            "source": self.model.source,
            "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
            "vocab_size": c.vocab_size, "block_size": c.block_size,
            "max_tokens": self.max_tokens, "candidates": min(CANDIDATES, c.vocab_size),
        }  # fmt: skip

    # ------------------------------------------------------------------ input

    def encode(self, text: Any) -> list[int]:
        if not isinstance(text, str) or not text:
            raise InputError("type a prompt: the text is empty")
        if len(text) > MAX_TEXT_CHARS:
            raise InputError(f"the prompt is {len(text)} characters; at most {MAX_TEXT_CHARS}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(f"the prompt is not valid UTF-8 text ({err.reason})") from err
        tokenizer = self.model.tokenizer
        special = {"allowed_special": "all"} if tokenizer.eot_token is not None else {}
        ids = list(tokenizer.encode(text, **special))
        self.check_ids(ids)
        return ids

    def check_ids(self, ids: Any) -> list[int]:
        if not isinstance(ids, list) or not ids:
            raise InputError("ids must be a non-empty list of token ids")
        V = self.model.config.vocab_size
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < V for i in ids):
            raise InputError(f"every token id must be an integer in [0, {V - 1}]")
        if len(ids) > self.max_tokens:
            raise InputError(
                f"the prompt is {len(ids)} tokens; the explorer shows at most {self.max_tokens} "
                f"(shorten it)"
            )
        return ids

    # ------------------------------------------------------------------ the one forward pass

    def capture(self, ids: list[int], session: str = "") -> tuple[dict[str, Any], str]:
        """The captures of `ids` as numpy, cut to T positions, and how they were computed:
        "reused" (the session's sequence), "extended" (the session's sequence plus one token:
        one cached step) or "prefilled" (a new sequence)."""
        seq = self._sessions.get(session)
        if seq is not None and seq.ids == ids:
            self._sessions.move_to_end(session)
            return seq.cap, "reused"
        self._sessions.pop(session, None)  # its cache is donated below: never reuse it after
        if seq is not None and seq.ids == ids[:-1]:
            seq, how = self._extend(seq, ids[-1]), "extended"
        else:
            seq, how = self._prefill(ids), "prefilled"
        self._sessions[session] = seq
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return seq.cap, how

    def bucket(self, n: int) -> int:
        """The padded length for n tokens: 16, 32 or 64 (capped at max_tokens), so a few
        compilations serve every length and a short prompt does not pay for 64 positions."""
        return min(self.max_tokens, max(16, 1 << (n - 1).bit_length()))

    def _run(self, cache: KVCache, slot: int, tokens: list[int]) -> tuple[KVCache, dict]:
        """`forward_cached(capture=True)` of `tokens` at cache slots slot, slot + 1, ..."""
        config = self.model.config
        _, cache, cap = _capture_cached(
            self.model.params, jnp.asarray([tokens], jnp.int32), config, cache,
            jnp.int32(slot), jnp.zeros((1,), jnp.int32),
        )  # fmt: skip
        return cache, jax.tree.map(np.asarray, cap)

    def _prefill(self, ids: list[int]) -> PageSequence:
        T = len(ids)
        padded = ids + [0] * (self.bucket(T) - T)
        cache, cap = self._run(init_cache(self.model.config, 1, self.max_tokens), 0, padded)
        return PageSequence(list(ids), cache, _rows(cap, T, T))

    def _extend(self, seq: PageSequence, token: int) -> PageSequence:
        T = len(seq.ids)
        cache, cap = self._run(seq.cache, T, [token])
        new = _rows(cap, 1, T + 1)
        old = seq.cap
        merged = {name: np.concatenate([old[name], new[name]], axis=_ROW_AXIS[name])
                  for name in old if name != "att"}  # fmt: skip
        att = np.pad(old["att"], [(0, 0), (0, 0), (0, 0), (0, 1)])  # the new key: 0 for them
        merged["att"] = np.concatenate([att, new["att"]], axis=2)
        return PageSequence([*seq.ids, token], cache, merged)

    def lens(self, cap: dict[str, Any], position: int) -> list[dict[str, Any]]:
        """Each stage's residual stream at `position` through ln_f + wteᵀ: top tokens, ‖x‖."""
        stages_SD = cap["stages"][:, position]
        last_1V = cap["logits"][None, position]
        lens_SV, *_ = _read_out(
            self.model.params, stages_SD, last_1V, jax.random.key(0), (Greedy(),),
            self.model.config,
        )  # fmt: skip
        lens_SV = np.asarray(lens_SV)
        rows = []
        for s, probs_V in enumerate(lens_SV):
            top = np.argsort(-probs_V, kind="stable")[:LENS_TOP]
            rows.append({
                "stage": "embeddings" if s == 0 else f"block {s - 1}",
                "norm": float(np.linalg.norm(stages_SD[s])),
                "top": [{"id": int(i), "piece": self.piece(int(i)), "p": float(probs_V[i])}
                        for i in top],
            })  # fmt: skip
        return rows

    def piece(self, token_id: int) -> str:
        try:
            return token_piece(self.model.tokenizer, token_id)
        except (KeyError, IndexError, ValueError):  # a padded vocabulary: ids with no text
            return f"<{token_id}>"

    def token_bytes(self, token_id: int) -> str:
        tok = self.model.tokenizer
        single = getattr(tok, "decode_single_token_bytes", None)
        try:
            raw = single(token_id) if single else tok.decode([token_id]).encode("utf-8")
        except (KeyError, IndexError, ValueError):
            return "(none: outside the tokenizer)"
        return raw.hex(" ")

    def analyze(
        self, ids: list[int], position: int | None = None, session: str = ""
    ) -> dict[str, Any]:
        """Everything the page draws for these ids (at most one forward pass)."""
        self.check_ids(ids)
        T = len(ids)
        position = T - 1 if position is None else self.check_position(position, T)
        cap, how = self.capture(ids, session)
        last_V = cap["logits"][-1].astype(np.float64)
        top = np.argsort(-last_V, kind="stable")[: min(CANDIDATES, last_V.size)]
        log_z = float(np.log(np.exp(last_V - last_V.max()).sum()) + last_V.max())
        att = cap["att"]  # [L, H, T, T]: each row's first i + 1 entries (the causal triangle)
        return {
            "ids": ids,
            "computed": how,
            "tokens": [
                {"id": i, "piece": self.piece(i), "bytes": self.token_bytes(i)} for i in ids
            ],
            "embeddings": _round(cap["x_embed"], 4),
            "attention": [
                [[_round(att_TT[i, : i + 1], 5) for i in range(T)] for att_TT in att_HTT]
                for att_HTT in att
            ],
            "norms": _round(np.linalg.norm(cap["stages"], axis=-1), 6),  # [L+1, T]
            "position": position,
            "lens": self.lens(cap, position),
            "candidates": [
                {"id": int(i), "piece": self.piece(int(i)), "logit": float(last_V[i])} for i in top
            ],
            "candidates_mass": float(np.exp(last_V[top] - log_z).sum()),
        }

    def check_position(self, position: Any, T: int) -> int:
        if not isinstance(position, int) or isinstance(position, bool) or not 0 <= position < T:
            raise InputError(f"position must be an integer from 0 to {T - 1}, got {position!r}")
        return position

    def lens_at(self, ids: list[int], position: Any, session: str = "") -> list[dict[str, Any]]:
        self.check_ids(ids)
        position = self.check_position(position, len(ids))
        return self.lens(self.capture(ids, session)[0], position)

    def head(self, ids: list[int], layer: Any, head: Any, session: str = "") -> dict[str, Any]:
        """One head's value vectors v [T, K] and outputs [T, K]: the output of query i is the
        attention-weighted sum of v[0..i] (the page shows it for the hovered query)."""
        self.check_ids(ids)
        c = self.model.config
        for name, value, size in (("layer", layer, c.n_layer), ("head", head, c.n_head)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < size:
                raise InputError(f"{name} must be an integer from 0 to {size - 1}, got {value!r}")
        cap, _ = self.capture(ids, session)
        return {
            "layer": layer, "head": head,
            "v": _round(cap["v"][layer, head], 6), "out": _round(cap["heads"][layer, head], 6),
        }  # fmt: skip

    # ------------------------------------------------------------------ sampling

    def next_token(self, ids: list[int], settings: dict[str, Any], session: str = "") -> int:
        """One token sampled with the page's settings from the last position's logits (those of
        the session's pass when `ids` is its sequence: no model call), with the key
        `generate(ids, 1, key=jax.random.key(seed))` uses for its first token."""
        self.check_ids(ids)
        if len(ids) >= self.max_tokens:
            raise InputError(f"the sequence is already {len(ids)} tokens, the explorer's limit")
        sampler = make_sampler(*sampling_settings(settings))
        seed = settings.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
            raise InputError(f"seed must be an integer from 0 to 2^31 - 1, got {seed!r}")
        cap, _ = self.capture(ids, session)
        key = jax.random.split(jax.random.key(seed), 1)[0]
        return int(_sample(sampler, jnp.asarray(cap["logits"][None, -1]), key)[0])


# The axis that counts positions in each captured array (`_rows`).
_ROW_AXIS = {"x_embed": 0, "stages": 1, "logits": 0, "v": 2, "heads": 2}


def _rows(cap: dict[str, Any], n: int, keys: int) -> dict[str, np.ndarray]:
    """The first n positions of a `forward_cached(capture=True)` capture of one row, in the
    page's layout; attention over the first `keys` cache slots."""
    layers = cap["layers"]
    return {
        "x_embed": cap["x_embed"][0, :n],
        "att": np.stack([lay["att"][0, :, :n, :keys] for lay in layers]),  # [L, H, n, keys]
        "stages": np.stack([cap["x_embed"][0, :n]] + [lay["x_out"][0, :n] for lay in layers]),
        # ^ [L+1, n, D]: the residual stream after the embeddings and after each block
        "logits": cap["logits"][0, :n],
        "v": np.stack([lay["v"][0, :, :n] for lay in layers]),  # [L, H, n, K]
        "heads": np.stack([lay["heads"][0, :, :n] for lay in layers]),  # [L, H, n, K]
    }


def _number(value: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}")
    return float(value)


def _round(x: np.ndarray, digits: int) -> list:
    return np.round(np.asarray(x, np.float64), digits).tolist()
