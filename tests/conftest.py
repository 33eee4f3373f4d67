"""Shared fixtures: tiny models (built here, never downloaded) and jitted functions."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
import numpy as np
import pytest

from jaxgpt.model import forward

# Shape of the tiny Hugging Face model the parity tests build: small enough to compile fast, large
# enough to have several heads and layers. Weights are drawn with std 0.2 (not GPT-2's 0.02) so
# the logits are O(1) and a parity check is meaningful.
TINY_HF = dict(
    vocab_size=320, n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2
)


@pytest.fixture(scope="session")
def jit_forward():
    """`forward` jitted once for the whole session (configs are static and hashable)."""
    return jax.jit(forward, static_argnames=("config", "train", "capture"))


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """(transformers GPT2LMHeadModel, its saved directory) for a tiny random GPT-2."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(**TINY_HF, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="session")
def tiny_tokens():
    """A fixed [2, 24] batch of token ids for the tiny model."""
    return np.random.RandomState(0).randint(0, TINY_HF["vocab_size"], size=(2, 24)).astype(np.int32)


# --------------------------------------------------------------------------- training fixtures

TINY_EXPERIMENT = """
from jaxgpt.experiment import *

EXPERIMENT = Experiment(
    name="tiny",
    model=ModelSection(n_layer=2, n_head=2, n_embd=32, block_size=16),
    data=DataSection(dataset="tiny", source={source!r}, tokenizer="char", batch_size=4,
                     split_chunk=1024),
    optim=OptimSection(lr=1e-2, weight_decay=0.1),
    schedule=ScheduleSection(max_steps={steps}, warmup_steps=5, min_lr_ratio=0.1),
    eval=EvalSection(interval={eval_interval}, batches=2, log_interval=1, sample_tokens=20),
    checkpoint=CheckpointSection(interval={ckpt_interval}, keep=2),
)
"""


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A ~24 kB text file: the opening of a bundled play (real text, so the loss can fall)."""
    from jaxgpt.data import corpus_files

    text = corpus_files("shakespeare")[0].read_text(encoding="utf-8")[:24_000]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_documents(tiny_corpus):
    """The tiny corpus as a .jsonl of documents (its speeches, split at blank lines), for GPT-2 BPE
    (whose prepare splits train and val by document)."""
    import json

    speeches = [s for s in tiny_corpus.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    path = tiny_corpus.with_name("tiny.jsonl")
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches), encoding="utf-8")
    return path


@pytest.fixture
def tiny_experiment_file(tmp_path, tiny_corpus):
    """Writes the tiny experiment as a .py file: write(steps, eval_interval, ckpt_interval)."""

    def write(steps=30, eval_interval=15, ckpt_interval=10, name="tiny.py"):
        path = tmp_path / name
        path.write_text(
            TINY_EXPERIMENT.format(
                source=str(tiny_corpus),
                steps=steps,
                eval_interval=eval_interval,
                ckpt_interval=ckpt_interval,
            )
        )
        return path

    return write


# --------------------------------------------------------------------------- RLHF fixtures

TINY_PPO_EXPERIMENT = """
from jaxgpt.experiment import *

EXPERIMENT = Experiment(
    name="tiny_ppo",
    model=ModelSection(block_size=64, init={ref!r}, head="lm+value"),
    data=DataSection(format="prompts", source="arithmetic", batch_size=8),
    optim=OptimSection(lr=1e-3, weight_decay=0.0),
    schedule=ScheduleSection(max_steps={steps}, warmup_steps=0, min_lr_ratio=1.0),
    rl=RLSection(reference={ref!r}, reward_model={rm!r}, gen_tokens=8, epochs=2, minibatches=2),
    eval=EvalSection(interval={steps}, log_interval=2, sample_tokens=8, temperature=0.0,
                     sample_prompt="What is 1 + 2?"),
    checkpoint=CheckpointSection(interval={steps}, keep=2),
)
"""


def arithmetic_chars() -> str:
    """The characters of the arithmetic chat demo's conversations."""
    from jaxgpt import arithmetic

    conversations = arithmetic.training_conversations(300, seed=0)
    return "".join(sorted({ch for c in conversations for m in c for ch in m["content"]}))


def write_tiny_run(path, head="lm", *, chars=None, nan=False, seed=0):
    """A jaxgpt run directory holding a random tiny chat model (2 layers, width 32, context 64)
    with `head`, its tokenizer the demo's characters (or `chars`) plus the chat tokens; with
    `nan` its weights are all NaN. Returns the path."""
    from jaxgpt import chat, checkpoint
    from jaxgpt.experiment import DataSection, Experiment, ModelSection, ScheduleSection
    from jaxgpt.optim import make_optimizer
    from jaxgpt.params import init_params
    from jaxgpt.tokenizer import CharTokenizer
    from jaxgpt.train import init_train_state

    tokenizer = chat.with_chat_tokens(CharTokenizer(chars or arithmetic_chars()))
    model = ModelSection(n_layer=2, n_head=2, n_embd=32, block_size=64, head=head)
    data = DataSection(format="preference" if head == "reward" else "chat", source="arithmetic")
    exp = Experiment(name="tiny_chat", model=model, data=data,
                     schedule=ScheduleSection(max_steps=1, warmup_steps=0))  # fmt: skip
    config = exp.gpt_config(tokenizer.n_vocab)
    params = init_params(config, jax.random.key(seed))
    if nan:
        params = jax.tree.map(lambda x: x * np.nan, params)
    state = init_train_state(params, make_optimizer(exp.optim, exp.schedule))
    path.mkdir(parents=True, exist_ok=True)
    checkpoint.write_run_files(path, exp.to_dict(), config, tokenizer)
    manager = checkpoint.open_manager(path)
    checkpoint.save(manager, 1, state, {"seed": 0, "step": 1, "elapsed_s": 0.0})
    manager.close()
    return path
