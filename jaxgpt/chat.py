"""Conversations ⇄ token ids and the training mask: jaxgpt's chat format.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`
(the OpenAI / Hugging Face chat format): an optional system message first, then user and
assistant turns alternating, starting with the user. It is rendered with five special tokens,
added after the tokenizer's vocabulary (`with_chat_tokens`):

    <|bos|>        begins every conversation
    <|system|>     role headers: each turn is  header, content, <|end|>
    <|user|>
    <|assistant|>
    <|end|>        ends every turn; generation stops when the model emits it

For example, `[system "Be brief.", user "2+3?", assistant "5"]` renders as

    <|bos|><|system|>Be brief.<|end|><|user|>2+3?<|end|><|assistant|>5<|end|>
    mask: 1 exactly on  ──────────────────────────────────────────────  5 <|end|>

`mask[i] = 1` marks `ids[i]` as a token the model is trained to produce: the content of every
assistant turn and its <|end|> — never a header, never system or user text. (As a loss target,
`ids[i]` is predicted from `ids[:i]`: SFT takes the targets `ids[1:]` with `mask[1:]`.)

Content is encoded with `encode_ordinary`, so a user who types "<|end|>" gets the characters
"<|end|>", never the special token: only this module places special tokens. `render_prompt`
renders a conversation ending with a user turn, plus the open `<|assistant|>` header the model
continues. Hugging Face exports carry the same format as a Jinja chat template
(`hf_chat_template`, written by `jaxgpt.pretrained.save_hf`). `read_conversations` streams chat
data files (`.jsonl`, one conversation per line).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from jaxgpt import jsonl
from jaxgpt.errors import ChatFormatError
from jaxgpt.tokenizer import Tokenizer, add_special_tokens

BOS, SYSTEM, USER, ASSISTANT, END = "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (BOS, SYSTEM, USER, ASSISTANT, END)
ROLES = ("system", "user", "assistant")
ROLE_HEADERS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

Message = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    """The ids of the chat tokens in one tokenizer."""

    bos: int
    system: int
    user: int
    assistant: int
    end: int

    def header(self, role: str) -> int:
        return getattr(self, role)


def with_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with the chat tokens appended after its vocabulary (a no-op if it has them).

    A model trained with the plain tokenizer needs its embedding grown to the new vocabulary
    (`jaxgpt.params.grow_vocab`) before it can read or write them.
    """
    return add_special_tokens(tokenizer, CHAT_TOKENS)


def chat_tokens(tokenizer: Tokenizer) -> ChatTokens:
    """The chat tokens' ids, or a ChatFormatError saying how to get a tokenizer that has them."""
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens_set]
    if missing:
        raise ChatFormatError(
            f"this {tokenizer.name} tokenizer has no chat tokens ({', '.join(missing)}): add them "
            f"with jaxgpt.chat.with_chat_tokens and fine-tune the model on conversations first"
        )
    return ChatTokens(*(tokenizer.encode_single_token(t) for t in CHAT_TOKENS))


def check_messages(messages: Any, *, training: bool = False) -> list[Message]:
    """Validate a conversation's structure; returns it as a list.

    Raises ChatFormatError naming the first problem: not a non-empty list, a message that is not
    `{"role", "content"}`, an unknown role, non-string content, a system message after the first,
    a conversation not starting with a user turn, two user (or assistant) turns in a row, or,
    for `training`, no assistant turn (nothing to train on).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError(
            f"a conversation must be a non-empty list of messages, got {_short(messages)}"
        )
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatFormatError(
                f'message {n} must be {{"role": ..., "content": ...}}, got {_short(message)}'
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ChatFormatError(f"message {n} has unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ChatFormatError(
                f"message {n} ({role}) content must be a string, got {type(content).__name__}"
            )
        if role == "system" and n > 1:
            raise ChatFormatError(f"message {n} is a system message; only the first may be one")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if turns and turns[0]["role"] != "user":
        first = len(messages) - len(turns) + 1
        raise ChatFormatError(
            f"message {first} is an {turns[0]['role']} turn; the conversation must start with a "
            f"user turn (after an optional system message)"
        )
    for n in range(1, len(messages)):
        if messages[n]["role"] == messages[n - 1]["role"]:
            role = messages[n]["role"]
            raise ChatFormatError(
                f"messages {n} and {n + 1} are both {role} turns; user and assistant turns must "
                f"alternate"
            )
    if training and not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError("the conversation has no assistant turn: nothing to train on")
    return list(messages)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _render(
    messages: list[Message], tokenizer: Tokenizer, ids_of: ChatTokens
) -> tuple[list[int], list[int]]:
    """(ids, mask) of complete turns."""
    ids, mask = [ids_of.bos], [0]
    for message in messages:
        trained = int(message["role"] == "assistant")
        content = tokenizer.encode_ordinary(message["content"])
        ids += [ids_of.header(message["role"]), *content, ids_of.end]
        mask += [0] + [trained] * (len(content) + 1)
    return ids, mask


def render_conversation(
    messages: Sequence[Message], tokenizer: Tokenizer
) -> tuple[list[int], list[int]]:
    """A conversation → `(ids, mask)`, two equally long lists of ints (see the module docstring).

    The conversation needs at least one assistant turn (otherwise nothing would be trained).
    """
    messages = check_messages(messages, training=True)
    return _render(messages, tokenizer, chat_tokens(tokenizer))


def render_prompt(messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
    """A conversation ending with a user turn → ids ending with the open `<|assistant|>` header,
    for the model to generate the reply (until it emits `<|end|>`)."""
    messages = check_messages(messages)
    if messages[-1]["role"] != "user":
        raise ChatFormatError(
            f"a prompt must end with a user turn for the assistant to answer, but message "
            f"{len(messages)} is a {messages[-1]['role']} turn"
        )
    ids_of = chat_tokens(tokenizer)
    ids, _ = _render(messages, tokenizer, ids_of)
    return [*ids, ids_of.assistant]


def show_mask(ids: Sequence[int], mask: Sequence[int], tokenizer: Tokenizer, *, color: bool) -> str:
    """A rendered conversation as text with the trained tokens marked: green in a terminal
    (`color=True`, ANSI), in [brackets] otherwise — to see at a glance what SFT learns."""
    pieces, run, trained = [], [], None

    def close() -> None:
        if not run:
            return
        text = tokenizer.decode(run)
        if trained:
            text = f"\033[1;32m{text}\033[0m" if color else f"[{text}]"
        pieces.append(text)

    for token, m in zip(ids, mask):
        if bool(m) != trained:
            close()
            run, trained = [], bool(m)
        run.append(int(token))
    close()
    return "".join(pieces)


def hf_chat_template() -> str:
    """This format as a Hugging Face chat template (Jinja), for `tokenizer_config.json`.

    `apply_chat_template` with it gives `render_conversation`'s ids (and, with
    `add_generation_prompt=True`, `render_prompt`'s); the assistant's content and <|end|> sit in
    `{% generation %}` blocks, so `return_assistant_tokens_mask=True` (and TRL's assistant-only
    loss) gives `render_conversation`'s mask. One difference remains: Hugging Face parses special
    tokens out of the rendered text, so content that contains a chat token's literal text
    becomes that token there, never here.
    """
    headers = ", ".join(f"'{role}': '{header}'" for role, header in ROLE_HEADERS.items())
    return "".join(
        [
            f"{{%- set headers = {{{headers}}} -%}}",
            f"{{{{- '{BOS}' -}}}}",
            "{%- for message in messages -%}",
            "{%- if message['role'] not in headers -%}",
            "{{- raise_exception('unknown role ' ~ message['role']) -}}",
            "{%- endif -%}",
            "{{- headers[message['role']] -}}",
            "{%- if message['role'] == 'assistant' -%}",
            f"{{%- generation -%}}{{{{- message['content'] ~ '{END}' -}}}}{{%- endgeneration -%}}",
            "{%- else -%}",
            f"{{{{- message['content'] ~ '{END}' -}}}}",
            "{%- endif -%}",
            "{%- endfor -%}",
            f"{{%- if add_generation_prompt -%}}{{{{- '{ASSISTANT}' -}}}}{{%- endif -%}}",
        ]
    )


# --------------------------------------------------------------------------- chat data files


def _text_field(record: dict, key: str) -> str:
    value = record.get(key, "")
    if not isinstance(value, str):
        raise ChatFormatError(f'"{key}" must be a string, got {type(value).__name__}')
    return value


def conversation_from_record(record: Any) -> list[Message]:
    """One `.jsonl` line's object → a training conversation (validated, with an assistant turn).

    Three line forms are accepted:

      {"messages": [{"role": ..., "content": ...}, ...]}
      {"instruction": ..., "input": ..., "output": ...}   ("input" optional; the user turn is the
                                                          instruction, a blank line, the input)
      {"prompt": ..., "response": ...}                    (one user turn, one assistant turn)
    """
    if not isinstance(record, dict):
        raise ChatFormatError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "instruction" in record and "output" in record:
        user = _text_field(record, "instruction")
        if _text_field(record, "input"):
            user += "\n\n" + record["input"]
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text_field(record, "output")}]  # fmt: skip
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": _text_field(record, "prompt")},
                    {"role": "assistant", "content": _text_field(record, "response")}]  # fmt: skip
    else:
        raise ChatFormatError(
            f'no "messages" (nor "instruction" + "output", nor "prompt" + "response") among the '
            f"keys {sorted(record)[:8]}"
        )
    return check_messages(messages, training=True)


def read_conversations(path: str | Path) -> Iterator[list[Message]]:
    """Stream the conversations of a `.jsonl` chat file, one per non-blank line.

    Every problem is a ChatFormatError of one line naming the file and line number: not UTF-8,
    not JSON, not one of the three line forms (`conversation_from_record`), or a conversation the
    format refuses (`check_messages`: unknown role, two user turns in a row, ...).
    """
    for where, record in jsonl.records(path, what="chat data", error=ChatFormatError):
        try:
            yield conversation_from_record(record)
        except ChatFormatError as err:
            raise ChatFormatError(f"{where}: {err}") from err
