"""Pretraining: the train state, ONE jitted pure train step, evaluation, and the run loop.

    train_step(state, batch_ABT1, key) -> (state, metrics)

is a pure function: `batch_ABT1` holds `A` micro-batches of `[B, T+1]` token windows (A = gradient
accumulation); their gradients are averaged with a `lax.scan`, clipped and applied once by the
optax optimiser. Parameters and optimiser state are float32; the forward pass computes in
`config.dtype`. Dropout keys are `fold_in(key, step)`, so a resumed run draws the same masks.
The step is jitted in exactly one place, `jit_train_step`, with the state's buffers donated; that
is also where shardings go when the step runs on several devices.

`run` drives a whole experiment: data (prepared on first use), init or resume, the loop with
its progress bar and metrics.jsonl, periodic evaluation and checkpoints, and the NaN / Ctrl-C
stops that keep the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jaxgpt import checkpoint, data, flops, sharding
from jaxgpt.config import GPTConfig
from jaxgpt.errors import CheckpointFormatError, ConfigError, InputError, JaxgptError
from jaxgpt.experiment import Experiment, OptimSection, ScheduleSection, diff
from jaxgpt.model import forward
from jaxgpt.optim import make_optimizer
from jaxgpt.params import Params, check_params, init_params
from jaxgpt.tokenizer import Tokenizer

EVAL_SEED = 1234  # eval windows are fixed across evaluations and runs
# Changing these does not change what the model computes, so a run may resume with new values.
# The mesh too: checkpoints restore into whatever layout the resumed run uses.
RESUMABLE_KEYS = ("eval.", "checkpoint.", "parallel.", "name")


class TrainingDiverged(JaxgptError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Params
    opt_state: optax.OptState


# --------------------------------------------------------------------------- the pure step


def loss_fn(
    params: Params, batch_BT1: jax.Array, config: GPTConfig, key: jax.Array | None
) -> jax.Array:
    """Mean next-token cross-entropy (nats) of `forward` on `[B, T+1]` windows."""
    inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
    logits_BTV = forward(params, inputs_BT, config, train=key is not None, key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()


def make_train_step(config: GPTConfig, optimizer: optax.GradientTransformation):
    """The pure `train_step(state, batch_ABT1, key) -> (state, metrics)` for this model."""
    use_dropout = max(config.embd_dropout, config.attn_dropout, config.resid_dropout) > 0
    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state: TrainState, batch_ABT1: jax.Array, key: jax.Array):
        step_key = jax.random.fold_in(key, state.step)
        A = batch_ABT1.shape[0]

        def micro(i: jax.Array, batch_BT1: jax.Array) -> tuple[jax.Array, Params]:
            k = jax.random.fold_in(step_key, i) if use_dropout else None
            return grad_fn(state.params, batch_BT1, config, k)

        if A == 1:
            loss, grads = micro(jnp.int32(0), batch_ABT1[0])
        else:

            def body(carry, xs):
                loss_sum, grad_sum = carry
                loss, grads = micro(*xs)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(
                body, (jnp.float32(0), zeros), (jnp.arange(A), batch_ABT1)
            )
            loss, grads = loss / A, jax.tree.map(lambda g: g / A, grads)

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": grad_norm}

    return train_step


def jit_train_step(train_step, **jit_kwargs):
    """The one place the train step is compiled; the incoming state's buffers are donated."""
    return jax.jit(train_step, donate_argnums=(0,), **jit_kwargs)


@functools.lru_cache(maxsize=8)
def make_eval_loss(config: GPTConfig):
    """Jitted `eval_loss(params, batch_BT1) -> mean cross-entropy` (no dropout)."""
    return jax.jit(lambda params, batch_BT1: loss_fn(params, batch_BT1, config, None))


@functools.lru_cache(maxsize=8)
def compiled_step(config: GPTConfig, optim: OptimSection, schedule: ScheduleSection, mesh: Mesh):
    """(optimizer, jitted train step, state shardings) for these settings on `mesh`.

    The state is laid out by `jaxgpt.sharding`'s partition rules and the batch split over
    data × fsdp; cached so that several runs in one process (a notebook, the tests) compile once.
    """
    optimizer = make_optimizer(optim, schedule)
    state_shardings = sharding.tree_shardings(abstract_train_state(config, optimizer), mesh)
    replicated = NamedSharding(mesh, P())
    step_fn = jit_train_step(
        make_train_step(config, optimizer),
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
    if d.source == data.PREPARED:
        meta = data.load_meta(data_dir)
        if meta.get("tokenizer") != d.tokenizer:
            raise ConfigError(
                f"{data_dir} holds {meta.get('tokenizer')!r} tokens, but the experiment's "
                f"data.tokenizer is {d.tokenizer!r}"
            )
        return data_dir
    want = {
        "version": data.META_VERSION, "tokenizer": d.tokenizer, "source": d.source,
        "val_fraction": d.val_fraction, "split_seed": d.split_seed, "split_chunk": d.split_chunk,
    }  # fmt: skip
    if (data_dir / "meta.json").is_file():
        try:
            if data.split_settings(data.load_meta(data_dir)) == want:
                return data_dir
        except InputError:
            pass
        print(
            f"re-preparing {data_dir}: its settings differ from the experiment's", file=sys.stderr
        )
    print(f"preparing {d.source!r} → {data_dir} ({d.tokenizer} tokens)", file=sys.stderr)
    meta = data.prepare(
        d.source, data_dir, tokenizer=d.tokenizer, val_fraction=d.val_fraction,
        split_seed=d.split_seed, split_chunk=d.split_chunk, progress=progress,
    )  # fmt: skip
    print(
        f"  {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
        f"vocabulary {meta['vocab_size']}",
        file=sys.stderr,
    )
    return data_dir


def initial_params(
    exp: Experiment, vocab_size: int, tokenizer_name: str
) -> tuple[GPTConfig, Params]:
    """(config, params) to start from: scratch, a Hugging Face GPT-2 dir, or a jaxgpt run dir."""
    m = exp.model
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
        config, params, _, _ = checkpoint.load_run_for_inference(m.init, **overrides)
    else:
        from jaxgpt.pretrained import load_hf

        if tokenizer_name != "gpt2":
            raise ConfigError(
                "model.init from a Hugging Face GPT-2 needs data.tokenizer='gpt2', "
                f"got {tokenizer_name!r}"
            )
        config, params = load_hf(m.init, **overrides)
    if config.vocab_size < vocab_size:
        raise ConfigError(
            f"model.init {m.init!r} has vocab_size {config.vocab_size}, smaller than the data's "
            f"{vocab_size}"
        )
    if m.block_size > config.block_size:
        raise ConfigError(
            f"model.block_size {m.block_size} exceeds {m.init!r}'s context {config.block_size}"
        )
    return config, params


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

    On several devices the step runs on the mesh `exp.parallel.mesh`; in a multi-process run each
    process reads its share of every batch and only process 0 writes metrics, plots and bars.
    """
    run_dir, data_root = Path(run_dir), Path(data_root)
    main = sharding.is_main_process()
    progress = progress and main
    mesh = sharding.make_mesh(exp.parallel.mesh)  # a bad mesh fails before any work is done
    # Process 0 probes the (shared) run directory and prepares the data; the others wait for it.
    sharding.main_first(lambda: _check_writable(run_dir), others=False)
    data_dir = sharding.main_first(lambda: ensure_data(exp, data_root, progress=progress))
    meta = data.load_meta(data_dir)
    train_tokens = data.load_tokens(data_dir, "train")
    val_tokens = data.load_tokens(data_dir, "val")
    T, B, A = exp.model.block_size, exp.data.batch_size, exp.optim.grad_accum
    data.check_fits(train_tokens, T, "train")
    data.check_fits(val_tokens, T, "val")
    tokenizer = data.tokenizer_from_meta(meta)

    # ---- resume or start
    last = checkpoint.latest_step(run_dir)
    if fresh:
        shutil.rmtree(run_dir / checkpoint.CHECKPOINT_DIR, ignore_errors=True)
        (run_dir / checkpoint.METRICS_FILE).unlink(missing_ok=True)
        last = None
    if last is not None:
        stored = Experiment.from_dict(checkpoint.read_json(run_dir / checkpoint.EXPERIMENT_FILE))
        changed = [k for k in diff(stored, exp) if not k.startswith(RESUMABLE_KEYS)]
        if changed:
            raise ConfigError(
                f"run directory {run_dir} holds a run of a different config (differs in: "
                f"{', '.join(changed)}); pass --fresh to start over there, or --out NEW_DIR"
            )
        config = GPTConfig.from_dict(checkpoint.read_json(run_dir / checkpoint.MODEL_FILE))
        params = None
    else:
        config, params = initial_params(exp, tokenizer.n_vocab, meta["tokenizer"])
        check_params(params, config)
    sharding.check_parallelism(config, mesh, B)
    optimizer, step_fn, state_shardings = compiled_step(config, exp.optim, exp.schedule, mesh)
    abstract_state = abstract_train_state(config, optimizer, state_shardings)
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
    manager = checkpoint.open_manager(run_dir, keep=exp.checkpoint.keep)
    elapsed_before = 0.0
    if last is not None:
        state, loader = checkpoint.restore(manager, last, abstract_state)
        if loader.get("seed") != exp.data.seed or loader.get("step") != int(state.step):
            raise CheckpointFormatError(
                f"checkpoint {last} in {run_dir} has an inconsistent loader state {loader}"
            )
        elapsed_before = float(loader.get("elapsed_s", 0.0))
        print(f"resuming {run_dir} from step {last}", file=sys.stderr)
    else:
        init = jax.jit(init_train_state, static_argnums=1, out_shardings=state_shardings)
        state = init(params, optimizer)
        if main:
            checkpoint.write_run_files(run_dir, exp.to_dict(), config, tokenizer)

    # ---- compiled functions and fixed eval batches
    eval_loss = make_eval_loss(config)
    rows = sharding.host_rows(B)  # this process reads only its share of every batch
    eval_sharding = sharding.batch_sharding(mesh)
    train_sharding = sharding.batch_sharding(mesh, accum=True)

    def eval_batch(tokens: np.ndarray, i: int) -> jax.Array:
        local = data.get_batch(tokens, B, T, EVAL_SEED, i, rows=rows)[0]
        return sharding.put_batch(local, eval_sharding, (B, T + 1))

    eval_batches = {
        split: [eval_batch(tok, i) for i in range(exp.eval.batches)]
        for split, tok in (("train", train_tokens), ("val", val_tokens))
    }
    dropout_key = jax.random.fold_in(jax.random.key(exp.schedule.seed), 1)
    schedule = lr_of(exp)

    def evaluate(params: Params) -> dict[str, float]:
        settled = sharding.settled  # one program at a time where collectives need it
        losses = {s: [settled(eval_loss(params, b)) for b in bs] for s, bs in eval_batches.items()}
        return {f"{s}_loss": float(np.mean(jax.device_get(v))) for s, v in losses.items()}

    flops_per_token = flops.flops_per_token(config, T, training=True)
    peak, _ = flops.peak_flops(config.dtype)

    metrics_path = run_dir / checkpoint.METRICS_FILE
    start_step = int(state.step)
    if main:
        kept_rows = _read_metrics(metrics_path, start_step)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept_rows))
    metrics_file = metrics_path.open("a") if main else None

    def log(row: dict) -> None:
        if main:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    step = start_step
    pending: list[tuple[int, dict]] = []
    last_eval: dict[str, float] = {}
    last_loss = None
    tok_s = mfu = None
    t_start = time.perf_counter()
    t_window, window_steps, window_compiles = t_start, 0, step == start_step
    interrupted = False

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def flush() -> None:
        """Fetch the pending steps' metrics (one host sync), stop on NaN, write a log row."""
        nonlocal pending, t_window, window_steps, window_compiles, last_loss, tok_s, mfu
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched):
            if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                good = checkpoint.latest_step(run_dir)
                kept = (
                    f"the last good checkpoint (step {good}) is kept"
                    if good
                    else "no checkpoint was saved yet"
                )
                raise TrainingDiverged(
                    f"loss became {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step "
                    f"{s}; training stopped and {kept} in {run_dir}. Lower optim.lr or raise "
                    f"schedule.warmup_steps"
                )
        now = time.perf_counter()
        seconds = now - t_window
        if not window_compiles and seconds > 0:
            tok_s = window_steps * exp.tokens_per_step / seconds
            mfu = tok_s * flops_per_token / peak
        last_loss = float(np.mean([m["loss"] for m in fetched]))
        s = pending[-1][0]
        log({
            "kind": "train", "step": s, "loss": last_loss,
            "grad_norm": float(fetched[-1]["grad_norm"]), "lr": float(schedule(s - 1)),
            "tokens": s * exp.tokens_per_step, "elapsed_s": round(elapsed(), 3),
            "tok_per_s": tok_s, "mfu": mfu,
        })  # fmt: skip
        pending, t_window, window_steps, window_compiles = [], now, 0, False

    def save(with_metrics: bool) -> None:
        flush()
        loader = {"seed": exp.data.seed, "step": step, "elapsed_s": elapsed()}
        checkpoint.save(manager, step, state, loader, dict(last_eval) if with_metrics else None)

    bar = tqdm(
        total=exp.schedule.max_steps, initial=step, desc="train", unit="step",
        disable=not progress, dynamic_ncols=True,
    )  # fmt: skip
    try:
        with _StopFlag() as stop:
            while step < exp.schedule.max_steps:
                if stop.should_stop(step, every=exp.eval.log_interval):
                    interrupted = True
                    break
                local = data.get_batch(train_tokens, B, T, exp.data.seed, step, accum=A, rows=rows)
                batch = sharding.put_batch(local, train_sharding, (A, B, T + 1))
                with jax.set_mesh(mesh):  # activates the model's sharding hints
                    state, metrics = sharding.settled(step_fn(state, batch, dropout_key))
                step += 1
                window_steps += 1
                pending.append((step, metrics))
                last_step = step == exp.schedule.max_steps
                if step % exp.eval.log_interval == 0 or last_step:
                    flush()
                    bar.update(step - bar.n)
                    postfix = {"loss": f"{last_loss:.4f}"}
                    if tok_s:
                        postfix.update(tok_s=f"{tok_s:,.0f}", mfu=f"{100 * mfu:.1f}%")
                    if last_eval:
                        postfix["val"] = f"{last_eval['val_loss']:.4f}"
                    bar.set_postfix(postfix, refresh=True)
                evaluated = step % exp.eval.interval == 0 or last_step
                if evaluated:
                    flush()
                    t0 = time.perf_counter()
                    last_eval = evaluate(state.params)
                    tokens = step * exp.tokens_per_step
                    log({"kind": "eval", "step": step, **last_eval, "tokens": tokens,
                         "elapsed_s": round(elapsed(), 3)})  # fmt: skip
                    t_window += time.perf_counter() - t0  # eval time is not training throughput
                if step % exp.checkpoint.interval == 0 or last_step:
                    save(with_metrics=evaluated)
                    t_window = time.perf_counter()
            if interrupted and step > checkpoint_step(run_dir):
                save(with_metrics=False)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        manager.close()

    if not interrupted and not last_eval:  # resumed a finished run: report its losses anyway
        last_eval = evaluate(state.params)
    result = RunResult(
        run_dir=run_dir, step=step, interrupted=interrupted,
        val_loss=last_eval.get("val_loss"), train_loss=last_eval.get("train_loss"),
        tokens_seen=step * exp.tokens_per_step, wall_s=elapsed(), tokens_per_s=tok_s, mfu=mfu,
        sample=None,
    )  # fmt: skip
    if interrupted:
        return result
    sample = sample and exp.eval.sample_tokens > 0
    # Every process takes part in gathering the sharded weights; only process 0 samples and plots.
    params = sharding.gather_to_host(state.params) if sample else None
    if not main:
        return result
    from jaxgpt.plot import plot_run

    plot_run(run_dir)
    if sample:
        result.sample = end_of_training_sample(params, config, tokenizer, exp)
    return result


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

    Uses the KV-cache decoder (`jaxgpt.decode.generate`). A sample longer than the context is
    made in chunks of half a block, each continuing from the last half block of text.
    """
    from jaxgpt.decode import generate

    prompt = exp.eval.sample_prompt
    if tokenizer.eot_token is not None and not prompt:
        prompt_ids = [tokenizer.eot_token]
    else:
        try:
            prompt_ids = tokenizer.encode(prompt)
        except JaxgptError:
            prompt_ids = tokenizer.encode(tokenizer.decode([0]))
    chunk = max(1, config.block_size // 2)
    key = jax.random.key(exp.schedule.seed)
    new_ids: list[int] = []
    while len(new_ids) < exp.eval.sample_tokens:
        n = min(chunk, exp.eval.sample_tokens - len(new_ids))
        context = (list(prompt_ids) + new_ids)[-(config.block_size - chunk) :] or [0]
        out = generate(
            params, config, context, n, key=jax.random.fold_in(key, len(new_ids)),
            temperature=exp.eval.temperature, top_k=exp.eval.top_k or None,
        )  # fmt: skip
        new_ids += list(out[len(context) :])
    return tokenizer.decode(list(prompt_ids) + new_ids)
