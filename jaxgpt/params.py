"""The parameter pytree: its structure, GPT-2's initialisation, and a per-component count.

`init_params(config, key)` returns plain nested dicts of arrays (a list for the blocks)::

    {
      "wte": [V, D]          token embedding; also the output projection (tied)
      "wpe": [T_max, D]      position embedding
      "blocks": [            one dict per layer, L of them
        {
          "ln_1": {"scale": [D], "bias": [D]},
          "attn": {"c_attn": {"kernel": [D, 3D], "bias": [3D]},   fused Q, K, V (per head)
                   "c_proj": {"kernel": [D, D],  "bias": [D]}},   heads concatenated -> D
          "ln_2": {"scale": [D], "bias": [D]},
          "mlp":  {"c_fc":   {"kernel": [D, 4D], "bias": [4D]},
                   "c_proj": {"kernel": [4D, D], "bias": [D]}},
        }, ...
      ],
      "ln_f": {"scale": [D], "bias": [D]},
    }

Kernels are `[in, out]`, the layout of GPT-2's own Conv1D weights. The columns of `c_attn` are
grouped by head — head h's Q, K, V occupy columns `[h·3K, (h+1)·3K)` — so that each head's weights
are one contiguous slice and a tensor-parallel split of the columns splits whole heads; GPT-2
checkpoints order them Q | K | V instead, and `jaxgpt.pretrained` converts. Head width
K = D / H. Without biases (`use_bias=False`) every "bias" entry is absent.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig
from jaxgpt.errors import InputError

Params = dict[str, Any]

INIT_STD = 0.02


def _linear(key: jax.Array, d_in: int, d_out: int, std: float, use_bias: bool) -> Params:
    layer = {"kernel": jax.nn.initializers.normal(std)(key, (d_in, d_out), jnp.float32)}
    if use_bias:
        layer["bias"] = jnp.zeros((d_out,), jnp.float32)
    return layer


def _layer_norm(d: int, use_bias: bool) -> Params:
    norm = {"scale": jnp.ones((d,), jnp.float32)}
    if use_bias:
        norm["bias"] = jnp.zeros((d,), jnp.float32)
    return norm


# The scalar head each `GPTConfig.head` adds to the GPT-2 params (see `jaxgpt.heads`).
SCALAR_HEADS = {"reward": "score_head", "lm+value": "value_head"}


def init_params(config: GPTConfig, key: jax.Array) -> Params:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm scales.

    A reward model (`config.head == "reward"`) also gets `score_head` and a PPO policy
    (`"lm+value"`) `value_head`: a `[D, 1]` linear layer with a bias, N(0, 0.02).

    The two projections that write into the residual stream (attention and MLP `c_proj`) use
    std 0.02 / sqrt(2 · n_layer), so the stream's variance does not grow with depth.
    """
    D, L = config.n_embd, config.n_layer
    bias = config.use_bias
    resid_std = INIT_STD / math.sqrt(2 * L)
    k_wte, k_wpe, *k_blocks = jax.random.split(key, 2 + L)
    normal = jax.nn.initializers.normal(INIT_STD)
    blocks = []
    for k_block in k_blocks:
        k_attn, k_attn_proj, k_fc, k_mlp_proj = jax.random.split(k_block, 4)
        blocks.append(
            {
                "ln_1": _layer_norm(D, bias),
                "attn": {
                    "c_attn": _linear(k_attn, D, 3 * D, INIT_STD, bias),
                    "c_proj": _linear(k_attn_proj, D, D, resid_std, bias),
                },
                "ln_2": _layer_norm(D, bias),
                "mlp": {
                    "c_fc": _linear(k_fc, D, 4 * D, INIT_STD, bias),
                    "c_proj": _linear(k_mlp_proj, 4 * D, D, resid_std, bias),
                },
            }
        )
    params = {
        "wte": normal(k_wte, (config.vocab_size, D), jnp.float32),
        "wpe": normal(k_wpe, (config.block_size, D), jnp.float32),
        "blocks": blocks,
        "ln_f": _layer_norm(D, bias),
    }
    head = SCALAR_HEADS.get(config.head)
    if head is not None:  # a reward model's score or a PPO policy's value: D → 1
        params[head] = init_scalar_head(jax.random.fold_in(key, 1), D)
    return params


def init_scalar_head(key: jax.Array, d: int) -> Params:
    """A reward or value head: a `[D, 1]` linear layer, N(0, 0.02) weights and a zero bias."""
    return _linear(key, d, 1, INIT_STD, True)


@functools.lru_cache(maxsize=64)
def param_shapes(config: GPTConfig) -> Params:
    """The params pytree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def param_table(config: GPTConfig) -> list[tuple[str, str, int]]:
    """Parameter counts per component: rows of (component, shape, count), then the total.

    The output projection is tied to the token embedding, so it adds nothing.
    """
    shapes = param_shapes(config)
    D, L = config.n_embd, config.n_layer

    def count(tree: Any) -> int:
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))

    def shape_of(tree: Any) -> str:
        """Weight shapes by name, e.g. "c_fc 768x3072, c_proj 3072x768 (+ biases)"."""
        parts, has_bias = [], False
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = [getattr(k, "key", str(k)) for k in path]
            if names and names[-1] == "bias":
                has_bias = True
                continue
            label = names[-2] if len(names) > 1 and names[-1] == "kernel" else ".".join(names)
            parts.append(f"{label} {'x'.join(map(str, leaf.shape))}".strip())
        return ", ".join(parts) + (" (+ biases)" if has_bias else "")

    block = shapes["blocks"][0]
    rows = [
        (
            "token embedding (wte, tied to the output)",
            shape_of(shapes["wte"]),
            count(shapes["wte"]),
        ),
        ("position embedding (wpe)", shape_of(shapes["wpe"]), count(shapes["wpe"])),
        (f"attention (c_attn + c_proj) x {L}", shape_of(block["attn"]), L * count(block["attn"])),
        (f"MLP (c_fc + c_proj) x {L}", shape_of(block["mlp"]), L * count(block["mlp"])),
        (
            f"layer norms (2 x {L} + final)",
            shape_of(block["ln_1"]),
            L * (count(block["ln_1"]) + count(block["ln_2"])) + count(shapes["ln_f"]),
        ),
    ]
    head = SCALAR_HEADS.get(config.head)
    if head is not None:
        rows.append((f"{head} (scalar)", shape_of(shapes[head]), count(shapes[head])))
    total = count(shapes)
    assert total == sum(r[2] for r in rows), "param_table misses a component"
    rows.append(("total", f"D={D}, L={L}, H={config.n_head}", total))
    return rows


def count_params(config: GPTConfig, *, non_embedding: bool = False) -> int:
    """Number of parameters; `non_embedding=True` leaves out wte and wpe (as in scaling laws)."""
    total = param_table(config)[-1][2]
    if non_embedding:
        total -= (config.vocab_size + config.block_size) * config.n_embd
    return total


def _is_int8(x: Any) -> bool:
    from jaxgpt.quantize import Int8Weight

    return isinstance(x, Int8Weight)


def _as_kernel(path: tuple, leaf: Any) -> tuple[tuple, Any]:
    """A `kernel_t [out, in]` leaf (`jaxgpt.quantize.decode_layout`) seen as the `kernel [in,
    out]` it stands for, so one table of shapes checks both layouts."""
    if path and getattr(path[-1], "key", None) == "kernel_t":
        return (*path[:-1], jax.tree_util.DictKey("kernel")), jax.ShapeDtypeStruct(
            tuple(reversed(leaf.shape)), leaf.dtype
        )
    return path, leaf


def check_params(params: Params, config: GPTConfig) -> None:
    """Raise a clear error if `params` does not have the structure and shapes `config` implies."""
    expected = param_shapes(config)
    exp_paths = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    try:
        # An int8 weight (`jaxgpt.quantize.Int8Weight`) stands where its float32 matrix would.
        flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_int8)[0]
    except Exception as err:  # a non-pytree argument
        raise InputError(f"params must be the pytree from init_params/load_hf: {err}") from err
    got_paths = dict(_as_kernel(path, leaf) for path, leaf in flat)
    missing = [jax.tree_util.keystr(p) for p in exp_paths if p not in got_paths]
    extra = [jax.tree_util.keystr(p) for p in got_paths if p not in exp_paths]
    if missing or extra:
        raise InputError(
            "params do not match the config "
            f"(n_layer={config.n_layer}, use_bias={config.use_bias}): "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for path, want in exp_paths.items():
        got = got_paths[path]
        if tuple(got.shape) != tuple(want.shape):
            raise InputError(
                f"params{jax.tree_util.keystr(path)} has shape {tuple(got.shape)}, "
                f"but the config implies {tuple(want.shape)}"
            )


def grow_vocab(
    config: GPTConfig, params: Params, vocab_size: int, key: jax.Array, *, noise: float = 0.1
) -> tuple[GPTConfig, Params]:
    """Grow the token embedding to `vocab_size` rows for new ids (e.g. the chat tokens).

    Existing rows are kept exactly. Each new row is the mean of the existing rows plus Gaussian
    noise of `noise` times their per-dimension standard deviation. Why the mean: the embedding
    is also the output layer (tied), so a new token's logit is `h · row`; at the mean, that is
    the average logit over the vocabulary, so the pretrained model's predictions barely change
    (a random N(0, 0.02) row can score far above or below real tokens, and a zero row scores 0,
    which is far above GPT-2's typical logits). The small noise makes the new tokens differ from
    each other, so they can learn different roles. Returns the config with the new `vocab_size`
    and the params with the grown `wte`; everything else is shared, not copied.
    """
    check_params(params, config)
    old = config.vocab_size
    if vocab_size < old:
        raise InputError(f"grow_vocab: vocab_size {vocab_size} is smaller than the model's {old}")
    wte_VD = jnp.asarray(params["wte"], jnp.float32)
    mean_D, std_D = wte_VD.mean(axis=0), wte_VD.std(axis=0)
    z_ND = jax.random.normal(key, (vocab_size - old, wte_VD.shape[1]), jnp.float32)
    new_ND = mean_D + noise * std_D * z_ND
    grown = {**params, "wte": jnp.concatenate([wte_VD, new_ND]).astype(params["wte"].dtype)}
    return config.replace(vocab_size=vocab_size), grown
