"""A conversation with a chat model: the KV cache kept across turns, replies streamed as made.

    session = Conversation(params, config, tokenizer, system="Be brief.")
    for piece in session.reply("What is 45 + 38?"):   # text pieces as tokens are generated
        print(piece, end="", flush=True)
    session.reply(...)                                 # the next turn reuses the cache

Each turn writes only its own new tokens into the cache (`jaxgpt.decode.extend`): the user's
turn, plus the previous reply's last token, which decoding never fed back. Earlier turns are
never prefilled again — `turn_stats` records how many tokens each turn prefilled and how many a
fresh prefill of the whole conversation would have needed. When the conversation no longer fits
the context, the oldest turns are dropped and what remains is prefilled afresh (said in the
stats as a "restart").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import chat
from jaxgpt.config import GPTConfig
from jaxgpt.decode import DecodeState, decode_steps, extend
from jaxgpt.errors import InputError
from jaxgpt.model import init_cache
from jaxgpt.params import Params
from jaxgpt.sampling import make_sampler
from jaxgpt.tokenizer import Tokenizer


@dataclass
class TurnStats:
    prefilled: int  # tokens this turn wrote into the cache before generating
    without_reuse: int  # tokens a fresh prefill of the whole conversation would have written
    generated: int
    restarted: bool  # the context was full: older turns were dropped and the rest re-prefilled


@dataclass
class Conversation:
    """A chat with one model; `reply(text)` streams the assistant's answer and keeps the turn."""

    params: Params
    config: GPTConfig
    tokenizer: Tokenizer
    system: str | None = None
    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 256
    seed: int = 0
    chunk: int = 1  # decode steps per compiled call (tokens appear chunk by chunk)
    messages: list[dict[str, str]] = field(default_factory=list)
    turn_stats: list[TurnStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ids = chat.chat_tokens(self.tokenizer)  # a clear error for a model without them
        self._sampler = make_sampler(self.temperature, self.top_k, self.top_p)
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self._key = jax.random.key(self.seed)
        self._cache = None
        self._slot = 0  # cache slots in use
        self._carry: list[int] = []  # the last reply's final token (and its <|end|>), unwritten

    def set_sampling(
        self, temperature: float, top_k: int | None = None, top_p: float | None = None
    ) -> None:
        """Sample the next replies with these settings (checked by `make_sampler`)."""
        self._sampler = make_sampler(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to the user message `text` as text pieces; the turn is kept."""
        user = {"role": "user", "content": text}
        whole = chat.render_prompt([*self.messages, user], self.tokenizer)  # validates the turn
        new, restarted = self._new_tokens(user, whole)
        logits_BV, self._cache = extend(
            self.params, self.config, self._cache, self._slot, np.asarray([new])
        )
        self.messages.append(user)
        self._slot += len(new)
        limit = min(self.max_new_tokens, self.config.block_size - self._slot + 1)
        generated: list[int] = []  # filled by the decoder: every token it made, <|end|> included
        shown = ""
        try:
            for _ in self._generate(logits_BV, limit, generated):
                so_far = self._text(generated)
                # A multi-byte character may span tokens: show only what decodes cleanly so far.
                if not so_far.endswith("\ufffd") and len(so_far) > len(shown):
                    yield so_far[len(shown) :]
                    shown = so_far
        finally:  # also when the caller stops reading (Ctrl-C): the turn is kept as far as made
            answer = self._text(generated)
            self.messages.append({"role": "assistant", "content": answer})
            made = len([t for t in generated if t != self._ids.end])
            self.turn_stats.append(TurnStats(len(new), len(whole), made, restarted))
        if answer[len(shown) :]:
            yield answer[len(shown) :]

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t != self._ids.end])

    # ---- the cache across turns

    def _new_tokens(self, user: dict[str, str], whole: list[int]) -> tuple[list[int], bool]:
        """The ids to write for this turn: the unwritten end of the last reply and the user's
        turn with the open assistant header — or, when that would not leave room for a reply,
        the whole conversation (its oldest turns dropped to fit) into a fresh cache."""
        reserve = min(self.max_new_tokens, self.config.block_size // 2)
        if self._cache is not None:
            # A conversation renders as <|bos|> followed by its turns: the user's turn alone is
            # its rendering without the <|bos|>.
            new = self._carry + chat.render_prompt([user], self.tokenizer)[1:]
            if self._slot + len(new) + reserve <= self.config.block_size:
                return new, False
        restarted = self._cache is not None
        while len(whole) + reserve > self.config.block_size and self._drop_oldest_turn():
            whole = chat.render_prompt([*self.messages, user], self.tokenizer)
        if len(whole) >= self.config.block_size:
            raise InputError(
                f"the message is too long: {len(whole)} tokens, the model's context is "
                f"{self.config.block_size}"
            )
        self._cache = init_cache(self.config, 1, self.config.block_size)
        self._slot, self._carry = 0, []
        return whole, restarted

    def _drop_oldest_turn(self) -> bool:
        turns = [i for i, m in enumerate(self.messages) if m["role"] != "system"]
        if not turns:
            return False
        del self.messages[turns[0] : turns[0] + 2]
        return True

    def _generate(self, logits_BV: jax.Array, limit: int, generated: list[int]) -> Iterator[int]:
        """Sample the first token from the prefill's logits, then decode chunk by chunk.

        Afterwards the cache holds every generated token but the last (decoding writes a token
        when it feeds it back); that one, and an <|end|> if the reply was cut short, are the
        `_carry` the next turn writes first.
        """
        self._key, key = jax.random.split(self._key)
        keys = jax.random.split(key, limit + self.chunk)
        generated.append(int(self._sampler(logits_BV, keys[0])[0]))
        state = None
        try:  # the bookkeeping holds even if the caller stops reading early
            yield generated[0]
            if generated[0] == self._ids.end or limit == 1:
                return
            state = DecodeState(
                self._cache, jnp.asarray(generated, jnp.int32), jnp.zeros((1,), bool),
                jnp.int32(self._slot), jnp.zeros((1,), jnp.int32),
            )  # fmt: skip
            while len(generated) < limit and generated[-1] != self._ids.end:
                state, out_BN, steps = decode_steps(
                    self.params, self.config, state, self.chunk, sampler=self._sampler,
                    keys_N=keys[len(generated) : len(generated) + self.chunk],
                    eos_id=self._ids.end, limit=min(self.chunk, limit - len(generated)),
                )  # fmt: skip
                new = np.asarray(out_BN)[0, : int(steps)].tolist()
                generated.extend(new)  # all in the cache but the last, whatever is read
                yield from new
        finally:
            if state is not None:  # decoding donated the old cache: keep the new one
                self._cache, self._slot = state.cache, int(state.slot)
            last = generated[-1]
            self._carry = [last] if last == self._ids.end else [last, self._ids.end]
