"""Training: the pure step (accumulation), a smoke run whose loss falls, fine-tuning from a Hugging
Face directory, and the run's errors."""

from __future__ import annotations

import copy
import math
import re
import shutil

import jax
import numpy as np
import pytest

from jaxgpt import checkpoint, data
from jaxgpt.cli import main
from jaxgpt.cli.common import load_model
from jaxgpt.config import GPTConfig
from jaxgpt.errors import CheckpointFormatError, ConfigError, InputError
from jaxgpt.experiment import (
    CheckpointSection,
    DataSection,
    EvalSection,
    Experiment,
    ModelSection,
    OptimSection,
    ScheduleSection,
    apply_overrides,
    load_experiment,
)
from jaxgpt.objectives import next_token
from jaxgpt.optim import make_optimizer
from jaxgpt.params import init_params
from jaxgpt.plot import read_metrics
from jaxgpt.pretrained import load_hf
from jaxgpt.train import (
    TrainingDiverged,
    init_train_state,
    initial_params,
    jit_train_step,
    make_train_step,
    run,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_corpus):
    """A finished 30-step tiny run: (experiment, result, data root)."""
    from tests.conftest import TINY_EXPERIMENT

    root = tmp_path_factory.mktemp("trained")
    path = root / "tiny.py"
    path.write_text(
        TINY_EXPERIMENT.format(
            source=str(tiny_corpus), steps=30, eval_interval=15, ckpt_interval=10
        )
    )
    exp = load_experiment(str(path))
    result = run(exp, run_dir=root / "run", data_root=root / "data", progress=False)
    return exp, result, root / "data"


def test_smoke_run_loss_decreases(trained):
    _, result, _ = trained
    rows = read_metrics(result.run_dir)
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 30  # log_interval 1
    vocab = GPTConfig.from_dict(checkpoint.read_json(result.run_dir / "model.json")).vocab_size
    assert losses[0] == pytest.approx(math.log(vocab), abs=0.3)  # uniform at init
    assert np.mean(losses[-5:]) < losses[0] - 0.8
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert result.val_loss == evals[1]["val_loss"] and result.tokens_seen == 30 * 4 * 16
    assert (result.run_dir / "loss.png").stat().st_size > 1000
    assert isinstance(result.sample, str) and len(result.sample) >= 20
    assert checkpoint.latest_step(result.run_dir) == 30


def test_run_dir_loads_for_inference(trained):
    _, result, _ = trained
    assert checkpoint.is_run_dir(result.run_dir)
    loaded = load_model(str(result.run_dir))
    assert loaded.config.n_layer == 2 and loaded.tokenizer.name == "char"
    assert "step 30" in loaded.source
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("To be")) == "To be"


def test_loss_and_gradients_match_transformers(hf_tiny, tmp_path):
    """The backward pass (blocks scanned under a rematerialisation policy) against PyTorch's
    autograd through GPT2LMHeadModel: same loss and the same gradient for every parameter."""
    torch = pytest.importorskip("torch")
    model, path = hf_tiny
    config, params = load_hf(path)
    batch_BT1 = np.random.RandomState(1).randint(0, config.vocab_size, (2, 17)).astype(np.int32)
    (loss, _), grads = jax.jit(jax.value_and_grad(next_token, has_aux=True), static_argnums=(2,))(
        params, batch_BT1, config, None
    )

    hf = copy.deepcopy(model)
    tokens = torch.tensor(batch_BT1, dtype=torch.long)
    hf_loss = torch.nn.functional.cross_entropy(
        hf(tokens[:, :-1]).logits.reshape(-1, config.vocab_size), tokens[:, 1:].reshape(-1)
    )
    hf_loss.backward()
    # Write torch's gradients in place of the weights and read them back through load_hf: the
    # same name and layout conversion as the weights themselves (fused QKV columns, tied wte).
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.grad)
    hf.save_pretrained(tmp_path)
    _, hf_grads = load_hf(tmp_path)

    np.testing.assert_allclose(float(loss), hf_loss.item(), rtol=1e-6)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    theirs = jax.tree.leaves(hf_grads)
    assert len(flat) == len(theirs) == 4 + 12 * config.n_layer
    for (where, ours), ref in zip(flat, theirs):
        scale = float(np.abs(ref).max())
        assert scale > 0, jax.tree_util.keystr(where)
        np.testing.assert_allclose(
            ours, ref, atol=1e-5 * scale, rtol=0, err_msg=jax.tree_util.keystr(where)
        )


def test_accumulation_equals_one_big_batch():
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)
    exp = load_experiment("shakespeare_char", ["schedule.warmup_steps=0"])
    opt = make_optimizer(exp.optim, exp.schedule)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    batch = np.random.RandomState(0).randint(0, 50, (2, 3, 9)).astype(np.int32)
    step = jit_train_step(make_train_step(config, opt))
    key = jax.random.key(1)
    copy = jax.tree.map(np.array, params)  # the step donates (deletes) its input state
    a, m_a = step(init_train_state(params, opt), batch, key)
    b, m_b = step(init_train_state(copy, opt), batch.reshape(1, 6, 9), key)
    np.testing.assert_allclose(m_a["loss"], m_b["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_a["grad_norm"], m_b["grad_norm"], rtol=1e-5)
    # Adam's first update is about lr · sign(grad): compare at a fraction of lr (3e-3).
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert int(a.step) == 1


def test_different_config_in_run_dir(trained):
    exp, result, data_root = trained
    other = apply_overrides(exp, ["model.n_layer=1"])
    with pytest.raises(ConfigError, match=r"different config.*model\.n_layer.*--fresh"):
        run(other, run_dir=result.run_dir, data_root=data_root, progress=False)
    assert checkpoint.latest_step(result.run_dir) == 30  # nothing was touched


def test_corrupt_checkpoint(trained, tmp_path):
    exp, result, data_root = trained
    copy = tmp_path / "run"
    shutil.copytree(result.run_dir, copy)
    for f in (copy / "checkpoints" / "30").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.suffix != ".json":
            f.write_bytes(b"\0garbage" * 4)
    with pytest.raises(CheckpointFormatError, match=r"checkpoints/30 is corrupt"):
        run(exp, run_dir=copy, data_root=data_root, progress=False)
    assert (copy / "checkpoints" / "20").is_dir()  # the earlier one is still there


def test_nan_loss_stops_and_keeps_last_good(trained, tmp_path):
    exp, _, data_root = trained
    bad = apply_overrides(
        exp, ["optim.lr=1e12", "optim.grad_clip=0", "schedule.warmup_steps=0",
              "checkpoint.interval=1", "schedule.max_steps=20"],
    )  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"at step (\d+)") as info:
        run(bad, run_dir=tmp_path / "run", data_root=data_root, progress=False)
    bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert checkpoint.latest_step(tmp_path / "run") == bad_step - 1
    rows = read_metrics(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in rows if r["kind"] == "train")


def test_unwritable_run_dir(trained, tmp_path, tiny_experiment_file):
    exp, _, data_root = trained
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="not writable"):
        run(exp, run_dir=blocker / "run", data_root=data_root, progress=False)
    argv = ["train", str(tiny_experiment_file()), "--out", str(blocker / "run"), "--quiet",
            "--data-dir", str(data_root)]  # fmt: skip
    assert main(argv) == 2


def test_corpus_smaller_than_a_block(tmp_path, tiny_experiment_file, capsys):
    exp = load_experiment(str(tiny_experiment_file()))
    (tmp_path / "small.txt").write_text("To be.\n")
    small = apply_overrides(exp, [f"data.source={tmp_path / 'small.txt'}", "data.dataset=small"])
    with pytest.raises(InputError, match="fewer than one block"):
        run(small, run_dir=tmp_path / "run", data_root=tmp_path / "data", progress=False)
    missing = apply_overrides(exp, [f"data.source={tmp_path / 'nope'}", "data.dataset=nope"])
    with pytest.raises(InputError, match="does not exist"):
        run(missing, run_dir=tmp_path / "run", data_root=tmp_path / "data", progress=False)


def test_fine_tune_from_hugging_face_dir(tmp_path, tiny_corpus):
    """`model.init=<HF dir>`: the run starts from those weights — its first logged loss is
    transformers' loss on the same first batch — trains them, and saves a run that loads back."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(1)
    hf_config = transformers.GPT2Config(
        vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=2, initializer_range=0.2
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    exp = Experiment(
        name="finetune",
        model=ModelSection(init=str(tmp_path / "hf"), block_size=16),
        data=DataSection(dataset="tiny_bpe", source=str(tiny_corpus), tokenizer="gpt2",
                         batch_size=2, split_chunk=1024),
        optim=OptimSection(lr=1e-2),
        schedule=ScheduleSection(max_steps=4, warmup_steps=1),
        eval=EvalSection(interval=4, batches=1, log_interval=1, sample_tokens=4),
        checkpoint=CheckpointSection(interval=4, keep=1),
    )  # fmt: skip
    result = run(exp, run_dir=tmp_path / "run", data_root=tmp_path / "data", progress=False)

    losses = [r["loss"] for r in read_metrics(result.run_dir) if r["kind"] == "train"]
    train_tokens = data.load_tokens(tmp_path / "data" / "tiny_bpe", "train")
    first_BT1 = torch.tensor(data.get_batch(train_tokens, 2, 16, exp.data.seed, 0)[0]).long()
    with torch.no_grad():
        logits = hf(first_BT1[:, :-1]).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50257), first_BT1[:, 1:].ravel())
    assert losses[0] == pytest.approx(hf_loss.item(), rel=1e-5)
    assert len(losses) == 4 and losses[-1] != losses[0]

    loaded = load_model(str(result.run_dir))
    assert loaded.tokenizer.name == "gpt2"
    assert (loaded.config.n_embd, loaded.config.vocab_size, loaded.config.block_size) == (
        16, 50257, 32,
    )  # fmt: skip
    _, hf_params = load_hf(tmp_path / "hf")
    assert not np.allclose(loaded.params["wte"], hf_params["wte"])  # trained, not just copied


def test_fine_tune_needs_the_gpt2_tokenizer(hf_tiny, tiny_experiment_file):
    exp = apply_overrides(
        load_experiment(str(tiny_experiment_file())), [f"model.init={hf_tiny[1]}"]
    )
    with pytest.raises(ConfigError, match="data.tokenizer='gpt2'"):
        initial_params(exp, 65, "char")
