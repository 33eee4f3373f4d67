"""Mesh, partition rules, sharded training and checkpoints across meshes, on 8 simulated devices.

XLA fixes the CPU device count when JAX starts, so in the ordinary (one-device) test session this
module runs itself once more in a subprocess with `--xla_force_host_platform_device_count=8`;
there, the real tests below are collected.
"""

import os
import subprocess
import sys

import jax
import pytest

if jax.device_count() < 8:

    def test_on_eight_simulated_cpu_devices():
        flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        print(proc.stdout[-3000:])
        assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
        assert " passed" in proc.stdout and "failed" not in proc.stdout

else:
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from jaxgpt import checkpoint, sharding
    from jaxgpt.config import get_preset
    from jaxgpt.errors import ConfigError
    from jaxgpt.experiment import OptimSection, ScheduleSection
    from jaxgpt.model import forward
    from jaxgpt.params import init_params, param_shapes
    from jaxgpt.quantize import decode_layout
    from jaxgpt.train import abstract_train_state, compiled_step, init_train_state

    CONFIG = get_preset("tiny", n_head=4)
    OPTIM = OptimSection(lr=3e-3)
    SCHEDULE = ScheduleSection(max_steps=4, warmup_steps=1)

    @pytest.fixture(scope="module")
    def params():
        return init_params(CONFIG, jax.random.key(0))

    @pytest.fixture(scope="module")
    def batches():
        # One batch, four times: the loss must fall, so the comparison is of a learning run.
        rng = np.random.RandomState(0)
        return [rng.randint(0, CONFIG.vocab_size, (1, 8, 17)).astype(np.int32)] * 4

    def train(params, batches, mesh):
        """Four real train steps on `mesh`: (losses, final state)."""
        optimizer, step_fn, shardings = compiled_step(CONFIG, OPTIM, SCHEDULE, mesh)
        init = jax.jit(init_train_state, static_argnums=1, out_shardings=shardings)
        state = init(params, optimizer)
        losses = []
        with jax.set_mesh(mesh):
            for batch in batches:
                placed = jax.device_put(batch, sharding.batch_sharding(mesh, accum=True))
                state, metrics = step_fn(state, placed, jax.random.key(0))
                losses.append(float(metrics["loss"]))
        return losses, state

    @pytest.fixture(scope="module")
    def one_device_run(params, batches):
        return train(params, batches, sharding.make_mesh(None, devices=jax.devices()[:1]))

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

    def test_rules_shard_params_and_optimizer_state(params, batches):
        mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
        _, state = train(params, batches[:1], mesh)
        block = state.params["blocks"][1]
        assert state.params["wte"].sharding.spec == P(None, "fsdp")
        assert block["attn"]["c_attn"]["kernel"].sharding.spec == P("fsdp", "tensor")
        assert block["attn"]["c_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
        assert block["mlp"]["c_fc"]["kernel"].sharding.spec == P("fsdp", "tensor")
        assert block["mlp"]["c_fc"]["bias"].sharding.spec == P("tensor")
        assert block["ln_1"]["scale"].sharding.spec == P()
        # Each device really holds a 1/(fsdp·tensor) slice of c_fc's kernel ...
        kernel = block["mlp"]["c_fc"]["kernel"]
        assert kernel.addressable_shards[0].data.shape == (32 // 2, 128 // 2)
        # ... and so do Adam's moments of it.
        moments = [
            leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
            if sharding.path_str(path).endswith("blocks/1/mlp/c_fc/kernel")
        ]
        assert len(moments) == 2  # mu and nu
        for m in moments:
            assert m.sharding.spec == P("fsdp", "tensor")

    @pytest.mark.parametrize(
        "spec", ["data=8", "fsdp=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2"]
    )
    def test_sharded_training_matches_one_device(params, batches, one_device_run, spec):
        ref_losses, ref_state = one_device_run
        losses, state = train(params, batches, sharding.make_mesh(spec))
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        assert losses[-1] < losses[0]
        # atol 1e-5: the K bias has an exactly zero true gradient (softmax ignores a constant
        # shift of a query's scores), so Adam turns pure rounding noise into ~1e-6 updates there.
        # A layout bug moves parameters by ~lr = 3e-3.
        for got, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("layout", ["training", "decode"])
    def test_sharded_forward_matches_one_device(params, layout):
        tokens = jnp.asarray(np.random.RandomState(1).randint(0, 512, (8, 16)), jnp.int32)
        ref = jax.jit(forward, static_argnames="config")(params, tokens, CONFIG)
        if layout == "decode":  # kernel_t [out, in]: the rules split the same axes, swapped
            params = decode_layout(params)
        mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
        with jax.set_mesh(mesh):
            placed = jax.device_put(tokens, sharding.batch_sharding(mesh))
            sharded = sharding.shard(params, mesh)
            got = jax.jit(forward, static_argnames="config")(sharded, placed, CONFIG)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        if layout == "decode":
            mlp = sharded["blocks"][1]["mlp"]
            assert mlp["c_fc"]["kernel_t"].sharding.spec == P("tensor", "fsdp")
            assert mlp["c_proj"]["kernel_t"].sharding.spec == P("fsdp", "tensor")

    def test_checkpoint_restores_onto_other_meshes(params, batches, tmp_path):
        mesh_a = sharding.make_mesh("data=4,fsdp=2")
        optimizer, _, _ = compiled_step(CONFIG, OPTIM, SCHEDULE, mesh_a)
        _, state = train(params, batches[:2], mesh_a)
        manager = checkpoint.open_manager(tmp_path)
        checkpoint.save(manager, 2, state, {"seed": 0, "step": 2})
        expected = jax.device_get(state)
        targets = {
            "data=2,fsdp=4": sharding.make_mesh("data=2,fsdp=4"),
            "one device": sharding.make_mesh(None, devices=jax.devices()[:1]),
        }
        for name, mesh in targets.items():
            shardings = sharding.tree_shardings(abstract_train_state(CONFIG, optimizer), mesh)
            abstract = abstract_train_state(CONFIG, optimizer, shardings)
            restored, loader = checkpoint.restore(manager, 2, abstract)
            assert loader["step"] == 2
            wte = restored.params["wte"]
            assert wte.sharding.mesh.size == mesh.size, name
            for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
                np.testing.assert_array_equal(np.asarray(got), want)
        manager.close()

    def test_fsdp_divides_parameter_and_optimizer_bytes():
        shapes = param_shapes(get_preset("gpt2"))
        full = sharding.bytes_per_device(shapes, sharding.make_mesh("data=8"))
        fsdp = sharding.bytes_per_device(shapes, sharding.make_mesh("fsdp=8"))
        assert full == 124_439_808 * 4
        # Everything but LayerNorms and a few replicated biases is split eight ways.
        assert full / 8 <= fsdp < full / 8 * 1.01
