"""Mesh construction, partition rules and sharded forward/backward on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxgpt import sharding
from jaxgpt.config import get_preset
from jaxgpt.errors import ConfigError
from jaxgpt.model import forward
from jaxgpt.params import init_params, param_shapes

CONFIG = get_preset("tiny", n_head=4)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.RandomState(0)
    return jnp.asarray(rng.randint(0, CONFIG.vocab_size, (8, 16)), jnp.int32)


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    "spec,shape",
    [
        (None, {"data": 8, "fsdp": 1, "tensor": 1}),
        ("fsdp=8", {"data": 1, "fsdp": 8, "tensor": 1}),
        ("data=2,fsdp=-1", {"data": 2, "fsdp": 4, "tensor": 1}),
        ("data=2,fsdp=2,tensor=2", {"data": 2, "fsdp": 2, "tensor": 2}),
    ],
)
def test_make_mesh(spec, shape):
    mesh = sharding.make_mesh(spec)
    assert dict(mesh.shape) == shape
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("data=3", "3 devices, but 8 are available"),
        ("data=3,fsdp=-1", "does not divide the 8 devices"),
        ("pipeline=2", "AXIS=SIZE"),
        ("data=two", "must be an integer"),
        ("data=-1,fsdp=-1", "at most one axis"),
        ("data=0", "positive size"),
    ],
)
def test_bad_mesh_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        sharding.make_mesh(spec)


def test_check_parallelism_names_the_sizes():
    mesh = sharding.make_mesh("data=1,fsdp=1,tensor=8")
    with pytest.raises(ConfigError, match="n_head=4 is not divisible by the tensor size 8"):
        sharding.check_parallelism(CONFIG, mesh)
    mesh = sharding.make_mesh("data=4,fsdp=2")
    with pytest.raises(ConfigError, match="batch size 12 is not divisible by data x fsdp = 8"):
        sharding.check_parallelism(CONFIG, mesh, batch_size=12)
    sharding.check_parallelism(CONFIG, mesh, batch_size=16)


def test_rules_shard_the_arrays(params):
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    placed = sharding.shard(params, mesh)
    block = placed["blocks"][1]
    assert placed["wte"].sharding.spec == P(None, "fsdp")
    assert block["attn"]["c_attn"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert block["attn"]["c_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert block["mlp"]["c_fc"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert block["mlp"]["c_fc"]["bias"].sharding.spec == P("tensor")
    assert block["ln_1"]["scale"].sharding.spec == P()
    # Each device really holds a 1/(fsdp·tensor) slice of c_fc's kernel.
    kernel = block["mlp"]["c_fc"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (32 // 2, 128 // 2)


@pytest.mark.parametrize("spec", ["data=8", "fsdp=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2"])
def test_sharded_forward_and_grad_match_one_device(params, tokens, spec):
    def loss(p, t):
        logits = forward(p, t, CONFIG)
        return jax.nn.log_softmax(logits)[..., 0].mean()

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    ref_loss, ref_grads = value_and_grad(params, tokens)
    mesh = sharding.make_mesh(spec)
    with jax.set_mesh(mesh):
        got_loss, got_grads = value_and_grad(
            sharding.shard(params, mesh), jax.device_put(tokens, sharding.batch_sharding(mesh))
        )
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    for got, ref in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_fsdp_divides_parameter_bytes():
    shapes = param_shapes(get_preset("gpt2"))
    full = sharding.bytes_per_device(shapes, sharding.make_mesh("data=8"))
    fsdp = sharding.bytes_per_device(shapes, sharding.make_mesh("fsdp=8"))
    assert full == 124_439_808 * 4
    # Everything but LayerNorms and the few replicated biases is split eight ways.
    assert full / 8 <= fsdp < full / 8 * 1.01
