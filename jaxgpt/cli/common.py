"""What several subcommands share: turning a MODEL argument into (config, params, tokenizer)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax

from jaxgpt.config import PRESETS, GPTConfig, get_preset
from jaxgpt.errors import CheckpointFormatError
from jaxgpt.params import Params, init_params
from jaxgpt.tokenizer import Tokenizer, get_tokenizer


@dataclass(frozen=True)
class LoadedModel:
    config: GPTConfig
    params: Params
    tokenizer: Tokenizer
    source: str  # a human-readable description of where the weights came from


POLICY_HEADS = ("lm", "lm+value")


def load_model(
    spec: str,
    *,
    seed: int = 0,
    heads: tuple[str, ...] = POLICY_HEADS,
    decoding: bool = False,
    **overrides: Any,
) -> LoadedModel:
    """MODEL as the CLI takes it: a preset name (random weights), a Hugging Face GPT-2 directory
    (or cached hub name), or a jaxgpt training run directory (its latest checkpoint).

    `heads` are the kinds of model the command can use (`GPTConfig.head`): by default a policy,
    so that a reward model given where text is generated is refused in one line. `decoding=True`
    lays the weights out for one-token-at-a-time decoding (`jaxgpt.quantize.decode_layout`).
    """
    model = _load(spec, seed, heads, **overrides)
    if not decoding:
        return model
    from jaxgpt.quantize import decode_layout

    return replace(model, params=decode_layout(model.params))


def _load(spec: str, seed: int, heads: tuple[str, ...], **overrides: Any) -> LoadedModel:
    if spec in PRESETS:
        config = get_preset(spec, **overrides)
        _check_head(config, heads, f"preset {spec!r}")
        tokenizer = get_tokenizer("gpt2")
        # Checked before the warning below, so a refused preset prints one line, not two.
        if config.vocab_size < tokenizer.n_vocab:
            raise CheckpointFormatError(
                f"preset {spec!r} has vocab_size {config.vocab_size}, smaller than GPT-2's "
                f"tokenizer ({tokenizer.n_vocab}); use it through a training run instead"
            )
        print(
            f"WARNING: {spec!r} is a preset with RANDOM weights (seed {seed}); its output is "
            f"noise. Pass a Hugging Face GPT-2 directory or a training run directory for a "
            f"trained model.",
            file=sys.stderr,
        )
        params = init_params(config, jax.random.key(seed))
        return LoadedModel(config, params, tokenizer, f"preset {spec} (random weights)")
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        from jaxgpt.checkpoint import is_run_dir, load_run_for_inference

        if is_run_dir(path):
            config, params, tokenizer, description = load_run_for_inference(path, **overrides)
            _check_head(config, heads, str(path))
            return LoadedModel(config, params, tokenizer, description)
    from jaxgpt.pretrained import load_hf, load_hf_tokenizer

    config, params = load_hf(spec, **overrides)
    _check_head(config, heads, spec)
    # GPT-2's BPE plus the special tokens the directory adds (e.g. the chat tokens of an export).
    tokenizer = load_hf_tokenizer(spec)
    return LoadedModel(config, params, tokenizer, f"Hugging Face checkpoint {spec}")


def _check_head(config: GPTConfig, heads: tuple[str, ...], where: str) -> None:
    """Refuse a kind of model the command cannot use, e.g. a reward model asked for text."""
    if config.head not in heads:
        from jaxgpt.heads import WHAT

        wanted = " or ".join(WHAT[h] for h in heads)
        raise CheckpointFormatError(
            f"{where} is {WHAT[config.head]} (model.head={config.head!r}); this command needs "
            f"{wanted}"
        )
