"""Pretraining: the train state, ONE jitted pure train step, evaluation, and the run loop.

    train_step(state, batch_ABT1, key) -> (state, metrics)

is a pure function: `batch_ABT1` holds `A` micro-batches of `[B, T+1]` token windows (A = gradient
accumulation); their gradients are averaged with a `lax.scan`, clipped and applied once by the
optax optimiser. Parameters and optimiser state are float32; the forward pass computes in
`config.dtype`. Dropout keys are `fold_in(key, step)`, so a resumed run draws the same masks.
The step is jitted in exactly one place, `jit_train_step`, with the state's buffers donated; that
is also where shardings go when the step runs on several devices.

`run` drives a whole experiment in four steps, read top to bottom:

    validate         the stage (its data, prepared on first use), the starting weights or the
                     checkpoint to resume, the compiled step: all checked before any write
    resume_or_start  restore the latest checkpoint, or initialise and write the run files
    train_loop       step after step: the stage's batch (its hook), the compiled step, the
                     progress bar and metrics.jsonl, evaluation and checkpoints at intervals,
                     the NaN / Ctrl-C stops that keep the last good checkpoint
    finish           the plot, the stage's report.json, the end-of-training sample

A `Stage` is what differs between pretraining, SFT and PPO: where a step's batch comes from
(prepared data, or a rollout of the current policy), which compiled step consumes it, and what an
evaluation measures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jaxgpt import atomic, batches, checkpoint, data, flops, heads, sharding
from jaxgpt.config import GPTConfig
from jaxgpt.errors import CheckpointFormatError, ConfigError, InputError, JaxgptError
from jaxgpt.eval import load_tasks, score_tasks
from jaxgpt.experiment import Experiment, OptimSection, ScheduleSection, diff, eval_tasks
from jaxgpt.objectives import Objective, get_objective, next_token, split_aux
from jaxgpt.optim import make_optimizer
from jaxgpt.params import Params, check_params, grow_vocab, init_params
from jaxgpt.tokenizer import CharTokenizer, Tokenizer

HELD_OUT_EVAL = 200  # held-out arithmetic problems scored at each evaluation (500 at the end)
# Changing these does not change what the model computes, so a run may resume with new values.
# The mesh too: checkpoints restore into whatever layout the resumed run uses.
RESUMABLE_KEYS = ("eval.", "checkpoint.", "parallel.", "name")
# These change how big the remaining updates are — the remedies for a diverged run — but not the
# model, the optimiser state's structure (the schedule is a function of the step, clipping keeps no
# state) or the data stream the loader state indexes, so a resume may change them too. Not
# model.*, data.*, optim.grad_accum (the data stream), optim.beta1/beta2/eps (what the stored
# Adam moments mean), optim.decay_embeddings or schedule.seed (init and dropout keys).
ADJUSTABLE_KEYS = (
    "optim.lr", "optim.grad_clip", "optim.weight_decay",
    "schedule.warmup_steps", "schedule.min_lr_ratio", "schedule.max_steps",
)  # fmt: skip


class TrainingDiverged(JaxgptError):
    """The loss became NaN or infinite; training stopped, the checkpoints from after the bad update
    were set aside and the last one from before it is where the run resumes."""


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Params
    opt_state: optax.OptState


# --------------------------------------------------------------------------- the pure step


def make_train_step(
    config: GPTConfig, optimizer: optax.GradientTransformation, objective: Objective = next_token
):
    """The pure `train_step(state, batch_A, key) -> (state, metrics)` for this model.

    `batch_A` holds A micro-batches along its leading axis (a `[A, B, T+1]` array, or a dict of
    them); `objective` (see `jaxgpt.objectives`) gives each micro-batch's (mean loss, weight).
    """
    use_dropout = max(config.embd_dropout, config.attn_dropout, config.resid_dropout) > 0
    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: TrainState, batch_A: Any, key: jax.Array):
        step_key = jax.random.fold_in(key, state.step)
        A = jax.tree.leaves(batch_A)[0].shape[0]

        def micro(i: jax.Array, batch: Any):
            k = jax.random.fold_in(step_key, i) if use_dropout else None
            (loss, aux), grads = grad_fn(state.params, batch, config, k)
            return (loss, *split_aux(aux)), grads

        if A == 1:
            (loss, weight, extra), grads = micro(
                jnp.int32(0), jax.tree.map(lambda x: x[0], batch_A)
            )
        else:
            # Micro-batches weighted by how many predictions each trains: the step's loss, its
            # metrics and its gradient are the mean over all of them, however they fall into
            # micro-batches.
            def body(carry, xs):
                loss_sum, weight_sum, extra_sum, grad_sum = carry
                (loss, weight, extra), grads = micro(*xs)
                grad_sum = jax.tree.map(lambda acc, g: acc + weight * g, grad_sum, grads)
                extra_sum = jax.tree.map(lambda acc, m: acc + weight * m, extra_sum, extra)
                return (loss_sum + weight * loss, weight_sum + weight, extra_sum, grad_sum), None

            first = jax.tree.map(lambda x: x[0], batch_A)
            extra_shape = jax.eval_shape(lambda b: micro(jnp.int32(0), b)[0][2], first)
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            extra0 = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), extra_shape)
            init = (jnp.float32(0), jnp.float32(0), extra0, zeros)
            (loss, weight, extra, grads), _ = jax.lax.scan(body, init, (jnp.arange(A), batch_A))
            scale = 1.0 / jnp.maximum(weight, 1.0)
            loss, grads = loss * scale, jax.tree.map(lambda g: g * scale, grads)
            extra = jax.tree.map(lambda m: m * scale, extra)

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "trained_tokens": weight}
        return new_state, {**extra, **metrics}

    return train_step


def jit_train_step(train_step, **jit_kwargs):
    """The one place the train step is compiled; the incoming state's buffers are donated."""
    return jax.jit(train_step, donate_argnums=(0,), **jit_kwargs)


@functools.lru_cache(maxsize=8)
def make_eval_loss(config: GPTConfig, objective: Objective = next_token):
    """Jitted `eval_loss(params, batch) -> (mean loss, weight, metrics)` of the objective
    (no dropout)."""

    def eval_loss(params: Params, batch: Any):
        loss, aux = objective(params, batch, config, None)
        return (loss, *split_aux(aux))

    return jax.jit(eval_loss)


@functools.lru_cache(maxsize=8)
def compiled_step(
    config: GPTConfig,
    optim: OptimSection,
    schedule: ScheduleSection,
    mesh: Mesh,
    objective: Objective = next_token,
):
    """(optimizer, jitted train step, state shardings) for these settings on `mesh`.

    The state is laid out by `jaxgpt.sharding`'s partition rules and the batch split over
    data × fsdp; cached so that several runs in one process (a notebook, the tests) compile once.
    """
    optimizer = make_optimizer(optim, schedule)
    state_shardings = sharding.tree_shardings(abstract_train_state(config, optimizer), mesh)
    replicated = NamedSharding(mesh, P())
    step_fn = jit_train_step(
        make_train_step(config, optimizer, objective),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh, accum=True), replicated),
        out_shardings=(state_shardings, replicated),
    )
    return optimizer, step_fn, state_shardings


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))


def abstract_train_state(
    config: GPTConfig, optimizer: optax.GradientTransformation, shardings: object = None
) -> TrainState:
    """The train state's structure as ShapeDtypeStructs (what a checkpoint restores into),
    carrying `shardings` (a matching pytree) when given, so orbax restores onto that layout."""
    abstract = jax.eval_shape(
        lambda key: init_train_state(init_params(config, key), optimizer), jax.random.key(0)
    )
    if shardings is None:
        return abstract
    return jax.tree.map(
        lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh),
        abstract,
        shardings,
    )


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    step: int
    interrupted: bool
    val_loss: float | None
    train_loss: float | None
    tokens_seen: int
    wall_s: float
    tokens_per_s: float | None
    mfu: float | None
    sample: str | None
    report: dict | None = None  # the stage's figures (report.json), for chat runs


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise InputError(
            f"run directory {run_dir} is not writable ({err.strerror or err}); "
            f"choose another with --out"
        ) from err


def ensure_data(exp: Experiment, data_root: Path, *, progress: bool = True) -> Path:
    """The prepared data directory of `exp`, (re)preparing it if missing or differently split."""
    d = exp.data
    data_dir = data_root / d.dataset
    if d.format == "chat":
        return ensure_chat_data(exp, data_dir, progress=progress)
    if d.format == "preference":
        from jaxgpt import preferences

        return preferences.ensure_prepared(exp, data_dir, progress=progress)
    if d.source == data.PREPARED:
        meta = data.load_meta(data_dir)
        if meta.get("tokenizer") != d.tokenizer:
            raise ConfigError(
                f"{data_dir} holds {meta.get('tokenizer')!r} tokens, but the experiment's "
                f"data.tokenizer is {d.tokenizer!r}"
            )
        return data_dir
    want = data.wanted_settings(d.tokenizer, d.source, d.val_fraction, d.split_seed, d.split_chunk)
    if data.is_prepared(data_dir, want):
        return data_dir
    print(f"preparing {d.source!r} → {data_dir} ({d.tokenizer} tokens)", file=sys.stderr)
    meta = data.prepare(
        d.source, data_dir, tokenizer=d.tokenizer, val_fraction=d.val_fraction,
        split_seed=d.split_seed, split_chunk=d.split_chunk, errors=d.errors, progress=progress,
    )  # fmt: skip
    print(
        f"  {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
        f"vocabulary {meta['vocab_size']}",
        file=sys.stderr,
    )
    return data_dir


def ensure_chat_data(exp: Experiment, data_dir: Path, *, progress: bool = True) -> Path:
    """The prepared chat data of `exp` (conversations rendered with the chat format)."""
    from jaxgpt import chat_data

    d = exp.data
    want = {"version": chat_data.META_VERSION, "format": chat_data.FORMAT,
            "tokenizer": d.tokenizer, "source": d.source,
            "source_sha256": chat_data.source_digest(d.source), "val_fraction": d.val_fraction,
            "split_seed": d.split_seed}  # fmt: skip
    if data.is_prepared(data_dir, want):
        return data_dir
    print(f"preparing chat data {d.source!r} → {data_dir} ({d.tokenizer} tokens)", file=sys.stderr)
    meta = chat_data.prepare_chat(
        d.source, data_dir, tokenizer=d.tokenizer, val_fraction=d.val_fraction,
        split_seed=d.split_seed, progress=progress,
    )  # fmt: skip
    print(
        f"  {meta['train_conversations']:,} train / {meta['val_conversations']:,} val "
        f"conversations, vocabulary {meta['vocab_size']}",
        file=sys.stderr,
    )
    return data_dir


def initial_params(exp: Experiment, tokenizer: Tokenizer) -> tuple[GPTConfig, Params]:
    """(config, params) to start from: scratch, a Hugging Face GPT-2 dir, or a jaxgpt run dir.

    `tokenizer` is the data's; a run directory must have been trained with the same one.
    """
    m = exp.model
    vocab_size = tokenizer.n_vocab
    if m.init == "scratch":
        config = exp.gpt_config(vocab_size)
        # Compiled: op-by-op initialisation dispatches (and compiles) hundreds of tiny programs.
        params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(exp.schedule.seed))
        return config, params
    overrides = dict(
        embd_dropout=m.dropout, attn_dropout=m.dropout, resid_dropout=m.dropout, dtype=m.dtype,
        attention=m.attention,
    )  # fmt: skip
    if checkpoint.is_run_dir(m.init):
        check_same_tokenizer(checkpoint.load_tokenizer(m.init), tokenizer, m.init)
        config, params, _, _ = checkpoint.load_run_for_inference(m.init, **overrides)
    else:
        from jaxgpt.pretrained import load_hf

        if tokenizer.name != "gpt2":
            raise ConfigError(
                "model.init from a Hugging Face GPT-2 needs data.tokenizer='gpt2', "
                f"got {tokenizer.name!r}"
            )
        config, params = load_hf(m.init, **overrides)
    if config.vocab_size < vocab_size and tokenizer.name == "gpt2":
        # GPT-2 BPE data with the chat tokens (ids from 50257 up): grow the embedding for them.
        config, params = grow_vocab(config, params, vocab_size, jax.random.key(exp.schedule.seed))
    if config.vocab_size < vocab_size:
        raise ConfigError(
            f"model.init {m.init!r} has vocab_size {config.vocab_size}, smaller than the data's "
            f"{vocab_size}"
        )
    if m.block_size > config.block_size:
        raise ConfigError(
            f"model.block_size {m.block_size} exceeds {m.init!r}'s context {config.block_size}"
        )
    # A reward model or a PPO policy starts from a language model's trunk with a new head.
    head_key = jax.random.fold_in(jax.random.key(exp.schedule.seed), 2)
    return heads.with_head(config, params, m.head, head_key, source=f"model.init {m.init!r}")


def check_same_tokenizer(theirs: Tokenizer, ours: Tokenizer, init: str) -> None:
    """Refuse to fine-tune a run's model on data tokenized differently: its ids would be read as
    other characters."""
    if theirs.name != ours.name:
        raise ConfigError(
            f"model.init {init!r} was trained with the {theirs.name!r} tokenizer, but "
            f"data.tokenizer is {ours.name!r}; its token ids would mean other text"
        )
    if isinstance(theirs, CharTokenizer) and theirs.chars != ours.chars:
        only_theirs = sorted(set(theirs.chars) - set(ours.chars))
        only_ours = sorted(set(ours.chars) - set(theirs.chars))
        raise ConfigError(
            f"model.init {init!r} has a different character table ({theirs.n_vocab} characters) "
            f"than this corpus ({ours.n_vocab}): only in the run {''.join(only_theirs[:20])!r}, "
            f"only in the corpus {''.join(only_ours[:20])!r}; its ids would be read as other "
            f"characters. Fine-tune on text with the same characters, or start from scratch"
        )


def sample_prompt_ids(tokenizer: Tokenizer, exp: Experiment) -> list[int]:
    """`eval.sample_prompt` as token ids (the end-of-text token for an empty GPT-2 prompt);
    a ConfigError naming the characters the tokenizer cannot encode."""
    prompt = exp.eval.sample_prompt
    if tokenizer.eot_token is not None and not prompt:
        return [tokenizer.eot_token]
    try:
        return tokenizer.encode(prompt)
    except JaxgptError as err:
        raise ConfigError(
            f"eval.sample_prompt {prompt!r} cannot be encoded by the data's {tokenizer.name} "
            f"tokenizer: {err}; change it with --set eval.sample_prompt=..., or pass --no-sample"
        ) from err


def load_eval_tasks(exp: Experiment, tokenizer: Tokenizer, config: GPTConfig) -> dict:
    """The run's `eval.tasks`, read and encoded once (`jaxgpt.eval.load_tasks`), by name."""
    entries = eval_tasks(exp.eval)
    if entries and jax.process_count() > 1:
        raise ConfigError("eval.tasks runs in single-process training only; unset it here")
    limit = exp.eval.task_limit or None
    return load_tasks(entries, tokenizer, config, limit=limit)


def check_resumable(exp: Experiment, run_dir: Path) -> dict[str, tuple]:
    """The keys a resume of `run_dir` changes, as {key: (stored, new)}; a ConfigError if any of
    them is neither in RESUMABLE_KEYS nor in ADJUSTABLE_KEYS."""
    stored = Experiment.from_dict(checkpoint.read_json(run_dir / checkpoint.EXPERIMENT_FILE))
    changed = diff(stored, exp)
    fixed = [k for k in changed if not k.startswith(RESUMABLE_KEYS) and k not in ADJUSTABLE_KEYS]
    if fixed:
        raise ConfigError(
            f"run directory {run_dir} holds a run of a different config (differs in: "
            f"{', '.join(fixed)}); a resume may change only {', '.join(ADJUSTABLE_KEYS)} and "
            f"eval.*, checkpoint.*, parallel.*; pass --fresh to start over there, or --out NEW_DIR"
        )

    def value(e: Experiment, key: str) -> object:
        d = e.to_dict()
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    return {k: (value(stored, k), value(exp, k)) for k in changed}


def _set_aside_diverged(run_dir: Path, bad_step: int) -> tuple[Path | None, list[int]]:
    """Move the checkpoints from step `bad_step - 1` on (their weights gave the bad loss, or
    came after them) into an `old-<time>` folder with copies of the run files and metrics."""
    directory = run_dir / checkpoint.CHECKPOINT_DIR
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    suspect = [c for c in steps if c >= bad_step - 1]
    names = [f"{checkpoint.CHECKPOINT_DIR}/{c}" for c in suspect]
    files = [*checkpoint.RUN_FILES, checkpoint.METRICS_FILE]
    return checkpoint.set_aside(run_dir, names, copy=files), suspect


def _diverged(run_dir: Path, s: int, name: str, metrics: dict, main: bool) -> JaxgptError:
    """The error for a NaN/inf metric `name` at step `s`, after setting the suspect checkpoints
    aside."""
    aside, suspect = _set_aside_diverged(run_dir, s) if main else (None, [])
    kept = checkpoint.latest_step(run_dir)
    moved = f"checkpoint(s) {suspect} moved to {aside}; " if aside else ""
    if kept is None:
        then = "no checkpoint from before the bad update exists: start over with --fresh and"
    else:
        then = f"checkpoint {kept} (from before the bad update) is kept; run again to resume with"
    what = f"loss became {float(metrics['loss'])} (grad norm {float(metrics['grad_norm'])})"
    if name not in ("loss", "grad_norm"):
        what = f"{name} became {float(np.mean(metrics[name]))} ({what.replace(' became', '')})"
    return TrainingDiverged(
        f"{what} at step {s}, computed with the weights after step {s - 1}; training stopped in "
        f"{run_dir}; {moved}{then} a lower optim.lr, a longer schedule.warmup_steps or a "
        f"smaller optim.grad_clip"
    )


class _StopFlag:
    """Turns Ctrl-C and SIGTERM into a flag the loop checks between steps (never mid-step).

    In a multi-process run every process must stop after the same step, whichever of them got
    the signal: `should_stop` agrees on it with a collective every `every` steps.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.stop = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        for signum in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop:  # a second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.stop = True

    def should_stop(self, step: int, every: int) -> bool:
        if jax.process_count() == 1:
            return self.stop
        return step % every == 0 and sharding.any_process(self.stop)

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)


def _read_metrics(path: Path, upto_step: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short by a kill: drop it and everything after
        if row.get("step", 0) <= upto_step:
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- stages


@dataclasses.dataclass
class Stage:
    """What one stage of training (pretraining, SFT, PPO, ...) brings to the one loop of `run`.

    The loop itself — resume, metrics, progress bar, evaluation, checkpoints, Ctrl-C and NaN
    stops — is the same for every stage; a stage only says where a step's batch comes from, which
    compiled step consumes it and what an evaluation measures.

    Attributes:
      tokenizer: the run's tokenizer (its run files store it).
      tokens_per_step: tokens one step trains on, for the throughput figures.
      compile: `compile(config) -> (optimizer, step_fn, state_shardings)`; `step_fn(state, batch,
        key) -> (state, metrics)` is jitted with the state donated (`compiled_step`).
      batch_struct: one step's batch as ShapeDtypeStructs, to compile the step before any write.
      batch: THE HOOK — `batch(step, state, config) -> batch` on device. A data stage slices
        its prepared data (a pure function of (seed, step)); PPO samples a rollout from
        `state.params`. Either way a function of (seed, step, params), so a resumed run sees
        the same batches.
      evaluate: `evaluate(params, config) -> {name: float}` at each evaluation.
      report: the stage's name in `report.json` ("sft", "dpo", "reward", "ppo"), or None.
      loader_state / restore: extra JSON state saved with each checkpoint (e.g. PPO's adaptive β)
        and given back on resume.
      bar: the metrics shown on the progress bar.
      report_options: keyword arguments of `write_report` for this stage (its reference model,
        data directory, whether it is the arithmetic task).
    """

    tokenizer: Tokenizer
    tokens_per_step: int
    compile: Callable[[GPTConfig], tuple[Any, Any, Any]]
    batch_struct: Any
    batch: Callable[[int, TrainState, GPTConfig], Any]
    evaluate: Callable[[Params, GPTConfig], dict[str, Any]]
    report: str | None = None
    loader_state: Callable[[], dict[str, Any]] = dict
    restore: Callable[[dict[str, Any]], None] = lambda loader: None
    bar: tuple[str, ...] = ("loss",)
    report_options: dict[str, Any] = dataclasses.field(default_factory=dict)


def make_stage(exp: Experiment, data_root: Path, mesh: Mesh, *, progress: bool) -> Stage:
    """The stage `exp` describes: PPO for `data.format="prompts"`, else training on prepared
    data (text or chat)."""
    if exp.data.format == "prompts":
        from jaxgpt import rlhf

        return rlhf.ppo_stage(exp, mesh)
    return data_stage(exp, data_root, mesh, progress=progress)


def data_stage(exp: Experiment, data_root: Path, mesh: Mesh, *, progress: bool) -> Stage:
    """Pretraining, SFT, DPO or a reward model: batches from the prepared data (prepared on
    first use), the objective its format implies, evaluation on fixed train/val batches."""
    data_dir = sharding.main_first(lambda: ensure_data(exp, data_root, progress=progress))
    meta = data.load_meta(data_dir)
    T, B, A = exp.model.block_size, exp.data.batch_size, exp.optim.grad_accum
    tokenizer = batches.tokenizer_of(meta)
    options, reference = {}, None
    # Preference pairs train a reward model (model.head = "reward") or, with DPO, a policy.
    reward_stage = meta.get("format") == "preference" and exp.model.head == "reward"
    if reward_stage:
        from jaxgpt import reward_model

        reward_model.check_prepared_fits(data_dir, T)
    elif meta.get("format") == "preference":  # DPO: the frozen reference model's log-probs
        from jaxgpt import dpo

        reference = dpo.load_reference(exp, tokenizer)
        options = dpo.source_options(exp, reference, progress=progress)
    source = batches.make_source(
        data_dir, B, T, A, exp.data.seed, align_documents=exp.data.align_documents, **options
    )
    objective_name = "reward" if reward_stage else source.objective
    objective = get_objective(
        objective_name, beta=exp.dpo.beta,
        nll_weight=exp.reward.nll_weight if reward_stage else exp.dpo.nll_weight,
        first_difference=exp.dpo.tokens == "first_difference",
        freeze_embeddings=exp.dpo.freeze_embeddings,
        first_difference_weight=exp.reward.first_difference_weight if reward_stage else 0.0,
    )  # fmt: skip
    arithmetic_task = exp.data.source == "arithmetic" or meta.get("task") == "arithmetic"
    rows = sharding.host_rows(B)  # this process reads only its share of every batch
    train_sharding = sharding.batch_sharding(mesh, accum=True)
    eval_sharding = sharding.batch_sharding(mesh)

    def batch(step: int, state: TrainState, config: GPTConfig) -> Any:
        put = lambda x: sharding.put_batch(x, train_sharding, (A, B, T + 1))
        return jax.tree.map(put, source.train(step, rows))

    fixed: dict[str, list] = {}  # the eval batches, made at the first evaluation

    def evaluate(params: Params, config: GPTConfig) -> dict[str, float]:
        """Mean loss (and the objective's metrics) per split over its fixed batches, each
        weighted by what it scores; for the arithmetic demo also the greedy accuracy on 200
        held-out problems."""
        eval_loss = make_eval_loss(config, objective)
        settled = sharding.settled  # one program at a time where collectives need it
        out = {}
        for split in ("train", "val"):
            if split not in fixed:
                put = lambda x: sharding.put_batch(x, eval_sharding, (B, T + 1))
                fixed[split] = [
                    jax.tree.map(put, source.evaluate(split, i, rows))
                    for i in range(exp.eval.batches)
                ]
            scored_N = jax.device_get([settled(eval_loss(params, b)) for b in fixed[split]])
            weight_N = np.array([w for _, w, _ in scored_N], np.float64)
            total = max(weight_N.sum(), 1.0)
            out[f"{split}_loss"] = float(sum(w * loss for loss, w, _ in scored_N) / total)
            for name in scored_N[0][2]:  # the objective's own metrics, e.g. DPO's reward accuracy
                out[f"{split}_{name}"] = float(sum(w * m[name] for _, w, m in scored_N) / total)
        if arithmetic_task and not reward_stage and jax.process_count() == 1:
            out["held_out_acc"] = held_out_accuracy(params, config, tokenizer)
        return out

    report = {"chat": "sft", "preference": "reward" if reward_stage else "dpo"}
    return Stage(
        tokenizer=tokenizer,
        tokens_per_step=exp.tokens_per_step,
        compile=lambda config: compiled_step(config, exp.optim, exp.schedule, mesh, objective),
        batch_struct=jax.tree.map(  # `[A, B, T+1]` windows, or a dict of arrays
            lambda x: jax.ShapeDtypeStruct(
                x.shape, jax.dtypes.canonicalize_dtype(x.dtype), sharding=train_sharding
            ),
            source.train(0, None),
        ),
        batch=batch,
        evaluate=evaluate,
        report=report.get(exp.data.format),
        report_options={
            "arithmetic_task": arithmetic_task,
            "reference": reference,
            "data_dir": data_dir,
        },
    )


def held_out_accuracy(params: Params, config: GPTConfig, tokenizer: Tokenizer) -> float:
    """Greedy exact-match accuracy on HELD_OUT_EVAL held-out arithmetic problems."""
    from jaxgpt import arithmetic

    return arithmetic.evaluate_model(params, config, tokenizer, n=HELD_OUT_EVAL)["accuracy"]


# --------------------------------------------------------------------------- the run


def run(
    exp: Experiment,
    *,
    run_dir: str | Path,
    data_root: str | Path = "data",
    fresh: bool = False,
    progress: bool = True,
    sample: bool = True,
) -> RunResult:
    """Train `exp` in `run_dir` (resuming from its latest checkpoint unless `fresh`).

    Four steps, each below: `validate` (everything that can fail does so before the run
    directory changes), `resume_or_start`, `train_loop`, `finish`. On several devices the step
    runs on the mesh `exp.parallel.mesh`; in a multi-process run each process reads its share of
    every batch and only process 0 writes metrics, plots and bars.
    """
    r = validate(exp, Path(run_dir), Path(data_root), fresh=fresh, progress=progress,
                 sample=sample)  # fmt: skip
    if fresh:  # process 0 moves the old run aside while the others wait for it
        moved = [checkpoint.CHECKPOINT_DIR, checkpoint.METRICS_FILE, checkpoint.PLOT_FILE]
        aside = sharding.main_first(lambda: checkpoint.set_aside(r.run_dir, moved), others=False)
        if aside is not None:
            print(f"--fresh: the previous run's checkpoints and metrics moved to {aside}",
                  file=sys.stderr)  # fmt: skip
    manager = checkpoint.open_manager(r.run_dir, keep=exp.checkpoint.keep)
    try:
        state, elapsed_before = resume_or_start(r, manager)
        state, outcome = train_loop(r, state, manager, elapsed_before)
    finally:
        manager.close()
    return finish(r, state, outcome, sample=sample)


@dataclasses.dataclass
class _Run:
    """What `validate` established about a run; the later steps read it."""

    exp: Experiment
    run_dir: Path
    main: bool
    progress: bool
    mesh: Mesh
    stage: Stage
    config: GPTConfig
    params: Params | None  # the starting weights (None: resumed from checkpoint `last`)
    last: int | None
    changes: dict[str, tuple]
    optimizer: optax.GradientTransformation
    step_fn: Any
    abstract_state: TrainState
    tasks: dict = dataclasses.field(default_factory=dict)  # eval.tasks, encoded once


def evaluate(r: _Run, params: Params) -> dict[str, float]:
    """An evaluation: the stage's figures, and the score on each of `eval.tasks`."""
    out = r.stage.evaluate(params, r.config)
    if r.tasks:
        out.update(score_tasks(params, r.config, r.tasks))
    return out


def validate(
    exp: Experiment, run_dir: Path, data_root: Path, *, fresh: bool, progress: bool, sample: bool
) -> _Run:
    """Check everything a run needs — data, starting weights or the checkpoint to resume, the
    compiled step — before the run directory is touched (only its writability is probed)."""
    main = sharding.is_main_process()
    progress = progress and main
    mesh = sharding.make_mesh(exp.parallel.mesh)  # a bad mesh fails before any work is done
    # Process 0 probes the (shared) run directory and prepares the data; the others wait for it.
    sharding.main_first(lambda: _check_writable(run_dir), others=False)
    stage = make_stage(exp, data_root, mesh, progress=progress)
    sample = sample and exp.model.head != "reward"  # a reward model writes no text
    if sample and exp.eval.sample_tokens > 0:
        sample_prompt_ids(stage.tokenizer, exp)  # fail now, not after the whole run

    last = None if fresh else checkpoint.latest_step(run_dir)
    changes: dict[str, tuple] = {}
    params = None
    if last is not None:
        changes = check_resumable(exp, run_dir)
        config = GPTConfig.from_dict(checkpoint.read_json(run_dir / checkpoint.MODEL_FILE))
    else:
        config, params = initial_params(exp, stage.tokenizer)
        check_params(params, config)
    sharding.check_parallelism(config, mesh, exp.data.batch_size)
    tasks = load_eval_tasks(exp, stage.tokenizer, config)  # read and checked before any write
    optimizer, step_fn, state_shardings = stage.compile(config)
    abstract_state = abstract_train_state(config, optimizer, state_shardings)
    # Compiled now, so that a step that cannot be built fails before the run directory changes;
    # jax caches the executable and the first step reuses it.
    if last is None or last < exp.schedule.max_steps:  # (a finished run takes no more steps)
        with jax.set_mesh(mesh):
            key_struct = jax.eval_shape(jax.random.key, 0)
            step_fn.lower(abstract_state, stage.batch_struct, key_struct).compile()
    if main:
        per_device = sharding.bytes_per_device(abstract_state, mesh)
        total = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract_state))
        axes = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
        print(
            f"mesh {axes} on {mesh.size} {jax.devices()[0].platform} device(s): parameters + "
            f"optimiser state {per_device / 2**20:,.1f} MiB per device "
            f"({total / 2**20:,.1f} MiB in all)",
            file=sys.stderr,
        )
    return _Run(exp, run_dir, main, progress, mesh, stage, config, params, last, changes,
                optimizer, step_fn, abstract_state, tasks)  # fmt: skip


def resume_or_start(r: _Run, manager: Any) -> tuple[TrainState, float]:
    """(state, seconds trained before): restored from checkpoint `r.last`, or initialised from
    `r.params` with the run files written. A resume records what it changed."""
    if r.last is None:
        state_shardings = jax.tree.map(lambda s: s.sharding, r.abstract_state)
        init = jax.jit(init_train_state, static_argnums=1, out_shardings=state_shardings)
        state = init(r.params, r.optimizer)
        if r.main:
            checkpoint.write_run_files(r.run_dir, r.exp.to_dict(), r.config, r.stage.tokenizer)
        return state, 0.0
    state, loader = checkpoint.restore(manager, r.last, r.abstract_state)
    if loader.get("seed") != r.exp.data.seed or loader.get("step") != int(state.step):
        raise CheckpointFormatError(
            f"checkpoint {r.last} in {r.run_dir} has an inconsistent loader state {loader}"
        )
    r.stage.restore(loader)
    print(f"resuming {r.run_dir} from step {r.last}", file=sys.stderr)
    if r.changes and r.main:
        for key, (old, new) in r.changes.items():
            print(f"  {key}: {old!r} → {new!r}", file=sys.stderr)
        atomic.write_text(
            r.run_dir / checkpoint.EXPERIMENT_FILE, json.dumps(r.exp.to_dict(), indent=1)
        )
    return state, float(loader.get("elapsed_s", 0.0))


@dataclasses.dataclass
class _Outcome:
    """How the loop ended."""

    step: int
    interrupted: bool
    last_eval: dict[str, float]
    last_loss: float | None
    tok_s: float | None
    mfu: float | None
    wall_s: float


class _MetricsLog:
    """metrics.jsonl and the throughput window. Steps' metrics are fetched in groups (one host
    sync per `flush`), checked for NaN and written as one "train" row."""

    def __init__(self, r: _Run, start_step: int, elapsed_before: float) -> None:
        self.r = r
        self.path = r.run_dir / checkpoint.METRICS_FILE
        if r.main:
            kept = _read_metrics(self.path, start_step)
            if r.changes:  # what this resume changed, so the curve's history stays readable
                kept.append({"kind": "resume", "step": start_step,
                             "changed": {k: list(v) for k, v in r.changes.items()}})  # fmt: skip
            atomic.write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self.file = self.path.open("a") if r.main else None
        self.pending: list[tuple[int, dict]] = []
        self.elapsed_before = elapsed_before
        self.t_start = self.t_window = time.perf_counter()
        self.window_steps, self.window_compiles = 0, True
        self.last: dict[str, float] = {}  # the latest flushed row's figures
        self.tok_s = self.mfu = None
        self.flops_per_token = flops.flops_per_token(
            r.config, r.exp.model.block_size, training=True
        )
        self.peak, _ = flops.peak_flops(r.config.dtype)
        self.schedule = lr_of(r.exp)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))
        self.window_steps += 1

    def flush(self, manager: Any) -> None:
        """Fetch the pending steps' metrics, stop on NaN, write a log row."""
        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])
        for (s, _), m in zip(self.pending, fetched):
            bad = [k for k, v in m.items() if not np.all(np.isfinite(v))]
            if bad:
                manager.wait_until_finished()
                raise _diverged(self.r.run_dir, s, bad[0], m, self.r.main)
        now = time.perf_counter()
        seconds = now - self.t_window
        if not self.window_compiles and seconds > 0:
            self.tok_s = self.window_steps * self.r.stage.tokens_per_step / seconds
            self.mfu = self.tok_s * self.flops_per_token / self.peak
        s = self.pending[-1][0]
        means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
        self.last = means
        extra = {k: v for k, v in means.items() if k not in ("loss", "grad_norm", "trained_tokens")}
        self.write({
            "kind": "train", "step": s, "loss": means["loss"],
            "grad_norm": float(fetched[-1]["grad_norm"]), "lr": float(self.schedule(s - 1)),
            "trained_tokens": int(fetched[-1]["trained_tokens"]), **extra,
            "tokens": s * self.r.stage.tokens_per_step, "elapsed_s": round(self.elapsed(), 3),
            "tok_per_s": self.tok_s, "mfu": self.mfu,
        })  # fmt: skip
        self.pending, self.t_window, self.window_steps, self.window_compiles = [], now, 0, False

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def train_loop(
    r: _Run, state: TrainState, manager: Any, elapsed_before: float
) -> tuple[TrainState, _Outcome]:
    """Steps until `schedule.max_steps` or a stop: each step's batch from the stage's hook, the
    compiled step, metrics every `eval.log_interval`, evaluation and checkpoints at their
    intervals. Ctrl-C saves and returns; a NaN sets aside the bad checkpoints and raises."""
    exp, stage = r.exp, r.stage
    dropout_key = jax.random.fold_in(jax.random.key(exp.schedule.seed), 1)
    step = start_step = int(state.step)
    log = _MetricsLog(r, start_step, elapsed_before)
    last_eval: dict[str, float] = {}
    interrupted = False

    def save(with_metrics: bool) -> None:
        log.flush(manager)
        loader = {"seed": exp.data.seed, "step": step, "elapsed_s": log.elapsed(),
                  **stage.loader_state()}  # fmt: skip
        best = with_metrics and "val_loss" in last_eval  # kept as the best by its val loss
        checkpoint.save(manager, step, state, loader, dict(last_eval) if best else None)

    bar = tqdm(
        total=exp.schedule.max_steps, initial=step, desc="train", unit="step",
        disable=not r.progress, dynamic_ncols=True,
    )  # fmt: skip
    try:
        with _StopFlag() as stop:
            while step < exp.schedule.max_steps:
                if stop.should_stop(step, every=exp.eval.log_interval):
                    interrupted = True
                    break
                batch = stage.batch(step, state, r.config)
                with jax.set_mesh(r.mesh):  # activates the model's sharding hints
                    state, metrics = sharding.settled(r.step_fn(state, batch, dropout_key))
                step += 1
                log.add(step, metrics)
                last_step = step == exp.schedule.max_steps
                if step % exp.eval.log_interval == 0 or last_step:
                    log.flush(manager)
                    bar.update(step - bar.n)
                    bar.set_postfix(_postfix(stage, log, last_eval), refresh=True)
                evaluated = step % exp.eval.interval == 0 or last_step
                if evaluated:
                    log.flush(manager)
                    t0 = time.perf_counter()
                    last_eval = evaluate(r, state.params)
                    log.write({"kind": "eval", "step": step, **last_eval,
                               "tokens": step * stage.tokens_per_step,
                               "elapsed_s": round(log.elapsed(), 3)})  # fmt: skip
                    log.t_window += time.perf_counter() - t0  # eval time is not throughput
                if step % exp.checkpoint.interval == 0 or last_step:
                    save(with_metrics=evaluated)
                    log.t_window = time.perf_counter()
            if interrupted and step > checkpoint_step(r.run_dir):
                save(with_metrics=False)
    finally:
        bar.close()
        log.close()
    outcome = _Outcome(step, interrupted, last_eval, log.last.get("loss"), log.tok_s, log.mfu,
                       log.elapsed())  # fmt: skip
    return state, outcome


def _postfix(stage: Stage, log: _MetricsLog, last_eval: dict[str, float]) -> dict[str, str]:
    postfix = {k: f"{log.last[k]:.4f}" for k in stage.bar if k in log.last}
    if log.tok_s:
        postfix.update(tok_s=f"{log.tok_s:,.0f}", mfu=f"{100 * log.mfu:.1f}%")
    if "val_loss" in last_eval:
        postfix["val"] = f"{last_eval['val_loss']:.4f}"
    if "held_out_acc" in last_eval:
        postfix["held_out"] = f"{last_eval['held_out_acc']:.3f}"
    return postfix


def finish(r: _Run, state: TrainState, outcome: _Outcome, *, sample: bool) -> RunResult:
    """The run's result; after a completed run also the plot, the stage's report.json and the
    end-of-training sample (process 0)."""
    exp, last_eval = r.exp, outcome.last_eval
    if not outcome.interrupted and not last_eval:  # resumed a finished run: report it anyway
        last_eval = evaluate(r, state.params)
    result = RunResult(
        run_dir=r.run_dir, step=outcome.step, interrupted=outcome.interrupted,
        val_loss=last_eval.get("val_loss"), train_loss=last_eval.get("train_loss"),
        tokens_seen=outcome.step * r.stage.tokens_per_step, wall_s=outcome.wall_s,
        tokens_per_s=outcome.tok_s, mfu=outcome.mfu, sample=None,
    )  # fmt: skip
    if outcome.interrupted:
        return result
    sample = sample and exp.eval.sample_tokens > 0 and r.config.head != "reward"
    chat = exp.data.format in ("chat", "preference", "prompts")
    # Every process takes part in gathering the sharded weights; only process 0 samples and plots.
    params = sharding.gather_to_host(state.params) if sample or r.stage.report else None
    if not r.main:
        return result
    from jaxgpt.plot import plot_run

    plot_run(r.run_dir)
    if r.stage.report:
        result.report = write_report(
            r.run_dir, exp, result, params, r.config, r.stage.tokenizer, stage=r.stage.report,
            last_eval=last_eval, **r.stage.report_options,
        )  # fmt: skip
    if sample:
        make_sample = chat_sample if chat else end_of_training_sample
        result.sample = make_sample(params, r.config, r.stage.tokenizer, exp)
    return result


def write_report(
    run_dir: Path, exp: Experiment, result: RunResult, params: Params, config: GPTConfig,
    tokenizer: Tokenizer, *, stage: str = "sft", arithmetic_task: bool | None = None,
    reference: Any = None, last_eval: dict | None = None, data_dir: Path | None = None,
) -> dict:  # fmt: skip
    """The stage's figures in `run_dir/report.json`: the stage ("sft", "dpo", "reward", "ppo"),
    losses, wall time and, for the arithmetic demo, the greedy exact-match
    accuracy on 500 held-out problems (A ≡ B mod 7). A DPO stage adds the reward accuracy and
    margin on the val pairs and, for the demo, the mean KL to the reference on answers to held-out
    prompts (`jaxgpt.dpo.stage_figures`); a reward model, its pairwise accuracy on every val pair
    and, for the demo, on pairs of held-out problems (`jaxgpt.reward_model.stage_figures`); PPO,
    its last evaluation (held-out accuracy on 200 problems, the last rollout's reward and KL)."""
    if arithmetic_task is None:
        arithmetic_task = exp.data.source == "arithmetic"
    report = {
        "stage": stage, "experiment": exp.name, "steps": result.step,
        "train_wall_s": round(result.wall_s, 1), "val_loss": result.val_loss,
        "train_loss": result.train_loss,
    }  # fmt: skip
    if stage == "dpo":
        from jaxgpt import dpo

        report["dpo"] = dpo.stage_figures(
            exp, params, config, tokenizer, reference, last_eval or {},
            arithmetic_task=arithmetic_task,
        )  # fmt: skip
    if stage == "ppo":
        report["ppo"] = dict(last_eval or {})
    if stage == "reward":
        from jaxgpt import reward_model

        report["reward"] = reward_model.stage_figures(
            exp, params, config, tokenizer, data_dir, last_eval or {},
            arithmetic_task=arithmetic_task, run_dir=run_dir,
        )  # fmt: skip
        arithmetic_task = False  # a reward model answers no problems
    if arithmetic_task:
        from jaxgpt import arithmetic

        t0 = time.perf_counter()
        scored = arithmetic.evaluate_model(params, config, tokenizer)
        report["held_out"] = {**scored, "eval_wall_s": round(time.perf_counter() - t0, 1)}
    atomic.write_text(run_dir / "report.json", json.dumps(report, indent=1) + "\n")
    return report


def chat_sample(params: Params, config: GPTConfig, tokenizer: Tokenizer, exp: Experiment) -> str:
    """The model's reply to `eval.sample_prompt` asked as a user turn (until its end-of-turn)."""
    from jaxgpt import chat
    from jaxgpt.decode import generate

    question = exp.eval.sample_prompt.strip() or "Hello!"
    prompt = chat.render_prompt([{"role": "user", "content": question}], tokenizer)
    end = chat.chat_tokens(tokenizer).end
    room = config.block_size - len(prompt)
    if room < 1:
        return f"user: {question}\n(no room left in the context for a reply)"
    out = generate(
        params, config, prompt, min(exp.eval.sample_tokens, room), eos_id=end,
        key=jax.random.key(exp.schedule.seed), temperature=exp.eval.temperature,
        top_k=exp.eval.top_k or None,
    )  # fmt: skip
    reply = tokenizer.decode([t for t in out[len(prompt) :] if t != end])
    return f"user: {question}\nassistant: {reply}"


def checkpoint_step(run_dir: Path) -> int:
    last = checkpoint.latest_step(run_dir)
    return -1 if last is None else last


def lr_of(exp: Experiment) -> optax.Schedule:
    from jaxgpt.optim import lr_schedule

    return lr_schedule(exp.optim, exp.schedule)


def end_of_training_sample(
    params: Params, config: GPTConfig, tokenizer: Tokenizer, exp: Experiment
) -> str:
    """Text sampled from the trained model with the experiment's eval.sample_* settings.

    Uses the KV-cache decoder (`jaxgpt.decode.generate`); a sample longer than the context
    slides the window by the policy documented in `jaxgpt.decode`.
    """
    from jaxgpt.decode import generate

    prompt_ids = sample_prompt_ids(tokenizer, exp)
    out = generate(
        params, config, list(prompt_ids) or [0], exp.eval.sample_tokens, slide=True,
        key=jax.random.key(exp.schedule.seed), temperature=exp.eval.temperature,
        top_k=exp.eval.top_k or None,
    )  # fmt: skip
    return tokenizer.decode(out)
