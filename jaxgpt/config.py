"""Model configuration: one frozen dataclass and the named presets.

Field names follow GPT-2's own `config.json` (n_layer, n_head, n_embd ...) so that a reader can hold
a Hugging Face config and a `GPTConfig` side by side.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import jax.numpy as jnp

from jaxgpt.errors import ConfigError

ATTENTION_BACKENDS = ("xla", "cudnn", "pallas", "auto")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
HEADS = ("lm", "reward", "lm+value")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape and behaviour of a GPT-2 model.

    Attributes:
      vocab_size: number of token ids (V). GPT-2's BPE has 50257.
      block_size: longest sequence the position embedding covers (T_max).
      n_layer: number of transformer blocks (L).
      n_head: attention heads per block (H).
      n_embd: width of the residual stream (D); must be divisible by n_head.
      embd_dropout: dropout rate on token + position embeddings (training only).
      attn_dropout: dropout rate on the attention probabilities (training only).
      resid_dropout: dropout rate on each block's attention and MLP outputs (training only).
      layer_norm_epsilon: epsilon inside every LayerNorm.
      use_bias: whether linear layers and LayerNorms carry a bias (GPT-2: True).
      dtype: compute dtype of matmuls ("float32" or "bfloat16"); parameters stay float32,
        softmax and LayerNorm statistics always run in float32.
      attention: attention backend, one of ATTENTION_BACKENDS.
      head: what the model outputs, one of HEADS: "lm" (next-token logits through the tied
        embedding: a policy), "reward" (a scalar score per position from `score_head`: a reward
        model), "lm+value" (logits and a scalar value per position from `value_head`: a PPO
        policy with its critic). See `jaxgpt.heads`.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    embd_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = True
    dtype: str = "float32"
    attention: str = "xla"
    head: str = "lm"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"each head gets n_embd / n_head dimensions"
            )
        for name in ("embd_dropout", "attn_dropout", "resid_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"GPTConfig.{name} must be a rate in [0, 1), got {value!r}")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or self.layer_norm_epsilon <= 0:
            raise ConfigError(
                f"GPTConfig.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}"
            )
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"GPTConfig.dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}"
            )
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"GPTConfig.attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}"
            )
        if self.head not in HEADS:
            raise ConfigError(f"GPTConfig.head must be one of {HEADS}, got {self.head!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head (K = D / H)."""
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> GPTConfig:
        """A copy with some fields changed (validated again); unknown fields are an error."""
        names = [f.name for f in dataclasses.fields(self)]
        for key in changes:
            if key not in names:
                hint = difflib.get_close_matches(key, names, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(f"GPTConfig has no field {key!r}{suggestion}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from `to_dict()` output; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown GPTConfig fields {unknown}; expected a subset of {sorted(names)}"
            )
        return cls(**d)


# The four released GPT-2 sizes, plus small shapes for tests and CPU experiments.
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # Tiny shapes: fast to compile on a 2-core CPU.
    "tiny": GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32),
    "mini": GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=128),
    "small-char": GPTConfig(vocab_size=128, block_size=256, n_layer=6, n_head=6, n_embd=192),
}


def get_preset(name: str, **overrides: Any) -> GPTConfig:
    """The preset called `name`, optionally with fields replaced."""
    if name not in PRESETS:
        hint = difflib.get_close_matches(name, PRESETS, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(
            f"unknown preset {name!r}{suggestion}; known presets: {', '.join(PRESETS)}"
        )
    config = PRESETS[name]
    return config.replace(**overrides) if overrides else config
