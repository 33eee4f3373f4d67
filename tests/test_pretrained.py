"""Hugging Face GPT-2 checkpoints: load, save, round trip, and refusal of what is not GPT-2."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import pretrained
from jaxgpt.config import get_preset
from jaxgpt.errors import CheckpointFormatError, InputError, MissingExtraError
from jaxgpt.params import init_params
from jaxgpt.pretrained import load_hf, save_hf


def test_load_reads_config(hf_tiny):
    config, params = load_hf(hf_tiny[1])
    assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size) == (2, 4, 64, 320)
    assert config.block_size == 64 and len(params["blocks"]) == 2
    assert config.attn_dropout == pytest.approx(0.1)  # GPT-2's defaults come along for fine-tuning


def test_save_then_transformers_loads_same_logits(tmp_path, tiny_tokens, jit_forward):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = get_preset("tiny", vocab_size=320)
    params = init_params(config, jax.random.key(7))
    save_hf(config, params, tmp_path / "out")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tiny_tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(jit_forward(params, jnp.asarray(tiny_tokens), config))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # ... and loading it back gives the identical pytree.
    config2, params2 = load_hf(tmp_path / "out")
    assert config2.replace(embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0) == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


def test_pytorch_bin_is_read_with_weights_only(hf_tiny, tmp_path):
    torch = pytest.importorskip("torch")
    model, path = hf_tiny
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    _, from_bin = load_hf(tmp_path)
    _, from_st = load_hf(path)
    for a, b in zip(jax.tree.leaves(from_bin), jax.tree.leaves(from_st)):
        np.testing.assert_array_equal(a, b)


def test_missing_directory():
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        load_hf("/nonexistent/model/dir")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointFormatError, match="no config.json"):
        load_hf(tmp_path)


def test_not_gpt2_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointFormatError, match="model_type 'llama'"):
        load_hf(tmp_path)


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        load_hf(tmp_path)


def test_missing_weights(hf_tiny, tmp_path):
    (tmp_path / "config.json").write_text((hf_tiny[1] / "config.json").read_text())
    with pytest.raises(CheckpointFormatError, match="no model.safetensors"):
        load_hf(tmp_path)


def test_weights_that_do_not_match_config(hf_tiny, tmp_path):
    hf = json.loads((hf_tiny[1] / "config.json").read_text())
    hf["n_embd"] = 128
    (tmp_path / "config.json").write_text(json.dumps(hf))
    (tmp_path / "model.safetensors").write_bytes((hf_tiny[1] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointFormatError, match="do not match"):
        load_hf(tmp_path)


def test_truncated_weights(hf_tiny, tmp_path):
    (tmp_path / "config.json").write_text((hf_tiny[1] / "config.json").read_text())
    weights = (hf_tiny[1] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointFormatError, match="cannot read .*model.safetensors"):
        load_hf(tmp_path)


def test_without_the_hf_extra(hf_tiny, tmp_path, monkeypatch):
    """An install without safetensors / torch: one error naming the extra to install."""
    for name in ("safetensors", "safetensors.numpy", "torch"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'jaxgpt\[hf\]'"):
        load_hf(hf_tiny[1])
    (tmp_path / "config.json").write_text((hf_tiny[1] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MissingExtraError, match="'torch' package"):
        load_hf(tmp_path)
    config = get_preset("tiny")
    with pytest.raises(MissingExtraError, match="jaxgpt\\[hf\\]"):
        save_hf(config, init_params(config, jax.random.key(0)), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def _tree(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_save_never_leaves_a_half_written_directory(tmp_path, monkeypatch):
    config = get_preset("tiny")
    p0, p1 = (init_params(config, jax.random.key(i)) for i in (0, 1))
    out = tmp_path / "model"
    save_hf(config, p0, out)
    saved = _tree(out)
    assert set(saved) == {"config.json", "model.safetensors"}
    # A non-empty directory is refused without overwrite=True, and left as it was.
    with pytest.raises(InputError, match="not empty; pass overwrite=True"):
        save_hf(config, p1, out)
    assert _tree(out) == saved
    # A save that fails half-way (here: writing the config) leaves the old model intact.
    monkeypatch.setattr(pretrained, "config_to_hf", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save_hf(config, p1, out, overwrite=True)
    monkeypatch.undo()
    assert _tree(out) == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary siblings
    # overwrite=True replaces it as a whole.
    save_hf(config, p1, out, overwrite=True)
    assert _tree(out) != saved and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    _, loaded = load_hf(out)
    np.testing.assert_array_equal(loaded["wte"], p1["wte"])
    # An empty directory is fine; a file is not.
    (tmp_path / "empty").mkdir()
    save_hf(config, p0, tmp_path / "empty")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="it is a file"):
        save_hf(config, p0, tmp_path / "afile")
