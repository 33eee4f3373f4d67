"""The explorer's chat tab: one `jaxgpt.conversation.Conversation` per page session.

    message + settings (temperature, top-k, top-p, max new tokens)
      → the session's Conversation (created on its first message; its KV cache is kept across
        turns, so a turn prefills only its own tokens)
      → reply pieces as the decoder makes them (the server streams them as server-sent events)

Conversations are bounded (`MAX_CHATS`, the least recently used goes first: each holds a cache
of the model's whole context), and one session streams one reply at a time.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from jaxgpt import chat
from jaxgpt.cli.common import LoadedModel
from jaxgpt.conversation import Conversation
from jaxgpt.errors import InputError, JaxgptError
from jaxgpt.explore.analysis import MAX_TEXT_CHARS, sampling_settings

MAX_CHATS = 4
MAX_NEW_TOKENS = 1024


@dataclass
class Chats:
    """The chat sessions of one model, or the reason it has none (`absent`)."""

    model: LoadedModel
    _sessions: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def absent(self) -> str | None:
        """None for a chat model; otherwise why the chat tab is absent (one sentence)."""
        try:
            chat.chat_tokens(self.model.tokenizer)
        except JaxgptError as err:
            return f"This model is not a chat model: {err}."
        return None

    def reset(self, session: str) -> bool:
        """Forget the session's conversation; True if there was one."""
        with self._lock:
            return self._sessions.pop(session, None) is not None

    def reply(self, session: str, data: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Events of the reply to `data["message"]`: {"piece": text} as tokens are made, then
        {"done": ..., "stats": ...}. Everything is checked before the generator is returned, and
        the first piece is made by the first `next` (the caller's chance to report an error)."""
        if self.absent is not None:
            raise InputError(self.absent)
        message = data.get("message")
        if not isinstance(message, str) or not message.strip():
            raise InputError("type a message: it is empty")
        if len(message) > MAX_TEXT_CHARS:
            raise InputError(f"the message is {len(message)} characters; at most {MAX_TEXT_CHARS}")
        try:
            message.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(f"the message is not valid UTF-8 text ({err.reason})") from err
        temperature, top_k, top_p = sampling_settings(data)
        max_new = data.get("max_new_tokens", 256)
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise InputError(f"max new tokens must be a whole number >= 1, got {max_new!r}")
        conversation, busy = self._conversation(session)
        if not busy.acquire(blocking=False):
            raise InputError("a reply is still streaming in this session: wait for it to end")
        conversation.set_sampling(temperature, top_k, top_p)
        conversation.max_new_tokens = min(max_new, MAX_NEW_TOKENS)
        return self._events(conversation, message, busy)

    def _conversation(self, session: str) -> tuple[Conversation, threading.Lock]:
        """The session's conversation (a new one if it has none) and the lock held while it
        streams."""
        with self._lock:
            entry = self._sessions.pop(session, None)
            if entry is None:
                m = self.model
                entry = Conversation(m.params, m.config, m.tokenizer), threading.Lock()
            self._sessions[session] = entry  # the most recently used, last
            while len(self._sessions) > MAX_CHATS:
                self._sessions.popitem(last=False)
            return entry

    @staticmethod
    def _events(
        conversation: Conversation, message: str, busy: threading.Lock
    ) -> Iterator[dict[str, Any]]:
        start = time.perf_counter()
        try:
            for piece in conversation.reply(message):
                yield {"piece": piece}
            stats = conversation.turn_stats[-1]
            seconds = time.perf_counter() - start
            yield {
                "done": conversation.messages[-1]["content"],
                "stats": {
                    "prefilled": stats.prefilled, "without_reuse": stats.without_reuse,
                    "generated": stats.generated, "restarted": stats.restarted,
                    "turn": len(conversation.turn_stats), "ms": round(1e3 * seconds, 1),
                },
            }  # fmt: skip
        finally:  # also when the page goes away mid-reply: the turn is kept as far as made
            busy.release()
