"""Run directories and their orbax checkpoints.

A run directory holds::

    experiment.json     the Experiment the run was started with (resume checks it matches)
    model.json          the GPTConfig (vocab size included), for loading without the data
    tokenizer.json      {"type": "char", "chars": ...} or {"type": "gpt2"}
    metrics.jsonl       one JSON object per logged step / evaluation
    loss.png            the loss curve, written at the end (or by `jaxgpt plot`)
    checkpoints/<step>/ orbax checkpoints: the train state (step, params, optimiser state) and
                        the data loader's state; the last `keep` and the best-val are kept

Orbax writes each checkpoint into a temporary directory and renames it only when complete, so a
process killed while saving leaves the previous checkpoint as the latest good one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxgpt.config import GPTConfig
from jaxgpt.errors import CheckpointFormatError, InputError
from jaxgpt.tokenizer import Tokenizer, tokenizer_from_json, tokenizer_to_json

EXPERIMENT_FILE = "experiment.json"
MODEL_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


def open_manager(run_dir: str | Path, keep: int = 2) -> ocp.CheckpointManager:
    """The run's CheckpointManager: keeps the latest `keep` checkpoints plus the best val loss."""
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
    return ocp.CheckpointManager(directory, options=options)


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


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> tuple[Any, dict[str, Any]]:
    """(state, loader_state) of checkpoint `step`; a CheckpointFormatError if it is unreadable."""
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), loader=ocp.args.JsonRestore()
            ),
        )
    except Exception as err:
        where = Path(manager.directory) / str(step)
        raise CheckpointFormatError(
            f"checkpoint {where} is corrupt or does not match this model "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
            f"move it aside to resume from an earlier checkpoint, or start over with --fresh"
        ) from err
    return restored["state"], dict(restored["loader"])


# --------------------------------------------------------------------------- run files


def write_run_files(
    run_dir: Path, experiment: dict[str, Any], config: GPTConfig, tokenizer: Tokenizer
) -> None:
    (run_dir / EXPERIMENT_FILE).write_text(json.dumps(experiment, indent=1))
    (run_dir / MODEL_FILE).write_text(json.dumps(config.to_dict(), indent=1))
    spec = tokenizer_to_json(tokenizer)  # chat tokens included
    (run_dir / TOKENIZER_FILE).write_text(json.dumps(spec, ensure_ascii=False))


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

    `overrides` replace GPTConfig fields (e.g. dtype="bfloat16"); shape changes are an error.
    """
    from jaxgpt.experiment import Experiment
    from jaxgpt.optim import make_optimizer
    from jaxgpt.train import abstract_train_state

    run_dir = Path(path)
    if not is_run_dir(run_dir):
        raise CheckpointFormatError(f"{run_dir} is not a jaxgpt run directory (no {MODEL_FILE})")
    config = GPTConfig.from_dict(read_json(run_dir / MODEL_FILE))
    experiment = Experiment.from_dict(read_json(run_dir / EXPERIMENT_FILE))
    step = latest_step(run_dir)
    if step is None:
        raise CheckpointFormatError(f"run directory {run_dir} has no checkpoint yet")
    manager = open_manager(run_dir, keep=experiment.checkpoint.keep)
    optimizer = make_optimizer(experiment.optim, experiment.schedule)
    # Onto this process's first device, whatever mesh the checkpoint was written from.
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=one_device),
        abstract_train_state(config, optimizer),
    )
    state, _ = restore(manager, step, abstract)
    manager.close()
    if overrides:
        shape_fields = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "use_bias"}
        bad = sorted(shape_fields & overrides.keys())
        if bad:
            raise InputError(f"cannot change {bad} of a trained model in {run_dir}")
        config = config.replace(**overrides)
    params = jax.tree.map(lambda x: x, state.params)
    description = f"jaxgpt run {run_dir} (step {step})"
    return config, params, load_tokenizer(run_dir), description
