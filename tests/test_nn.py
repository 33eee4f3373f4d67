"""The flax.nnx wrapper gives forward's logits and trains with nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt.config import get_preset
from jaxgpt.model import forward
from jaxgpt.nn import GPT
from jaxgpt.params import init_params


def test_nnx_module_matches_forward_and_trains():
    config = get_preset("tiny")
    params = init_params(config, jax.random.key(3))
    model = GPT.from_params(config, params)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 16)), jnp.int32)
    np.testing.assert_array_equal(model(tokens), forward(params, tokens, config))

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, tokens):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, tokens)) for _ in range(3)]
    assert losses[2] < losses[0]
    # The update reached the params that forward sees.
    assert not np.array_equal(model.pure_params()["wte"], params["wte"])
