"""Run directories and their orbax checkpoints.

A run directory holds::

    experiment.json     the Experiment the run was started with (resume checks it matches)
    model.json          the GPTConfig (vocab size included), for loading without the data
    tokenizer.json      {"type": "char", "chars": ...} or {"type": "gpt2"}
    metrics.jsonl       one JSON object per logged step / evaluation
    loss.png            the loss curve, written at the end (or by `jaxgpt plot`)
    checkpoints/<step>/ orbax checkpoints: the train state (step, params, optimiser state) and
                        the data loader's state; the last `keep` and the best-val are kept
    old-<UTC time>/     what `--fresh` or a NaN loss set aside (nothing is ever deleted), with
                        copies of the run files, so it loads as a run directory itself

Orbax writes each checkpoint into a temporary directory and renames it only when complete, so a
process killed while saving leaves the previous checkpoint as the latest good one. The training
process is the only writer (`open_manager`); readers use `open_reader`, which creates, cleans and
deletes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxgpt import atomic
from jaxgpt.config import GPTConfig
from jaxgpt.errors import CheckpointFormatError, InputError, JaxgptError
from jaxgpt.params import param_shapes
from jaxgpt.tokenizer import Tokenizer, tokenizer_from_json, tokenizer_to_json

EXPERIMENT_FILE = "experiment.json"
MODEL_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
PLOT_FILE = "loss.png"
RUN_FILES = [EXPERIMENT_FILE, MODEL_FILE, TOKENIZER_FILE]


def _item_handlers() -> dict[str, Any]:
    # Registered up front so that a checkpoint's metadata can be read before restoring it.
    return {"state": ocp.StandardCheckpointHandler(), "loader": ocp.JsonCheckpointHandler()}


def open_manager(run_dir: str | Path, keep: int = 2) -> ocp.CheckpointManager:
    """The training process's CheckpointManager (the run's one writer): keeps the latest `keep`
    checkpoints plus the best val loss, and removes what a killed save of its own left behind."""
    policy = pp.AnyPreservationPolicy(
        [
            pp.LatestN(n=keep),
            pp.BestN(
                get_metric_fn=lambda m: -m["val_loss"], n=1, keep_checkpoints_without_metrics=False
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=False,  # a save returns only once it is on disk
        create=True,
        cleanup_tmp_directories=True,  # remove what a killed save left behind
    )
    directory = Path(run_dir).resolve() / CHECKPOINT_DIR
    return ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())


def open_reader(run_dir: str | Path, *, partial: bool = False) -> ocp.CheckpointManager:
    """A read-only CheckpointManager for inference: it creates, cleans and deletes nothing, so a
    training process may be writing a checkpoint into the same run at the same moment.

    `partial` reads the state with orbax's PyTree handler, which can restore a part of it
    (`restore_params`); the files are the same either way.
    """
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, cleanup_tmp_directories=False, save_interval_steps=0
    )
    directory = Path(run_dir).resolve() / CHECKPOINT_DIR
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax warns that the directory is read-only: as intended
    try:
        handlers = _item_handlers()
        if partial:
            handlers["state"] = ocp.PyTreeCheckpointHandler()
        return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    finally:
        absl.setLevel(level)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    loader_state: dict[str, Any],
    metrics: dict[str, float] | None = None,
) -> None:
    """Write checkpoint `step` (state pytree + loader JSON) and wait until it is complete."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(loader_state)
        ),
        metrics=metrics,
        force=True,
    )
    manager.wait_until_finished()


def latest_step(run_dir: str | Path) -> int | None:
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps) if steps else None


class CheckpointCorruptError(CheckpointFormatError):
    """A checkpoint's files are missing, cut short or unreadable."""


class CheckpointMismatchError(CheckpointFormatError):
    """A readable checkpoint holds a train state of another structure or shape than expected."""


class RestoreError(JaxgptError):
    """A sound checkpoint could not be restored here (memory, devices, sharding)."""


def _key_names(path: tuple) -> str:
    names = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return ".".join(names)


def check_matches(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, *, only: str | None = None
) -> None:
    """Raise CheckpointMismatchError if checkpoint `step` holds other arrays than
    `abstract_state` (another model, optimiser or jaxgpt version), CheckpointCorruptError if its
    metadata cannot be read. `only` compares just the stored arrays under that top-level name
    (e.g. "params", when `abstract_state` is `{"params": ...}`)."""
    where = Path(manager.directory) / str(step)
    try:
        stored = manager.item_metadata(step)["state"]
        stored = {
            _key_names(p): (tuple(m.shape), str(m.dtype))
            for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]
        }
        if only is not None:
            stored = {k: v for k, v in stored.items() if k.split(".")[0] == only}
    except Exception as err:  # any failure to read the metadata: unreadable files
        raise CheckpointCorruptError(
            f"checkpoint {where} is corrupt: its metadata cannot be read ({_first_line(err)}); "
            f"move it aside to resume from an earlier checkpoint, or start over with --fresh"
        ) from err
    wanted = {
        _key_names(p): (tuple(a.shape), str(a.dtype))
        for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    }
    missing, extra = sorted(wanted.keys() - stored.keys()), sorted(stored.keys() - wanted.keys())
    differ = [k for k in sorted(wanted.keys() & stored.keys()) if wanted[k] != stored[k]]
    if missing or extra or differ:
        if differ:
            k = differ[0]
            (have, have_dtype), (want, want_dtype) = stored[k], wanted[k]
            what = f"{k} is {have} {have_dtype}, this run expects {want} {want_dtype}"
        else:
            what = f"arrays missing: {missing[:3]}, unexpected: {extra[:3]}"
        raise CheckpointMismatchError(
            f"checkpoint {where} holds a different model or optimiser state ({what}); it is "
            f"intact: load it with the settings it was written with, or use another --out"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# Words in the errors that tensorstore / orbax raise when a file is absent, short or garbled.
_DAMAGE = ("error while reading", "data_loss", "not_found", "out_of_range", "no such file",
           "checksum", "corrupt", "truncated", "unexpected end", "failed to decode")  # fmt: skip
_MEMORY = ("resource_exhausted", "out of memory", "cannot allocate")
_DEVICES = ("sharding", "device", "mesh")


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> tuple[Any, dict[str, Any]]:
    """(state, loader_state) of checkpoint `step`.

    A failure is told apart: CheckpointMismatchError (another model), CheckpointCorruptError
    (files missing or cut short), RestoreError (out of memory, or a device / sharding problem
    with a sound checkpoint).
    """
    check_matches(manager, step, abstract_state)
    where = Path(manager.directory) / str(step)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), loader=ocp.args.JsonRestore()
            ),
        )
    except Exception as err:  # classified below; the original is chained
        raise _restore_error(err, where) from err
    return restored["state"], dict(restored["loader"])


def restore_params(run_dir: str | Path, step: int, abstract_params: Any) -> Any:
    """Only the params of checkpoint `step` of a run, laid out as `abstract_params` (a pytree of
    ShapeDtypeStructs with shardings): AdamW's two moments, twice the params' size, stay on disk.
    Errors are told apart as in `restore`."""
    manager = open_reader(run_dir, partial=True)
    where = Path(manager.directory) / str(step)
    item = {"params": abstract_params}
    try:
        check_matches(manager, step, item, only="params")
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)
            ),
        )
    except JaxgptError:
        raise
    except Exception as err:  # classified below; the original is chained
        raise _restore_error(err, where) from err
    finally:
        manager.close()
    return restored["state"]["params"]


def _restore_error(err: Exception, where: Path) -> JaxgptError:
    text = f"{type(err).__name__} {err}".lower()
    if isinstance(err, MemoryError) or any(w in text for w in _MEMORY):
        return RestoreError(
            f"out of memory restoring checkpoint {where} ({_first_line(err)}); the checkpoint is "
            f"intact: restore it on more devices (a larger fsdp axis) or with more free memory"
        )
    if isinstance(err, (OSError, json.JSONDecodeError)) or any(w in text for w in _DAMAGE):
        return CheckpointCorruptError(
            f"checkpoint {where} is corrupt ({_first_line(err)}); move it aside to resume "
            f"from an earlier checkpoint, or start over with --fresh"
        )
    if any(w in text for w in _DEVICES):
        return RestoreError(
            f"checkpoint {where} could not be laid out on these devices ({_first_line(err)}); "
            f"the checkpoint is intact: check parallel.mesh and the devices available"
        )
    return RestoreError(
        f"could not restore checkpoint {where} ({_first_line(err)}); its files and arrays "
        f"look intact, so it was not moved or changed"
    )


# --------------------------------------------------------------------------- run files


def write_run_files(
    run_dir: Path, experiment: dict[str, Any], config: GPTConfig, tokenizer: Tokenizer
) -> None:
    atomic.write_text(run_dir / EXPERIMENT_FILE, json.dumps(experiment, indent=1))
    atomic.write_text(run_dir / MODEL_FILE, json.dumps(config.to_dict(), indent=1))
    spec = tokenizer_to_json(tokenizer)  # chat tokens included
    atomic.write_text(run_dir / TOKENIZER_FILE, json.dumps(spec, ensure_ascii=False))


def set_aside(run_dir: Path, move: list[str], copy: list[str] = RUN_FILES) -> Path | None:
    """Move the run's paths `move` (relative to `run_dir`) into a new `run_dir/old-<UTC time>/`,
    and copy `copy` there, so that the folder is itself a loadable run directory.

    Nothing is deleted; a path that does not exist is skipped. Returns the folder, or None when
    there was nothing to move.
    """
    present = [rel for rel in move if (run_dir / rel).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = run_dir / f"old-{stamp}", 1
    while aside.exists():
        n += 1
        aside = run_dir / f"old-{stamp}-{n}"
    for rel in copy:
        if (run_dir / rel).is_file():
            aside.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / rel, aside / rel)
    for rel in present:
        (aside / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(run_dir / rel, aside / rel)
    return aside


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointFormatError(f"cannot read {path}: {err}") from err


def load_tokenizer(run_dir: str | Path) -> Tokenizer:
    path = Path(run_dir) / TOKENIZER_FILE
    return tokenizer_from_json(read_json(path), path)


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` is a jaxgpt training run directory (it has experiment.json and model.json)."""
    path = Path(path)
    return (path / EXPERIMENT_FILE).is_file() and (path / MODEL_FILE).is_file()


def load_run_for_inference(
    path: str | Path, **overrides: Any
) -> tuple[GPTConfig, Any, Tokenizer, str]:
    """(config, params, tokenizer, description) from a run directory's latest checkpoint.

    Only the params are read (`restore_params`), not the optimiser state.

    `overrides` replace GPTConfig fields (e.g. dtype="bfloat16"); shape changes are an error.
    """
    run_dir = Path(path)
    if not is_run_dir(run_dir):
        raise CheckpointFormatError(f"{run_dir} is not a jaxgpt run directory (no {MODEL_FILE})")
    config = GPTConfig.from_dict(read_json(run_dir / MODEL_FILE))
    step = latest_step(run_dir)
    if step is None:
        raise CheckpointFormatError(f"run directory {run_dir} has no checkpoint yet")
    # Onto this process's first device, whatever mesh the checkpoint was written from.
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=one_device),
        param_shapes(config),
    )
    params = restore_params(run_dir, step, abstract)
    if overrides:
        shape_fields = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "use_bias"}
        bad = sorted(shape_fields & overrides.keys())
        if bad:
            raise InputError(f"cannot change {bad} of a trained model in {run_dir}")
        config = config.replace(**overrides)
    description = f"jaxgpt run {run_dir} (step {step})"
    return config, params, load_tokenizer(run_dir), description
