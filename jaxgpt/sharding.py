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

import dataclasses
import importlib.util
import math
import os
import pkgutil
import re
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.config import GPTConfig
from jaxgpt.errors import ConfigError, JaxgptError

T = TypeVar("T")

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
    # The decode layout (`jaxgpt.quantize.decode_layout`): the same splits, axes swapped.
    (r"attn/c_attn/kernel_t$", P("tensor", "fsdp")),
    (r"attn/c_proj/kernel_t$", P("fsdp", "tensor")),
    (r"mlp/c_fc/kernel_t$", P("tensor", "fsdp")),
    (r"mlp/c_proj/kernel_t$", P("fsdp", "tensor")),
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

# Environment variables through which cluster launchers announce a multi-process job; JAX's own
# cluster detection reads the coordinator, process count and id from them.
_CLUSTER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
INIT_TIMEOUT_S = 300  # how long processes wait for each other to join (JAX's default)
# A process that stops sending heartbeats (killed, machine lost) is declared dead after this long.
HEARTBEAT_TIMEOUT_S = 30


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins a multi-process job. None fields are left to JAX's cluster
    detection (SLURM, Open MPI, TPU pod)."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None


def _int_setting(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def _cluster_detected(env: Mapping[str, str]) -> bool:
    sizes = [env.get(name, "") for name in _CLUSTER_SIZE_ENV]
    many = any(size.isdigit() and int(size) > 1 for size in sizes)
    return many or "," in env.get("TPU_WORKER_HOSTNAMES", "")


def distributed_settings(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> DistributedSettings | None:
    """The multi-process job this process belongs to, or None for a single-process run.

    Explicit values (the `jaxgpt train --coordinator/--num-processes/--process-id` flags) win over
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; without any of them, a SLURM
    job with several tasks, an Open MPI job or a TPU pod slice is detected as before.
    Inconsistent settings are a ConfigError naming the variable.
    """
    env = os.environ if env is None else env
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _int_setting(env.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _int_setting(env.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID")
    cluster = _cluster_detected(env)
    if coordinator is None and num_processes is None and process_id is None:
        return DistributedSettings(None, None, None) if cluster else None
    if coordinator is None and not cluster:
        given = "JAX_NUM_PROCESSES" if num_processes is not None else "JAX_PROCESS_ID"
        raise ConfigError(
            f"{given} is set but JAX_COORDINATOR_ADDRESS is not: set it (or --coordinator) to "
            f"HOST:PORT of process 0, the same on every process"
        )
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(
                f"coordinator address {coordinator!r}: expected HOST:PORT, e.g. 10.0.0.1:1234"
            )
    if not cluster and (num_processes is None or process_id is None):
        missing = "JAX_NUM_PROCESSES" if num_processes is None else "JAX_PROCESS_ID"
        raise ConfigError(
            f"JAX_COORDINATOR_ADDRESS={coordinator} is set but {missing} is not (and no SLURM, "
            f"Open MPI or TPU pod job was detected): set {missing} (or --num-processes / "
            f"--process-id) on every process"
        )
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"the number of processes must be at least 1, got {num_processes}")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise ConfigError(
            f"process id {process_id} is out of range: expected 0 .. {num_processes - 1} "
            f"for {num_processes} processes"
        )
    return DistributedSettings(coordinator, num_processes, process_id)


def _cpu_platform(env: Mapping[str, str]) -> bool:
    """Whether JAX computes on the CPU: JAX_PLATFORMS says so, or no accelerator is installed."""
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    try:
        import jax_plugins  # namespace package of the CUDA / ROCm plugins
    except ImportError:
        plugins = []
    else:
        plugins = [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    return not plugins and importlib.util.find_spec("libtpu") is None


def maybe_initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int | None = None,
) -> bool:
    """Join a multi-process job with `jax.distributed.initialize` when one is described.

    Must run before anything touches a device. The settings come from `distributed_settings`
    (flags, JAX_* variables, or SLURM / Open MPI / TPU detection). On the CPU platform the
    cross-process collectives go through gloo. A coordinator that cannot be reached, or processes
    that do not all join within `timeout_s` seconds (default `INIT_TIMEOUT_S`), are a ConfigError
    naming the address.
    Returns True if it initialised.
    """
    settings = distributed_settings(coordinator, num_processes, process_id)
    if settings is None:
        return False
    timeout_s = INIT_TIMEOUT_S if timeout_s is None else timeout_s
    if timeout_s < 1:
        raise ConfigError(f"the initialisation timeout must be at least 1 s, got {timeout_s}")
    if _cpu_platform(os.environ):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service takes over SIGTERM (a process would ignore it); jaxgpt's training
    # loop handles SIGTERM itself: every process checkpoints at the same step and exits.
    jax.config.update("jax_enable_preemption_service", False)
    address = settings.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or "(detected)"
    who = "" if settings.process_id is None else f" as process {settings.process_id}"
    problem = (
        f"could not join the {settings.num_processes or 'detected'}-process job at coordinator "
        f"{address} within {timeout_s} s{who}: check that process 0 runs there and that every "
        f"process has the same address and process count (--init-timeout waits longer)"
    )
    # When JAX's own connection deadline passes it aborts the process with a fatal log and a C++
    # stack; this timer, due a little earlier, says what went wrong in one line and exits first.
    watchdog = threading.Timer(timeout_s, exit_with, args=(f"jaxgpt train: error: {problem}",))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            settings.coordinator, settings.num_processes, settings.process_id,
            initialization_timeout=timeout_s + 10, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        )  # fmt: skip
    except (RuntimeError, ValueError) as err:  # JAX's runtime errors are RuntimeErrors
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{problem} ({first})") from err
    finally:
        watchdog.cancel()
    return True


def exit_with(message: str, code: int = 2) -> NoReturn:
    """Print `message` and end the process now (from any thread; no clean-up, no barriers)."""
    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def abandon_job(err: Exception) -> NoReturn:
    """Leave a multi-process job after `err` (typically a collective whose peer died): one line
    on stderr and exit code 1 at once, without the shutdown barrier, which would wait for the
    lost process until the heartbeat timeout and then abort with a fatal log."""
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    exit_with(
        f"jaxgpt train: error: process {jax.process_index()} of {jax.process_count()} stopped: "
        f"{first}. If another process of the job died, this one cannot go on; the run keeps its "
        f"last checkpoint: start every process again to resume",
        code=1,
    )


def is_main_process() -> bool:
    """Only process 0 writes logs, plots and progress bars."""
    return jax.process_index() == 0


def settled(x: T) -> T:
    """`x` once computed, when the run uses several CPU devices; `x` at once anywhere else.

    On CPUs, programs with collectives that are dispatched ahead of each other can deadlock: one
    program's devices wait in a collective for devices still busy with another. Seen here with a
    40-step shakespeare_char run on mesh data=2,fsdp=2 at its first evaluation: in one process on
    4 simulated devices XLA aborted after its 40 s rendezvous timeout; in 2 processes (gloo) both
    hung for good. Waiting for each program keeps them in order.
    """
    if jax.device_count() > 1 and jax.devices()[0].platform == "cpu":
        jax.block_until_ready(x)
    return x


def main_first(fn: Callable[[], T], *, others: bool = True) -> T | None:
    """`fn()` on process 0 while the other processes wait at a barrier; then on them if `others`.

    For work on a shared filesystem that must not run in several processes at once (preparing the
    data, probing the run directory): the others' `fn()` then finds it done. If `fn` raises a
    JaxgptError on process 0, every process stops: process 0 with its error, the others with a
    ConfigError pointing at it. Returns `fn()`'s result (None where it did not run).
    """
    if jax.process_count() == 1:
        return fn()
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except JaxgptError as err:
            error = err
    if any_process(error is not None):  # the barrier: every process waits for process 0 here
        if error is not None:
            raise error
        raise ConfigError("process 0 stopped with an error (see its message); stopping too")
    if others and not is_main_process():
        result = fn()
    return result


def gather_to_host(tree: Any) -> Any:
    """`tree` as whole arrays in this process (a collective in a multi-process run: every process
    must call it); the arrays themselves in a single-process run."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true in any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))
