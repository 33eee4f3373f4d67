"""A thin `flax.nnx` face for users whose code is Flax: `GPT` holds the same params pytree as
`nnx.Param`s and calls the same pure `jaxgpt.forward` — no second model implementation."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jaxgpt.config import GPTConfig
from jaxgpt.model import forward
from jaxgpt.params import Params, check_params, init_params


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


class GPT(nnx.Module):
    """GPT-2 as an `nnx.Module`.

    Example::

        model = GPT(get_preset("gpt2"), rngs=nnx.Rngs(0))     # or GPT.from_params(config, params)
        logits_BTV = model(tokens_BT)
        optimizer = nnx.Optimizer(model, optax.adamw(3e-4), wrt=nnx.Param)
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, params: Params | None = None):
        self.config = config
        if params is None:
            params = init_params(config, rngs.params())
        check_params(params, config)
        self.params = nnx.data(jax.tree.map(nnx.Param, params))
        self.rngs = rngs

    @classmethod
    def from_params(cls, config: GPTConfig, params: Params, seed: int = 0) -> GPT:
        """Wrap an existing params pytree (from `init_params`, `load_hf` or a checkpoint)."""
        return cls(config, rngs=nnx.Rngs(seed), params=params)

    def pure_params(self) -> Params:
        """The plain params pytree that `jaxgpt.forward` takes."""
        return jax.tree.map(lambda p: p[...], self.params, is_leaf=_is_variable)

    def __call__(self, tokens_BT: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits `[B, T, V]`; with `train=True`, dropout draws from this module's `rngs`."""
        key = self.rngs.dropout() if train else None
        return forward(self.pure_params(), tokens_BT, self.config, train=train, key=key)
