"""Shared fixtures: tiny models (built here, never downloaded) and jitted functions."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight simulated CPU devices for the multi-device tests (must be set before JAX starts);
# single-device code simply uses the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

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
