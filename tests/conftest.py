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
