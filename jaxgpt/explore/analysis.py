"""What the explorer page draws, computed once per request from the real forward pass.

    text or token ids (≤ max_tokens)
      → `forward(..., capture=True)` on the ids right-padded to 16, 32 or 64 tokens (a few
        compilations; causal attention makes the padding invisible to the real positions)
      → tokens (piece, id, bytes), embeddings x_embed [T, D], attention [L, H, T, T] (lower
        triangle), ‖x‖ after each stage [L+1, T], the logit lens at one position, and the
        final logits of the top candidates at the last position

`next_token` samples with the KV-cache decoder (`jaxgpt.decode.decode_padded`, what
`generate` runs) and `make_sampler`'s settings. Every function raises `InputError` with a
message for the page on bad input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.cli.common import LoadedModel
from jaxgpt.decode import decode_padded
from jaxgpt.errors import InputError
from jaxgpt.sampling import Greedy, make_sampler
from jaxgpt.trace import _forward_capture, _read_out, token_piece

MAX_TOKENS = 64  # longest sequence the page analyses (attention is T×T per head per layer)
MAX_TEXT_CHARS = 2000
CANDIDATES = 100  # top tokens whose logits the page filters client-side
LENS_TOP = 5


@dataclass(frozen=True)
class Explorer:
    """A loaded model and the limits of the page."""

    model: LoadedModel
    # The captures of the last few sequences: clicking a position (the logit lens) after an
    # analysis reads the pass already made instead of running the model again.
    _captures: dict = field(default_factory=dict, repr=False, compare=False)

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

    def capture(self, ids: list[int]) -> dict[str, Any]:
        """`forward(..., capture=True)` on ids right-padded to `bucket(T)`, as numpy, cut to T."""
        key = tuple(ids)
        if key not in self._captures:
            if len(self._captures) >= 4:
                self._captures.pop(next(iter(self._captures)))  # the oldest
            self._captures[key] = self._capture(ids)
        return self._captures[key]

    def bucket(self, n: int) -> int:
        """The padded length for n tokens: 16, 32 or 64 (capped at max_tokens), so a few
        compilations serve every length and a short prompt does not pay for 64 positions."""
        return min(self.max_tokens, max(16, 1 << (n - 1).bit_length()))

    def _capture(self, ids: list[int]) -> dict[str, Any]:
        T = len(ids)
        padded_1S = np.zeros((1, self.bucket(T)), np.int32)
        padded_1S[0, :T] = ids
        _, cap = _forward_capture(self.model.params, jnp.asarray(padded_1S), self.model.config)
        cap = jax.tree.map(np.asarray, cap)
        return {
            "x_embed": cap["x_embed"][0, :T],
            "att": np.stack([lay["att"][0, :, :T, :T] for lay in cap["layers"]]),
            "stages": np.stack(
                [cap["x_embed"][0, :T]] + [lay["x_out"][0, :T] for lay in cap["layers"]]
            ),  # [L+1, T, D]: the residual stream after embeddings and after each block
            "logits": cap["logits"][0, :T],
            "v": np.stack([lay["v"][0, :, :T] for lay in cap["layers"]]),  # [L, H, T, K]
            "heads": np.stack([lay["heads"][0, :, :T] for lay in cap["layers"]]),  # [L, H, T, K]
        }

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

    def analyze(self, ids: list[int], position: int | None = None) -> dict[str, Any]:
        """Everything the page draws for these ids (one forward pass)."""
        self.check_ids(ids)
        T = len(ids)
        position = T - 1 if position is None else self.check_position(position, T)
        cap = self.capture(ids)
        last_V = cap["logits"][-1].astype(np.float64)
        top = np.argsort(-last_V, kind="stable")[: min(CANDIDATES, last_V.size)]
        log_z = float(np.log(np.exp(last_V - last_V.max()).sum()) + last_V.max())
        att = cap["att"]  # [L, H, T, T]: each row's first i + 1 entries (the causal triangle)
        return {
            "ids": ids,
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

    def lens_at(self, ids: list[int], position: Any) -> list[dict[str, Any]]:
        self.check_ids(ids)
        return self.lens(self.capture(ids), self.check_position(position, len(ids)))

    def head(self, ids: list[int], layer: Any, head: Any) -> dict[str, Any]:
        """One head's value vectors v [T, K] and outputs [T, K]: the output of query i is the
        attention-weighted sum of v[0..i] (the page shows it for the hovered query)."""
        self.check_ids(ids)
        c = self.model.config
        for name, value, size in (("layer", layer, c.n_layer), ("head", head, c.n_head)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < size:
                raise InputError(f"{name} must be an integer from 0 to {size - 1}, got {value!r}")
        cap = self.capture(ids)
        return {
            "layer": layer, "head": head,
            "v": _round(cap["v"][layer, head], 6), "out": _round(cap["heads"][layer, head], 6),
        }  # fmt: skip

    # ------------------------------------------------------------------ sampling

    def next_token(self, ids: list[int], settings: dict[str, Any]) -> int:
        """One token sampled by the decoder with the page's settings."""
        self.check_ids(ids)
        if len(ids) >= self.max_tokens:
            raise InputError(f"the sequence is already {len(ids)} tokens, the explorer's limit")
        temperature = _number(settings.get("temperature", 1.0), "temperature", 0.0, 100.0)
        top_k = settings.get("top_k")
        top_p = settings.get("top_p")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
            raise InputError(f"top-k must be a whole number >= 1 (or off), got {top_k!r}")
        if top_p is not None:
            top_p = _number(top_p, "top-p", 0.0, 1.0)
        seed = settings.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
            raise InputError(f"seed must be an integer from 0 to 2^31 - 1, got {seed!r}")
        sampler = make_sampler(temperature, top_k, top_p)
        # The decoder on the ids left-padded to a bucket length (row semantics of a ragged batch:
        # the padding is masked and positions count from the first real slot), so a few
        # compilations serve every length; the same keys as `generate(ids, 1, key=key(seed))`.
        T = len(ids)
        S = self.bucket(T)
        tokens_1S = np.zeros((1, S), np.int32)
        tokens_1S[0, S - T :] = ids
        new_11 = decode_padded(
            self.model.params, jnp.asarray(tokens_1S), jnp.asarray([S - T], jnp.int32),
            jax.random.split(jax.random.key(seed), 1), sampler, np.int32(-1), np.int32(0),
            config=self.model.config, max_new_tokens=1,
        )  # fmt: skip
        return int(new_11[0, 0])


def _number(value: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}")
    return float(value)


def _round(x: np.ndarray, digits: int) -> list:
    return np.round(np.asarray(x, np.float64), digits).tolist()
