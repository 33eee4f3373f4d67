"""The journey of an answer across training stages: one conversation's tokens, scored by each model.

    conversation (user message + answer, or a messages list)
      → `chat.render_conversation` → ids [T] and the SFT mask (1: a token SFT trains, i.e. the
        assistant's content and its <|end|>)
      → `jaxgpt.logprobs` under each model (base, SFT, PPO, DPO, ...) → [M, T-1]
        log p(ids[t+1] | ids[:t+1]) in nats, one row per model

The models must share one tokenizer (the same ids must mean the same text). `format_table`
renders the comparison for a terminal, `render_html` as a colour-coded table
(`jaxgpt trace --model A --compare B ...`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import chat
from jaxgpt.cli.common import LoadedModel
from jaxgpt.errors import InputError
from jaxgpt.eval import logprobs
from jaxgpt.tokenizer import Tokenizer, tokenizer_to_json
from jaxgpt.trace import token_piece

_logprobs = jax.jit(logprobs, static_argnames="config")


@dataclass(frozen=True)
class AnswerComparison:
    """Each token of one conversation, scored by each model."""

    names: tuple[str, ...]  # one per model, in the order given
    ids: tuple[int, ...]  # the rendered conversation, [T]
    mask: tuple[int, ...]  # render_conversation's mask, [T]: 1 where SFT trains ids[i]
    pieces: tuple[str, ...]  # each token's quoted text
    logprobs_MT: np.ndarray  # [M, T-1] float32: log p(ids[t+1] | ids[:t+1]) under model m

    def trained_sums(self) -> np.ndarray:
        """Per model, the summed log-probability of the trained tokens (the answer): [M]."""
        return self.logprobs_MT[:, np.asarray(self.mask[1:], bool)].sum(axis=1)


def describe_tokenizer(tokenizer: Tokenizer) -> str:
    spec = tokenizer_to_json(tokenizer)
    what = f"{spec['type']}" + (f" ({len(spec['chars'])} characters)" if "chars" in spec else "")
    added = spec.get("special_tokens", [])
    return what + (f" + {len(added)} added tokens" if added else "")


def check_same_tokenizer(models: Sequence[tuple[str, LoadedModel]]) -> Tokenizer:
    """The tokenizer every model shares, or an InputError naming the first that differs."""
    (first_name, first), *rest = models
    spec = tokenizer_to_json(first.tokenizer)
    for name, model in rest:
        if tokenizer_to_json(model.tokenizer) != spec:
            raise InputError(
                f"--compare {name} has another tokenizer than --model {first_name}: "
                f"{describe_tokenizer(model.tokenizer)} vs {describe_tokenizer(first.tokenizer)}; "
                f"the same token ids must mean the same text in every model"
            )
    return first.tokenizer


def compare_answers(
    models: Sequence[tuple[str, LoadedModel]], messages: Sequence[dict]
) -> AnswerComparison:
    """Score the conversation `messages` (with at least one assistant turn) under each
    `(name, model)`; the models must share a tokenizer."""
    tokenizer = check_same_tokenizer(models)
    ids, mask = chat.render_conversation(messages, tokenizer)
    rows = []
    for name, m in models:
        if len(ids) > m.config.block_size + 1:
            raise InputError(
                f"the conversation is {len(ids)} tokens; {name}'s context is "
                f"{m.config.block_size} (at most {m.config.block_size + 1} tokens can be scored)"
            )
        if max(ids) >= m.config.vocab_size:  # jit would clamp the id silently
            raise InputError(
                f"{name}'s vocabulary has {m.config.vocab_size} ids, but the chat tokens go up "
                f"to {max(ids)}: its embedding was not grown for them (jaxgpt.params.grow_vocab)"
            )
        row = _logprobs(m.params, m.config, jnp.asarray([ids], jnp.int32))
        rows.append(np.asarray(row[0], np.float32))
    return AnswerComparison(
        names=tuple(name for name, _ in models), ids=tuple(ids), mask=tuple(mask),
        pieces=tuple(token_piece(tokenizer, i) for i in ids), logprobs_MT=np.stack(rows),
    )  # fmt: skip


# --------------------------------------------------------------------------- showing it


def format_table(cmp: AnswerComparison) -> str:
    """A terminal table: one row per token, one column of log-probabilities per model."""
    width = max(9, *(len(n) for n in cmp.names))
    piece_w = min(24, max(len(p) for p in cmp.pieces))
    head = f"{'pos':>4}  {'token':<{piece_w}}  SFT  " + "  ".join(
        f"{n:>{width}}" for n in cmp.names
    )
    lines = [
        "log p(token | the tokens before it), in nats, under each model",
        "SFT *: a token SFT trains (chat.render_conversation's mask: the answer and its <|end|>)",
        "",
        head,
        "-" * len(head),
    ]
    for t, (piece, trained) in enumerate(zip(cmp.pieces, cmp.mask)):
        piece = piece if len(piece) <= piece_w else piece[: piece_w - 1] + "…"
        if t == 0:
            scores = "  ".join(f"{'—':>{width}}" for _ in cmp.names)  # nothing before it
        else:
            scores = "  ".join(f"{lp:>{width}.4f}" for lp in cmp.logprobs_MT[:, t - 1])
        lines.append(f"{t:>4}  {piece:<{piece_w}}  {'*' if trained else ' ':^3}  {scores}")
    n = sum(cmp.mask[1:])
    lines.append("-" * len(head))
    sums = cmp.trained_sums()
    pad = " " * (4 + 2 + piece_w + 2 + 3 + 2 - len("sum over *"))
    lines.append("sum over *" + pad + "  ".join(f"{s:>{width}.4f}" for s in sums))
    lines.append(
        "mean per *" + pad + "  ".join(f"{s / max(n, 1):>{width}.4f}" for s in sums)
        + f"   ({n} trained tokens)"
    )  # fmt: skip
    return "\n".join(lines)


def _colour(logprob: float) -> str:
    """Probability 1 → green, 0.5 → yellow, ≤ 1e-3 → red: the hue follows log p."""
    hue = 120 * min(1.0, max(0.0, 1 + logprob / (3 * math.log(10))))
    return f"hsl({hue:.0f}, 75%, 82%)"


def render_html(cmp: AnswerComparison, sources: Sequence[str]) -> str:
    """A self-contained page: the colour-coded table (cell colour = the model's probability of
    the token; trained rows marked) and the sums over the trained tokens."""
    esc = html.escape
    head = "".join(f'<th title="{esc(s)}">{esc(n)}</th>' for n, s in zip(cmp.names, sources))
    rows = []
    for t, (tid, piece, trained) in enumerate(zip(cmp.ids, cmp.pieces, cmp.mask)):
        if t == 0:
            cells = "".join('<td class="none">—</td>' for _ in cmp.names)
        else:
            cells = "".join(
                f'<td style="background:{_colour(lp)}" title="p = {math.exp(lp):.4g}">{lp:.4f}</td>'
                for lp in cmp.logprobs_MT[:, t - 1]
            )
        kind = "trained" if trained else "context"
        rows.append(
            f'<tr class="{kind}"><td>{t}</td><td class="piece" title="id {tid}">{esc(piece)}</td>'
            f'<td class="mark">{"✓" if trained else ""}</td>{cells}</tr>'
        )
    sums = "".join(f"<td>{s:.4f}</td>" for s in cmp.trained_sums())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jaxgpt trace: an answer across models</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ padding: 2px 8px; border-bottom: 1px solid #eee; text-align: right;
          font-family: monospace; }}
td.piece, th.piece {{ text-align: left; white-space: pre; }}
tr.trained td.piece, tr.trained td.mark {{ font-weight: bold; background: #e8f0ff; }}
tr.context td.piece {{ color: #777; }}
tfoot td {{ font-weight: bold; border-top: 2px solid #999; }}
</style></head><body>
<h1>The journey of an answer across models</h1>
<p>Each cell is log p(token | the tokens before it) in nats under that model; the colour is the
probability (green near 1, yellow 0.03, red 0.001 and below). ✓ marks the tokens SFT trains
(<code>jaxgpt.chat.render_conversation</code>'s mask: the assistant's answer and its end token).
Models: {", ".join(f"{esc(n)} = {esc(s)}" for n, s in zip(cmp.names, sources))}.</p>
<table>
<thead><tr><th>pos</th><th class="piece">token</th><th>SFT</th>{head}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
<tfoot><tr><td></td><td class="piece">sum over ✓</td><td></td>{sums}</tr></tfoot>
</table>
</body></html>
"""
