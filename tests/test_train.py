"""Training: the pure step (accumulation), a smoke run whose loss falls, fine-tuning from a Hugging
Face directory, and the run's errors."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

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
from jaxgpt.tokenizer import CharTokenizer, get_tokenizer
from jaxgpt.train import (
    TrainingDiverged,
    init_train_state,
    initial_params,
    jit_train_step,
    lr_of,
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


def tree_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


def test_fresh_with_a_bad_init_changes_nothing(trained, tmp_path, capsys):
    """`--fresh` validates the new run (here: a model.init that does not exist) before it touches
    the old one: one line, exit 2, every file of the run byte for byte as it was."""
    _, result, data_root = trained
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)
    before = tree_hashes(run_dir)
    init = f"model.init={tmp_path / 'no-such'}"
    argv = ["train", str(data_root.parent / "tiny.py"), "--out", str(run_dir), "--data-dir",
            str(data_root), "--quiet", "--fresh", "--set", init]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.init" in err, err
    assert tree_hashes(run_dir) == before


def test_fresh_sets_the_old_run_aside(trained, tmp_path, capsys):
    """A valid `--fresh` moves the old checkpoints, metrics and plot to old-<time>/ (with copies
    of the run files, so it still loads), says where, and trains anew."""
    exp, result, data_root = trained
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)
    before = tree_hashes(run_dir)
    new = run(exp, run_dir=run_dir, data_root=data_root, fresh=True, progress=False,
              sample=False)  # fmt: skip
    (aside,) = run_dir.glob("old-*")
    assert f"moved to {aside}" in capsys.readouterr().err
    assert tree_hashes(aside) == before  # every old file, byte for byte
    assert new.step == 30 and checkpoint.latest_step(run_dir) == 30
    steps = [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert steps == list(range(1, 31))  # one run's rows, not two
    assert "step 30" in checkpoint.load_run_for_inference(aside)[3]


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


@pytest.mark.parametrize("cut", ["array data", "metadata", "loader state"])
def test_checkpoint_file_cut_short_is_corrupt(trained, tmp_path, cut):
    """A checkpoint file cut short (a full disk, a copy interrupted) is reported as corrupt."""
    exp, result, data_root = trained
    copy = tmp_path / "run"
    shutil.copytree(result.run_dir, copy)
    ckpt = copy / "checkpoints" / "30"
    target = {
        "array data": max((ckpt / "state").rglob("ocdbt.process_0/d/*"),
                          key=lambda f: f.stat().st_size),
        "metadata": ckpt / "state" / "_METADATA",
        "loader state": ckpt / "loader" / "metadata",
    }[cut]  # fmt: skip
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError, match=r"checkpoints/30 is corrupt"):
        run(exp, run_dir=copy, data_root=data_root, progress=False)


def test_checkpoint_of_another_shape_is_not_called_corrupt(trained, tmp_path):
    """A sound checkpoint that holds another model (here: model.json edited to a wider model)
    is a mismatch that names the array and both shapes — not 'corrupt'."""
    _, result, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(result.run_dir, copy)
    spec = checkpoint.read_json(copy / "model.json")
    (copy / "model.json").write_text(json.dumps({**spec, "n_embd": 64}))
    with pytest.raises(CheckpointFormatError, match=r"different model") as info:
        checkpoint.load_run_for_inference(copy)
    assert "corrupt" not in str(info.value)
    assert re.search(r"is \(\d+,\) float32, this run expects \(\d+,\) float32", str(info.value))


@pytest.mark.parametrize(
    "err, says",
    [
        (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4 GiB"), "out of memory"),
        (MemoryError(), "out of memory"),
        (ValueError("sharding is incompatible with the mesh of 8 devices"), "these devices"),
        (FileNotFoundError(2, "No such file or directory"), "is corrupt"),
        (KeyError("something orbax did not expect"), "could not restore"),
    ],
)
def test_restore_errors_are_told_apart(err, says):
    got = checkpoint._restore_error(err, Path("run/checkpoints/7"))
    assert says in str(got) and "run/checkpoints/7" in str(got)
    assert ("corrupt" in str(got)) == (says == "is corrupt")
    assert isinstance(got, checkpoint.CheckpointCorruptError) == (says == "is corrupt")


def test_nan_loss_sets_aside_the_suspect_checkpoints_and_resumes_with_a_lower_lr(
    trained, tmp_path, capsys
):
    """Metrics at step s come from the weights after step s-1: a NaN loss at step s makes
    checkpoint s-1 suspect. It is moved aside (not deleted), checkpoint s-2 is kept, and the run
    resumes from it with a lower optim.lr and a longer warmup, then finishes."""
    exp, _, data_root = trained
    # Warmup from lr 0: update 1 changes nothing, update 2 (lr 2.5e29) sends the weights past
    # float32's range, so the loss at step 3 is the first that is not finite.
    bad = apply_overrides(
        exp, ["optim.lr=1e30", "optim.grad_clip=0", "schedule.warmup_steps=4",
              "checkpoint.interval=1", "schedule.max_steps=12", "eval.interval=12"],
    )  # fmt: skip
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"at step 3, computed with the weights after "
                       r"step 2.*checkpoint 1 \(from before the bad update\) is kept"):  # fmt: skip
        run(bad, run_dir=run_dir, data_root=data_root, progress=False)
    (aside,) = run_dir.glob("old-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["2"]
    assert checkpoint.latest_step(run_dir) == 1
    old_rows = read_metrics(aside)
    assert [r["step"] for r in old_rows if r["kind"] == "train"] == [1, 2]

    better = apply_overrides(bad, ["optim.lr=1e-2", "schedule.warmup_steps=6"])
    capsys.readouterr()
    result = run(better, run_dir=run_dir, data_root=data_root, progress=False, sample=False)
    err = capsys.readouterr().err
    assert f"resuming {run_dir} from step 1" in err and "optim.lr: 1e+30 → 0.01" in err
    assert result.step == 12 and math.isfinite(result.val_loss)
    rows = read_metrics(run_dir)
    assert [r["kind"] for r in rows[:2]] == ["train", "resume"]
    losses = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    assert sorted(losses) == list(range(1, 13)) and all(map(math.isfinite, losses.values()))
    # Step 2's loss comes from checkpoint 1's weights, which both runs share: it is the same.
    assert losses[2] == old_rows[1]["loss"]
    assert checkpoint.read_json(run_dir / "experiment.json")["optim"]["lr"] == 1e-2


def test_a_resume_may_not_change_the_model_or_data(trained, tmp_path):
    exp, result, data_root = trained
    for key in ["model.dropout=0.1", "data.batch_size=8", "optim.beta2=0.95"]:
        with pytest.raises(ConfigError, match=rf"differs in: {key.split('=')[0]}\).*optim\.lr"):
            run(apply_overrides(exp, [key]), run_dir=result.run_dir, data_root=data_root,
                progress=False)  # fmt: skip


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
    with pytest.raises(InputError, match="cannot be split into train and val"):
        run(small, run_dir=tmp_path / "run", data_root=tmp_path / "data", progress=False)
    missing = apply_overrides(exp, [f"data.source={tmp_path / 'nope'}", "data.dataset=nope"])
    with pytest.raises(InputError, match="does not exist"):
        run(missing, run_dir=tmp_path / "run", data_root=tmp_path / "data", progress=False)


def test_fine_tune_from_hugging_face_dir(tmp_path, tiny_documents):
    """`model.init=<HF dir>`: the run starts from those weights — its first logged loss is
    transformers' loss on the same first batch — and trains them as PyTorch's AdamW would: the
    losses of steps 2-4 are those of the same model trained by torch with the same schedule,
    clipping and decay mask. The saved run loads back."""
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
        data=DataSection(dataset="tiny_bpe", source=str(tiny_documents), tokenizer="gpt2",
                         batch_size=2, split_chunk=1024),
        optim=OptimSection(lr=1e-2),
        schedule=ScheduleSection(max_steps=4, warmup_steps=1),
        eval=EvalSection(interval=4, batches=1, log_interval=1, sample_tokens=4),
        checkpoint=CheckpointSection(interval=4, keep=1),
    )  # fmt: skip
    result = run(exp, run_dir=tmp_path / "run", data_root=tmp_path / "data", progress=False)

    losses = [r["loss"] for r in read_metrics(result.run_dir) if r["kind"] == "train"]
    assert len(losses) == 4
    train_tokens = data.load_tokens(tmp_path / "data" / "tiny_bpe", "train")

    # The reference: torch's AdamW on the transformers model, step for step. Metrics at step s
    # are the loss before update s; update s uses the schedule's lr(s - 1).
    lr_at = lr_of(exp)
    params = list(hf.parameters())  # the tied wte / lm_head weight once
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": exp.optim.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=0.0, betas=(exp.optim.beta1, exp.optim.beta2), eps=exp.optim.eps,
    )  # fmt: skip
    torch_losses = []
    for s in range(4):
        batch_BT1 = torch.tensor(data.get_batch(train_tokens, 2, 16, exp.data.seed, s)[0]).long()
        logits = hf(batch_BT1[:, :-1]).logits
        targets = batch_BT1[:, 1:].ravel()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50257), targets)
        torch_losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, exp.optim.grad_clip)
        for group in opt.param_groups:
            group["lr"] = float(lr_at(s))
        opt.step()
    assert losses[0] == pytest.approx(torch_losses[0], rel=1e-5)  # the imported weights
    # Update 1 has lr 0 (warmup from 0); updates 2 and 3 move the weights by ~lr each.
    assert losses[3] < losses[1] - 0.05  # it learns (the updates are not noise)
    np.testing.assert_allclose(losses, torch_losses, rtol=2e-4)

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
        initial_params(exp, CharTokenizer("abc"))


def test_fine_tune_from_a_run_needs_its_tokenizer(trained, tmp_path):
    """`model.init=<run dir>` on a corpus with another character table would read every id as
    another character: refused before any work, naming the differing characters. The same for
    a char run fine-tuned on GPT-2 tokens."""
    exp, result, _ = trained
    corpus = tmp_path / "upper.txt"
    text = Path(exp.data.source).read_text(encoding="utf-8")
    corpus.write_text(text.upper(), encoding="utf-8")  # no lower-case letters
    other = apply_overrides(
        exp, [f"model.init={result.run_dir}", f"data.source={corpus}", "data.dataset=upper"]
    )
    with pytest.raises(ConfigError, match=r"different character table.*only in the run 'abc"):
        run(other, run_dir=tmp_path / "run", data_root=tmp_path / "data", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    gpt2 = apply_overrides(other, ["data.tokenizer=gpt2"])
    with pytest.raises(ConfigError, match=r"trained with the 'char' tokenizer.*is 'gpt2'"):
        initial_params(gpt2, get_tokenizer("gpt2"))


def test_unencodable_sample_prompt_fails_before_training(trained, tmp_path):
    exp, _, data_root = trained
    odd = apply_overrides(exp, ["eval.sample_prompt=Once ☃ upon ✓"])
    with pytest.raises(ConfigError, match=r"eval.sample_prompt.*'☃', '✓'"):
        run(odd, run_dir=tmp_path / "run", data_root=data_root, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_tasks_are_scored_at_each_evaluation(trained, tmp_path, tiny_experiment_file):
    """`eval.tasks`: a multiple-choice file read once, scored at every evaluation, logged as
    task/<stem>/acc and acc_norm; the last equals `evaluate_choices` on the final weights."""
    from jaxgpt.eval import evaluate_choices, read_choices
    from jaxgpt.plot import _accuracy_series

    lines = [
        {"context": "To be, or not to", "choices": ["be", "see", "go"], "answer": 0},
        {"context": "What is your", "choices": ["name", "lord", "house"], "answer": 1},
        {"context": "Good morrow, good", "choices": ["sir", "knight"], "answer": 0},
        {"context": "ignored: past task_limit", "choices": ["a", "b"], "answer": 1},
    ]
    task = tmp_path / "quiz.jsonl"
    task.write_text("".join(json.dumps(x) + "\n" for x in lines))
    # The settings of `trained` (30 steps, evaluations at 15 and 30): its compiled step is reused.
    exp = load_experiment(
        str(tiny_experiment_file()), [f"eval.tasks=mc:{task}", "eval.task_limit=3"]
    )
    result = run(exp, run_dir=tmp_path / "run", data_root=tmp_path / "data", progress=False,
                 sample=False)  # fmt: skip
    evals = [r for r in read_metrics(result.run_dir) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30]
    config, params, tokenizer, _ = checkpoint.load_run_for_inference(result.run_dir)
    expected = evaluate_choices(params, config, tokenizer, read_choices(task, "mc", limit=3))
    assert evals[-1]["task/quiz/acc"] == expected.acc
    assert evals[-1]["task/quiz/acc_norm"] == expected.acc_norm
    assert all(r["task/quiz/acc"] in (0, 1 / 3, 2 / 3, 1) for r in evals)  # 3 items, not 4
    series = _accuracy_series(evals)  # what loss.png draws on its second axis
    assert list(series) == ["task/quiz/acc", "task/quiz/acc_norm"]
    assert series["task/quiz/acc"] == ([15, 30], [100 * r["task/quiz/acc"] for r in evals])
