"""The journey of a prompt: every stage of GPT-2 inference, with the real numbers of one pass.

`trace(params, config, tokenizer, prompt)` runs ONE forward pass of the real model
(`jaxgpt.model.forward(..., capture=True)`) and keeps its intermediates. Everything the report
shows is read off that pass, never recomputed by a second model:

    1. tokenization            prompt → token ids [1, T]
    2. embeddings              wte[ids] + wpe[positions] → x [1, T, D]
    3. transformer blocks      ln_1 → Q, K, V [1, H, T, K] → softmax(QKᵀ/√K) with the causal mask
                               → weighted sum of values → c_proj → residual add
                               → ln_2 → MLP D → 4D → D → residual add
    4. residual stream         its norm after every block, and the logit lens: the next-token
                               guess each block's output would give through ln_f + wteᵀ
    5. output                  ln_f → logits [1, T, V] → softmax at the last position → top-k,
                               and the token each sampling strategy picks (fixed seed)

The result is a `Trace`. `format_report` renders it for a terminal; `save_trace` writes the
report, PNG figures (attention heatmaps, the top-k bar chart) and a self-contained HTML page.
"""

from __future__ import annotations

import base64
import functools
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.errors import InputError
from jaxgpt.model import check_tokens, forward, unembed
from jaxgpt.params import Params
from jaxgpt.sampling import RandomSampling, make_sampler
from jaxgpt.tokenizer import Tokenizer

# The real forward pass with its intermediates; config is static (a hashable frozen dataclass).
_forward_capture = jax.jit(functools.partial(forward, capture=True), static_argnames=("config",))


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class LensRow:
    """The residual stream after one stage, read at the last position through ln_f + wteᵀ."""

    name: str  # "embeddings" or "block l"
    norm_last: float  # ‖x‖ at the last position
    norm_mean: float  # ‖x‖ averaged over positions
    top_ids: tuple[int, ...]
    top_probs: tuple[float, ...]


@dataclass(frozen=True)
class SamplingPick:
    """The token one sampling strategy draws from the last position's logits."""

    strategy: str
    token_id: int
    probability: float  # the model's (unfiltered, temperature 1) probability of that token
    candidates: int  # tokens the strategy could have drawn (non-zero probability after filters)


@dataclass(frozen=True)
class Trace:
    """One prompt's pass through the model.

    `captured` is `forward(..., capture=True)`'s dict as numpy arrays (batch axis of 1 kept):
    "x_embed" [1,T,D]; "layers": per block x_in, ln_1, q, k, v [1,H,T,K], att [1,H,T,T], heads
    [1,H,T,K], attn_out, x_mid, ln_2, mlp_hidden [1,T,4D], mlp_out, x_out; "ln_f"; "logits"
    [1,T,V].
    """

    prompt: str
    source: str
    config: GPTConfig
    token_ids: tuple[int, ...]
    pieces: tuple[str, ...]  # each token's quoted text (see `token_piece`)
    layer: int
    head: int
    token: int
    top_k: int
    seed: int
    captured: dict[str, Any]
    wte_rows: np.ndarray  # [T, D] the token-embedding rows of the prompt
    wpe_rows: np.ndarray  # [T, D] the position-embedding rows 0..T-1
    lens: tuple[LensRow, ...]
    top_ids: tuple[int, ...]  # final top-k at the last position
    top_probs: tuple[float, ...]
    picks: tuple[SamplingPick, ...]
    vocab_pieces: dict[int, str]  # quoted text of every token id the report mentions

    @property
    def T(self) -> int:
        return len(self.token_ids)


# --------------------------------------------------------------------------- building a trace


def token_piece(tokenizer: Tokenizer, token_id: int) -> str:
    """One token's text, quoted so spaces show: "' mundo'". A GPT-2 token can be part of a UTF-8
    character; such a piece is shown as its bytes, e.g. "b'\\xc3'"."""
    single = getattr(tokenizer, "decode_single_token_bytes", None)
    if single is None:
        return repr(tokenizer.decode([token_id]))
    raw = single(token_id)
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)


def _check_index(name: str, value: int, size: int, what: str) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if not 0 <= value < size:
        raise InputError(f"{name} {value} is out of range: {what} (valid: 0 to {size - 1})")


@functools.partial(jax.jit, static_argnames=("config",))
def _read_out(
    params: Params,
    stages_SD: jax.Array,
    last_1V: jax.Array,
    key: jax.Array,
    samplers: tuple,
    config: GPTConfig,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Everything read off the captured pass, in one compiled call.

    Args:
      stages_SD: the residual stream at the last position after each stage (embeddings, blocks).
      last_1V: the captured logits of the last position.
      samplers: the sampling strategies to demonstrate, all drawn with the same `key`.

    Returns the logit-lens probabilities [S, V] (each stage through ln_f + wteᵀ), the final
    next-token probabilities [V], each sampler's pick [N] and how many tokens it could draw [N].
    """
    lens_SV = jax.nn.softmax(unembed(params, stages_SD[None], config)[0], axis=-1)
    probs_V = jax.nn.softmax(last_1V[0], axis=-1)
    picks, candidates = [], []
    for sampler in samplers:
        picks.append(sampler(last_1V, key)[0])
        if isinstance(sampler, RandomSampling):
            candidates.append(jnp.isfinite(sampler.filter_logits(last_1V)[0]).sum())
        else:
            candidates.append(jnp.asarray(1))  # greedy: the argmax, nothing else
    return lens_SV, probs_V, jnp.stack(picks), jnp.stack(candidates)


def _top(probs_V: np.ndarray, k: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    # Stable sort of -p: ties keep the lower id first, as argmax does.
    ids = np.argsort(-probs_V, kind="stable")[:k]
    return tuple(int(i) for i in ids), tuple(float(probs_V[i]) for i in ids)


def trace(
    params: Params,
    config: GPTConfig,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    layer: int = 0,
    head: int = 0,
    token: int | None = None,
    top_k: int = 5,
    temperature: float = 0.8,
    top_p: float = 0.9,
    seed: int = 0,
    source: str = "",
) -> Trace:
    """Run `prompt` through the model once and collect every stage.

    Args:
      params, config: the model.
      tokenizer: its tokenizer (GPT-2 BPE or a character tokenizer).
      prompt: the text; it must encode to 1 … config.block_size tokens.
      layer, head: the block and head the report details (the others get one line each).
      token: the position whose attention is spelled out as a weighted sum of value vectors
        (default: the last token; negative values count from the end, -1 being the last).
      top_k: how many next-token candidates to list (final distribution and logit lens); also
        the k of the top-k sampling strategy.
      temperature, top_p: settings of the sampling strategies shown.
      seed: the PRNG seed of the sampling strategies (`jax.random.key(seed)`).
      source: a description of where the weights came from, for the report header.
    """
    if not isinstance(prompt, str) or not prompt:
        raise InputError("prompt must be a non-empty string")
    ids = list(tokenizer.encode(prompt, allowed_special="all"))
    T = len(ids)
    if config.block_size < T:
        raise InputError(
            f"prompt is {T} tokens long, more than the model's block_size {config.block_size}; "
            f"shorten the prompt"
        )
    _check_index("layer", layer, config.n_layer, f"the model has {config.n_layer} layers")
    _check_index("head", head, config.n_head, f"each layer has {config.n_head} heads")
    token = T - 1 if token is None else token
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool) and -T <= token < 0:
        token += T  # as in Python indexing: -1 is the last token
    _check_index("token", token, T, f"the prompt has {T} tokens (or -{T} to -1 from the end)")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 100:
        raise InputError(f"top_k must be an integer from 1 to 100, got {top_k!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"seed must be an integer, got {seed!r}")
    if not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise InputError(f"temperature must be a finite number > 0, got {temperature!r}")
    top_k = min(top_k, config.vocab_size)
    samplers = {
        "greedy": make_sampler(temperature=0),
        f"temperature {temperature:g}": make_sampler(temperature=temperature),
        f"temperature {temperature:g}, top-k {top_k}": make_sampler(temperature, top_k=top_k),
        f"temperature {temperature:g}, top-p {top_p:g}": make_sampler(temperature, top_p=top_p),
    }

    tokens_1T = jnp.asarray([ids], dtype=jnp.int32)
    check_tokens(tokens_1T, config)  # ids beyond the model's vocabulary: a clear error

    # ---- the one real forward pass
    _, captured = _forward_capture(params, tokens_1T, config)
    captured = jax.tree.map(np.asarray, captured)

    # ---- logit lens, output distribution and sampling, read off the captured pass
    stages = [("embeddings", captured["x_embed"])]
    stages += [(f"block {i}", lay["x_out"]) for i, lay in enumerate(captured["layers"])]
    stages_SD = np.stack([x_1TD[0, -1] for _, x_1TD in stages])
    last_1V = captured["logits"][:, -1]
    lens_SV, probs_V, picked, candidates = (
        np.asarray(a)
        for a in _read_out(
            params, stages_SD, last_1V, jax.random.key(seed), tuple(samplers.values()), config
        )
    )
    lens = []
    for (name, x_1TD), lens_V in zip(stages, lens_SV):
        norms_T = np.linalg.norm(x_1TD[0], axis=-1)
        lens.append(LensRow(name, float(norms_T[-1]), float(norms_T.mean()), *_top(lens_V, top_k)))
    top_ids, top_probs = _top(probs_V, top_k)
    picks = [
        SamplingPick(strategy, int(tid), float(probs_V[tid]), int(n))
        for strategy, tid, n in zip(samplers, picked, candidates)
    ]

    mentioned = set(ids) | set(top_ids) | {p.token_id for p in picks}
    for row in lens:
        mentioned |= set(row.top_ids)
    return Trace(
        prompt=prompt,
        source=source,
        config=config,
        token_ids=tuple(ids),
        pieces=tuple(token_piece(tokenizer, i) for i in ids),
        layer=int(layer),
        head=int(head),
        token=int(token),
        top_k=top_k,
        seed=seed,
        captured=captured,
        wte_rows=np.asarray(params["wte"])[ids],
        wpe_rows=np.asarray(params["wpe"])[:T],
        lens=tuple(lens),
        top_ids=top_ids,
        top_probs=top_probs,
        picks=tuple(picks),
        vocab_pieces={i: token_piece(tokenizer, i) for i in sorted(mentioned)},
    )


# --------------------------------------------------------------------------- the terminal report


def _vec(x: np.ndarray, n: int) -> str:
    """The first n numbers of a vector, e.g. "[ 0.0123, -0.4560, …]"."""
    head = ", ".join(f"{v: .4f}" for v in np.asarray(x, dtype=np.float64)[:n])
    return f"[{head}{', …' if len(x) > n else ''}]"


def _prob(p: float) -> str:
    """A probability in 6–7 characters; tiny ones (random weights) in scientific notation."""
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def _shape(x: np.ndarray) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _cell(w: float) -> str:
    """An attention weight in 4 characters: "0.13" → " .13", "1.00" → "1.00"."""
    s = f"{w:.2f}"
    return " " + s[1:] if s.startswith("0") else s


def _attention_matrix(att_TT: np.ndarray, labels: list[str], max_t: int = 24) -> list[str]:
    T = att_TT.shape[0]
    if max_t < T:
        return [f"    ({T}×{T} — too wide to print; see the heatmaps written with --out)"]
    w = max(len(s) for s in labels)
    lines = [" " * (w + 6) + "".join(f"{j:>4} " for j in range(T)) + "   row sum"]
    for i in range(T):
        cells = "".join((_cell(att_TT[i, j]) if j <= i else "   ·") + " " for j in range(T))
        lines.append(f"    {i:>2} {labels[i]:<{w}} {cells}  {att_TT[i].sum(dtype=np.float64):.6f}")
    return lines


def format_report(tr: Trace, *, numbers: int = 4) -> str:
    """The trace as a readable, numbered text report (the same text `jaxgpt trace` prints)."""
    c, cap = tr.config, tr.captured
    T, D, H, K = tr.T, c.n_embd, c.n_head, c.head_dim
    V, i, h, lay_idx = c.vocab_size, tr.token, tr.head, tr.layer
    piece = tr.vocab_pieces.__getitem__
    labels = list(tr.pieces)
    n = numbers
    out: list[str] = []
    add = out.append

    add(f"jaxgpt trace — {tr.source or 'model'}")
    add(
        f"model: {c.n_layer} layers, {H} heads of width {K}, n_embd {D}, vocabulary {V}, "
        f"block_size {c.block_size}, dtype {c.dtype}"
    )
    add(f"prompt: {tr.prompt!r}")

    # 1. tokenization
    add("")
    add(f"1. Tokenization — {T} tokens, token ids shape [1, {T}]")
    w = max(len(s) for s in labels)
    add(f"     #  {'piece':<{w}}  id")
    for t, (tid, lab) in enumerate(zip(tr.token_ids, labels)):
        add(f"    {t:>2}  {lab:<{w}}  {tid}")

    # 2. embeddings
    add("")
    add(
        f"2. Embeddings — x = wte[ids] + wpe[positions]: wte [{V}, {D}], wpe [{c.block_size}, "
        f"{D}] → x {_shape(cap['x_embed'])}"
    )
    x0 = cap["x_embed"][0]
    for t in sorted({0, i}):
        add(f"    token {t} {labels[t]}:")
        add(f"      wte[{tr.token_ids[t]}] = {_vec(tr.wte_rows[t], n)}")
        add(f"      wpe[{t}]{' ' * max(0, len(str(tr.token_ids[t])) - len(str(t)))} = "
            f"{_vec(tr.wpe_rows[t], n)}")  # fmt: skip
        add(f"      x[{t}]{' ' * max(0, len(str(tr.token_ids[t])) - len(str(t))) + '  '} = "
            f"{_vec(x0[t], n)}   ‖x‖ = {np.linalg.norm(x0[t]):.3f}")  # fmt: skip

    # 3. blocks
    add("")
    add(
        f"3. Transformer blocks — block {lay_idx} in detail (head {h}, token {i} {labels[i]}); "
        f"the others in one line"
    )
    for li, lay in enumerate(cap["layers"]):
        att = lay["att"][0]  # [H, T, T]
        if li != lay_idx:
            mean_TT = att.mean(0)
            j = int(mean_TT[i].argmax())
            add(
                f"  block {li}: token {i} attends most to {j} {labels[j]} (head-mean weight "
                f"{mean_TT[i, j]:.3f}); ‖attn_out‖ {np.linalg.norm(lay['attn_out'][0, i]):.3f}, "
                f"‖mlp_out‖ {np.linalg.norm(lay['mlp_out'][0, i]):.3f}, "
                f"‖x_out‖ {np.linalg.norm(lay['x_out'][0, i]):.3f}"
            )
            continue
        add(f"  block {li}")
        x_in = lay["x_in"][0, i]
        add(
            f"    ln_1: LayerNorm of x_in {_shape(lay['x_in'])}: each token's vector is shifted "
            f"to mean 0 and scaled to variance 1, then scaled and shifted by learned (γ, β)"
        )
        add(
            f"      token {i}: x_in  = {_vec(x_in, n)}  mean {x_in.mean():.4f} std {x_in.std():.4f}"
        )
        add(f"      token {i}: ln_1  = {_vec(lay['ln_1'][0, i], n)}")
        add(
            f"    Q, K, V: c_attn [{D}, {3 * D}] projects ln_1 into {H} heads × (q, k, v) → "
            f"q {_shape(lay['q'])}, k {_shape(lay['k'])}, v {_shape(lay['v'])} [B, H, T, K]"
        )
        add(f"      head {h}, token {i}: q = {_vec(lay['q'][0, h, i], n)}")
        add(f"      head {h}, token {i}: k = {_vec(lay['k'][0, h, i], n)}")
        add(f"      head {h}, token {i}: v = {_vec(lay['v'][0, h, i], n)}")
        add(
            f"    attention, head {h}: softmax(Q Kᵀ / √{K}) with the causal mask (· = masked: a "
            f"token never sees later tokens) → att {_shape(lay['att'])}"
        )
        out.extend(_attention_matrix(att[h], labels))
        sums = att.sum(-1, dtype=np.float64)
        above = att[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]]
        add(
            f"      every row of every head sums to 1: max |row sum − 1| = "
            f"{np.abs(sums - 1).max():.2e}; largest weight above the diagonal = "
            f"{above.max() if above.size else 0.0:.1e}"
        )
        add(
            f"    token {i} {labels[i]}, head {h}: the output is the weighted sum of the value "
            f"vectors of tokens 0..{i}"
        )
        weights = att[h, i, : i + 1]
        v_TK = lay["v"][0, h, : i + 1]
        for j in np.argsort(-weights, kind="stable"):
            add(f"      {weights[j]:.4f} × v[{j:>2}] {labels[j]:<{w}} {_vec(v_TK[j], n)}")
        mixed = (weights[:, None].astype(np.float64) * v_TK).sum(0)
        got = lay["heads"][0, h, i]
        add(f"      = {_vec(mixed, n)}   (captured head output {_vec(got, n)}, "
            f"max diff {np.abs(mixed - got).max():.1e})")  # fmt: skip
        add(
            f"    the {H} head outputs [{H}, {K}] are concatenated to [{D}] per token and mixed "
            f"by c_proj [{D}, {D}] → attn_out {_shape(lay['attn_out'])}"
        )
        add(f"      token {i}: attn_out = {_vec(lay['attn_out'][0, i], n)}")
        add(
            f"    residual add: x_mid = x_in + attn_out   (token {i}: ‖x_in‖ "
            f"{np.linalg.norm(x_in):.3f}, ‖attn_out‖ {np.linalg.norm(lay['attn_out'][0, i]):.3f}"
            f" → ‖x_mid‖ {np.linalg.norm(lay['x_mid'][0, i]):.3f})"
        )
        hidden = lay["mlp_hidden"][0, i]
        add(
            f"    MLP: ln_2 → c_fc [{D}, {4 * D}] → GELU → mlp_hidden {_shape(lay['mlp_hidden'])}"
            f" (4×) → c_proj [{4 * D}, {D}] → mlp_out {_shape(lay['mlp_out'])}"
        )
        add(f"      token {i}: ln_2       = {_vec(lay['ln_2'][0, i], n)}")
        add(
            f"      token {i}: mlp_hidden = {_vec(hidden, n)}  ({int((hidden > 0).sum())} of "
            f"{hidden.size} units positive, largest {hidden.max():.3f} at unit "
            f"{int(hidden.argmax())})"
        )
        add(f"      token {i}: mlp_out    = {_vec(lay['mlp_out'][0, i], n)}")
        add(
            f"    residual add: x_out = x_mid + mlp_out   (token {i}: ‖x_out‖ "
            f"{np.linalg.norm(lay['x_out'][0, i]):.3f}) → the next block's input"
        )

    # 4. residual stream and logit lens
    add("")
    add(
        f"4. Residual stream and logit lens — at the last token {labels[-1]}: ‖x‖ after each "
        f"stage and the top-{tr.top_k} next tokens read off it through ln_f + wteᵀ"
    )
    name_w = max(len(r.name) for r in tr.lens)
    add(f"    {'stage':<{name_w}}  ‖x‖ last  ‖x‖ mean   top-{tr.top_k} next tokens (probability)")
    for row in tr.lens:
        guesses = ", ".join(f"{piece(t)} {_prob(p)}" for t, p in zip(row.top_ids, row.top_probs))
        add(f"    {row.name:<{name_w}}  {row.norm_last:>8.3f}  {row.norm_mean:>8.3f}   {guesses}")

    # 5. output
    add("")
    add(
        f"5. Output — ln_f {_shape(cap['ln_f'])} → logits = ln_f(x) · wteᵀ "
        f"{_shape(cap['logits'])}; softmax over the {V} tokens at the last position"
    )
    add(f"    last token: ln_f = {_vec(cap['ln_f'][0, -1], n)}")
    add(f"    last token: logits = {_vec(cap['logits'][0, -1], n)}")
    add(f"    top-{tr.top_k} next tokens:")
    pw = max(len(piece(t)) for t in tr.top_ids)
    for t, p in zip(tr.top_ids, tr.top_probs):
        bar = "█" * max(1, round(40 * p / tr.top_probs[0]))
        add(f"      {piece(t):<{pw}} {t:>6}  {_prob(p):>6}  {bar}")
    add(f"    the token each sampling strategy picks (seed {tr.seed}: jax.random.key({tr.seed})):")
    sw = max(len(p.strategy) for p in tr.picks)
    for p in tr.picks:
        add(
            f"      {p.strategy:<{sw}} → {piece(p.token_id)} (id {p.token_id}, probability "
            f"{_prob(p.probability)}; drawn from {p.candidates} candidate"
            f"{'s' if p.candidates != 1 else ''})"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    # Figure objects without pyplot: no global state, and the Agg canvas renders the PNG.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _heatmap(ax, att_TT: np.ndarray, labels: list[str], title: str, *, annotate: bool) -> Any:
    T = att_TT.shape[0]
    masked = np.ma.masked_where(np.triu(np.ones((T, T), bool), 1), att_TT)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e0e0e0")
    image = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    if T <= 40:
        ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(T), labels, fontsize=7)
    ax.set_xlabel("key (attended-to token)", fontsize=8)
    ax.set_ylabel("query token", fontsize=8)
    if annotate and T <= 24:
        for q in range(T):
            for k in range(q + 1):
                ax.text(k, q, f"{att_TT[q, k]:.2f}"[1:] if att_TT[q, k] < 1 else "1",
                        ha="center", va="center", fontsize=5,
                        color="black" if att_TT[q, k] > 0.6 else "white")  # fmt: skip
    return image


def _labels(tr: Trace) -> list[str]:
    return [f"{t} {p}" for t, p in enumerate(tr.pieces)]


def plot_attention_head(tr: Trace, path: str | Path) -> Path:
    """The chosen layer and head's attention matrix, weights written in the cells."""
    att_TT = tr.captured["layers"][tr.layer]["att"][0, tr.head]
    side = 3.0 + 0.32 * tr.T
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    title = f"layer {tr.layer}, head {tr.head}: softmax(QKᵀ/√{tr.config.head_dim}), causal"
    image = _heatmap(ax, att_TT, _labels(tr), title, annotate=True)
    fig.colorbar(image, ax=ax, shrink=0.7, label="attention weight")
    fig.savefig(path, dpi=110)
    return Path(path)


def _grid(tr: Trace, mats: list[np.ndarray], titles: list[str], suptitle: str, path) -> Path:
    cols = min(4, len(mats))
    rows = math.ceil(len(mats) / cols)
    panel = 2.2 + 0.17 * tr.T
    fig = _figure(panel * cols + 1.0, panel * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    labels = _labels(tr) if tr.T <= 24 else [str(t) for t in range(tr.T)]
    image = None
    for ax, mat, title in zip(axes.flat, mats, titles):
        image = _heatmap(ax, mat, labels, title, annotate=False)
    for ax in axes.flat[len(mats) :]:
        ax.set_axis_off()
    fig.suptitle(suptitle)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.savefig(path, dpi=90)
    return Path(path)


def plot_attention_heads(tr: Trace, path: str | Path) -> Path:
    """Every head of the chosen layer, one panel each."""
    att_HTT = tr.captured["layers"][tr.layer]["att"][0]
    titles = [f"head {h}" for h in range(att_HTT.shape[0])]
    return _grid(tr, list(att_HTT), titles, f"layer {tr.layer}: attention of every head", path)


def plot_attention_layers(tr: Trace, path: str | Path) -> Path:
    """The head-averaged attention of every layer, one panel each."""
    mats = [lay["att"][0].mean(0) for lay in tr.captured["layers"]]
    titles = [f"layer {li}" for li in range(len(mats))]
    return _grid(tr, mats, titles, "attention averaged over heads, per layer", path)


def plot_top_k(tr: Trace, path: str | Path) -> Path:
    """Bar chart of the final next-token distribution's top-k."""
    fig = _figure(6.0, 1.0 + 0.4 * tr.top_k)
    ax = fig.add_subplot()
    names = [f"{tr.vocab_pieces[t]} ({t})" for t in tr.top_ids]
    ax.barh(range(tr.top_k), tr.top_probs, color="#4c72b0")
    ax.set_yticks(range(tr.top_k), names)
    ax.invert_yaxis()
    for y, p in enumerate(tr.top_probs):
        ax.text(p, y, f" {p:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, max(tr.top_probs) * 1.25)
    ax.set_xlabel("probability")
    ax.set_title(f"next token after {tr.pieces[-1]}: top {tr.top_k} of {tr.config.vocab_size}")
    fig.savefig(path, dpi=110)
    return Path(path)


# --------------------------------------------------------------------------- HTML and files


def render_html(tr: Trace, report: str, images: dict[str, Path]) -> str:
    """A self-contained page: tokens, the figures (embedded as base64 PNG) and the report."""
    esc = html.escape
    chips = "".join(
        f'<span class="tok" title="id {tid}">{esc(p)}<sub>{tid}</sub></span>'
        for tid, p in zip(tr.token_ids, tr.pieces)
    )
    figures = []
    for caption, path in images.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        figures.append(
            f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jaxgpt trace</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; }}
.tok {{ display: inline-block; background: #eef; border: 1px solid #99c; border-radius: 4px;
        margin: 2px; padding: 2px 5px; font-family: monospace; white-space: pre; }}
.tok sub {{ color: #669; margin-left: 3px; }}
figure {{ display: inline-block; margin: 1em 1em 1em 0; vertical-align: top; }}
img {{ max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }}
</style></head><body>
<h1>The journey of a prompt through GPT-2</h1>
<p>{esc(tr.source)} — prompt <code>{esc(repr(tr.prompt))}</code></p>
<h2>Tokens [1, {tr.T}]</h2><p>{chips}</p>
<h2>Figures</h2>
{"".join(figures)}
<h2>Report</h2>
<pre>{esc(report)}</pre>
</body></html>
"""


def save_trace(tr: Trace, out_dir: str | Path, *, report: str | None = None) -> dict[str, Path]:
    """Write report.txt, the PNG figures and trace.html into `out_dir`; return the paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the output directory {out}: {err}") from err
    report = format_report(tr) if report is None else report
    images = {
        f"layer {tr.layer}, head {tr.head}": plot_attention_head(
            tr, out / f"attention_layer{tr.layer}_head{tr.head}.png"
        ),
        f"layer {tr.layer}, every head": plot_attention_heads(
            tr, out / f"attention_layer{tr.layer}_heads.png"
        ),
        "every layer, averaged over heads": plot_attention_layers(
            tr, out / "attention_layers_mean.png"
        ),
        f"top-{tr.top_k} next tokens": plot_top_k(tr, out / "top_k.png"),
    }
    (out / "report.txt").write_text(report + "\n", encoding="utf-8")
    (out / "trace.html").write_text(render_html(tr, report, images), encoding="utf-8")
    return {"report": out / "report.txt", "html": out / "trace.html", **images}
