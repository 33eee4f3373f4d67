"""Scale-out on JAX's own SPMD machinery: a named device mesh and the partition rules.

The mesh has three named axes:

* ``data``   — data parallelism: the batch is split, parameters are replicated.
* ``fsdp``   — fully sharded data parallelism: the batch is split *and* every weight matrix and its
  optimiser state are sharded over this axis (XLA all-gathers a weight when a matmul needs it).
* ``tensor`` — Megatron-style tensor parallelism: attention heads and the MLP hidden dimension are
  split; `c_attn` / `c_fc` are column-parallel, the two `c_proj` are row-parallel.

Every parameter's `PartitionSpec` comes from `PARTITION_RULES` below — the one place that says how
the model is laid out. The same rules shard optimiser state (Adam's moments have the parameters'
paths and shapes), so FSDP divides parameter *and* optimiser bytes by the fsdp size.

The mesh uses `AxisType.Auto` on purpose: jaxgpt's model is written as plain, mesh-free functions;
with Auto axes XLA's sharding propagation (GSPMD) places the activations from the parameter and
batch shardings plus a few `constrain` hints, so the forward pass stays readable. Explicit axes
(the default of `jax.make_mesh` since 0.7) would require an `out_sharding` on every contraction
in the model code.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.config import GPTConfig
from jaxgpt.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over both data-like axes.
BATCH_AXES = ("data", "fsdp")

# (regex matched against the end of a leaf's path, spec). First match wins; no match: replicated.
# Paths look like "blocks/3/attn/c_attn/kernel" (optimiser state prefixes its own keys).
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"(^|/)wte$", P(None, "fsdp")),  # [V, D]: V (50257) rarely divides; shard D
    (r"(^|/)wpe$", P(None, "fsdp")),  # [T, D]
    (r"attn/c_attn/kernel$", P("fsdp", "tensor")),  # [D, 3D] column-parallel (head-grouped)
    (r"attn/c_attn/bias$", P("tensor")),
    (r"attn/c_proj/kernel$", P("tensor", "fsdp")),  # [D, D] row-parallel over heads
    (r"mlp/c_fc/kernel$", P("fsdp", "tensor")),  # [D, 4D] column-parallel
    (r"mlp/c_fc/bias$", P("tensor")),
    (r"mlp/c_proj/kernel$", P("tensor", "fsdp")),  # [4D, D] row-parallel
)


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path as "a/b/0/c" (dict keys, sequence indices and attribute names)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def spec_for(path: str, ndim: int) -> P:
    """The PartitionSpec the rules give a leaf at `path` with `ndim` dimensions."""
    for pattern, spec in PARTITION_RULES:
        if re.search(pattern, path) and len(spec) == ndim:
            return spec
    return P()


def tree_specs(tree: Any) -> Any:
    """PartitionSpecs for every leaf of a pytree (params, optimiser state, a whole train state)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: spec_for(path_str(path), np.ndim(leaf)), tree
    )


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of `tree` on `mesh`."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), tree_specs(tree), is_leaf=lambda x: isinstance(x, P)
    )


def batch_sharding(mesh: Mesh, *, accum: bool = False) -> NamedSharding:
    """Token batches `[B, T]` (or `[A, B, T]` micro-batches): rows split over data × fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None) if accum else P(BATCH_AXES, None))


def host_rows(batch_size: int) -> tuple[int, int] | None:
    """This process's contiguous rows of a global batch (None in a single-process run)."""
    n, i = jax.process_count(), jax.process_index()
    if n == 1:
        return None
    if batch_size % n:
        raise ConfigError(f"the batch size {batch_size} is not divisible by the {n} processes")
    share = batch_size // n
    return i * share, (i + 1) * share


def put_batch(
    local: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]
) -> jax.Array:
    """A global batch array from this process's rows (`host_rows`) of it."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


# --------------------------------------------------------------------------- the mesh


def parse_mesh(spec: str | dict[str, int] | None) -> dict[str, int]:
    """ "data=2,fsdp=4" (or a dict) → sizes per axis; unnamed axes get 1, a size may be -1."""
    if spec is None or spec == "":
        return {"data": -1, "fsdp": 1, "tensor": 1}
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in AXES:
                raise ConfigError(
                    f"mesh spec {spec!r}: expected comma-separated AXIS=SIZE with AXIS in {AXES}, "
                    f"e.g. 'data=2,fsdp=4'"
                )
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ConfigError(
                    f"mesh spec {spec!r}: size of {name!r} must be an integer"
                ) from None
    else:
        unknown = set(spec) - set(AXES)
        if unknown:
            raise ConfigError(f"unknown mesh axes {sorted(unknown)}; expected some of {AXES}")
        sizes = dict(spec)
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh axis {name!r} has size {size}; expected a positive size or -1")
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"mesh {sizes}: at most one axis may be -1 ('the rest')")
    return {name: sizes.get(name, 1) for name in AXES}


def resolve_mesh_shape(sizes: dict[str, int], n_devices: int) -> dict[str, int]:
    """Fill in a -1 axis and check that the sizes multiply to the device count."""
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if n_devices % known:
            raise ConfigError(
                f"mesh {sizes}: the fixed axes multiply to {known}, which does not divide the "
                f"{n_devices} devices"
            )
        sizes = {k: (n_devices // known if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(
            f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = "
            f"{math.prod(sizes.values())} devices, but {n_devices} are available; make the "
            f"product equal the device count (one axis may be -1)"
        )
    return sizes


def make_mesh(
    spec: str | dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(parse_mesh(spec), len(devices))
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def check_parallelism(config: GPTConfig, mesh: Mesh, batch_size: int | None = None) -> None:
    """Clear errors, before any compilation, for sizes the mesh cannot split evenly."""
    data, fsdp, tensor = (mesh.shape[a] for a in AXES)
    problems = []
    if config.n_head % tensor:
        problems.append(f"n_head={config.n_head} is not divisible by the tensor size {tensor}")
    if (4 * config.n_embd) % tensor:
        problems.append(f"the MLP width {4 * config.n_embd} is not divisible by tensor={tensor}")
    if config.n_embd % fsdp:
        problems.append(f"n_embd={config.n_embd} is not divisible by the fsdp size {fsdp}")
    if batch_size is not None and batch_size % (data * fsdp):
        problems.append(
            f"the batch size {batch_size} is not divisible by data x fsdp = {data * fsdp} "
            f"(data={data}, fsdp={fsdp})"
        )
    if problems:
        raise ConfigError("cannot lay the model out on this mesh: " + "; ".join(problems))


def shard(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree (params, optimiser or train state) on `mesh` by the partition rules."""
    return jax.device_put(tree, tree_shardings(tree, mesh))


def constrain(x: jax.Array, spec: P) -> jax.Array:
    """A sharding hint for an activation; a no-op outside `jax.set_mesh(mesh)`.

    Lets the mesh-free model code tell XLA, e.g., that the residual stream stays split by batch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, spec)


# --------------------------------------------------------------------------- memory


def bytes_per_device(tree: Any, mesh: Mesh) -> int:
    """Bytes of `tree` (arrays or ShapeDtypeStructs) held by one device under the rules."""
    total = 0
    specs = tree_specs(tree)
    for leaf, spec in zip(
        jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    ):
        shape = list(np.shape(leaf))
        for dim, axes in enumerate(spec):
            if axes is None:
                continue
            for axis in (axes,) if isinstance(axes, str) else axes:
                shape[dim] = -(-shape[dim] // mesh.shape[axis])  # ceil: padding of an uneven split
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


# --------------------------------------------------------------------------- multi-host

# Environment variables through which launchers announce a multi-process job.
_CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
)


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` when the environment describes a multi-process job.

    JAX reads the coordinator address, process count and id from the environment (explicit
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or SLURM, Open MPI, or a TPU pod
    slice). Returns True if it initialised.
    """
    multi = os.environ.get("JAX_COORDINATOR_ADDRESS") or any(
        int(os.environ.get(name, "1") or 1) > 1 for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
    )
    multi = multi or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not multi:
        return False
    jax.distributed.initialize()
    return True


def is_main_process() -> bool:
    """Only process 0 writes logs, plots and progress bars."""
    return jax.process_index() == 0
