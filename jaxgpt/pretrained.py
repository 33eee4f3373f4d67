"""Hugging Face GPT-2 checkpoints ⇄ jaxgpt params.

GPT-2's `Conv1D` stores weights as `[in, out]` — the same layout as jaxgpt's kernels — so no
transposes are needed. One permutation is: GPT-2's fused `c_attn` `[D, 3D]` orders its columns
Q | K | V (each split into heads), jaxgpt groups them by head (see `jaxgpt.params`). The output
head `lm_head` is tied to `wte` and is not stored separately.

Reading needs only `safetensors` (numpy); `pytorch_model.bin` files are read with
`torch.load(weights_only=True)`, which never unpickles arbitrary objects.

With a GPT-2 BPE tokenizer, `save_hf` also writes Hugging Face tokenizer files built from the
BPE files bundled with jaxgpt (`vocab.json`, `merges.txt`, `tokenizer_config.json`,
`special_tokens_map.json`), including any added special tokens (ids after 50256) and, when those
are the chat tokens, the chat template (`jaxgpt.chat.hf_chat_template`); `load_hf_tokenizer`
reads the added tokens back.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import atomic, chat
from jaxgpt.config import GPTConfig
from jaxgpt.errors import CheckpointFormatError, ConfigError, InputError, MissingExtraError
from jaxgpt.params import Params, check_params
from jaxgpt.tokenizer import (
    ENDOFTEXT,
    CharTokenizer,
    Tokenizer,
    added_special_tokens,
    get_tokenizer,
    read_bundled_bpe,
)

# jaxgpt leaf path (within one block) → Hugging Face name suffix (within `h.{i}.`).
_BLOCK_NAMES = {
    ("ln_1", "scale"): "ln_1.weight",
    ("ln_1", "bias"): "ln_1.bias",
    ("attn", "c_attn", "kernel"): "attn.c_attn.weight",
    ("attn", "c_attn", "bias"): "attn.c_attn.bias",
    ("attn", "c_proj", "kernel"): "attn.c_proj.weight",
    ("attn", "c_proj", "bias"): "attn.c_proj.bias",
    ("ln_2", "scale"): "ln_2.weight",
    ("ln_2", "bias"): "ln_2.bias",
    ("mlp", "c_fc", "kernel"): "mlp.c_fc.weight",
    ("mlp", "c_fc", "bias"): "mlp.c_fc.bias",
    ("mlp", "c_proj", "kernel"): "mlp.c_proj.weight",
    ("mlp", "c_proj", "bias"): "mlp.c_proj.bias",
}
_TOP_NAMES = {
    ("wte",): "wte.weight",
    ("wpe",): "wpe.weight",
    ("ln_f", "scale"): "ln_f.weight",
    ("ln_f", "bias"): "ln_f.bias",
}


def _qkv_columns(x: np.ndarray, n_head: int, *, to_hf: bool) -> np.ndarray:
    """Reorder the last axis of c_attn's kernel or bias between GPT-2's `[3, H, K]` (Q | K | V)
    and jaxgpt's `[H, 3, K]` (per head)."""
    lead = x.shape[:-1]
    K = x.shape[-1] // (3 * n_head)
    src = (n_head, 3, K) if to_hf else (3, n_head, K)
    y = np.swapaxes(x.reshape(*lead, *src), -3, -2)
    return np.ascontiguousarray(y.reshape(x.shape))


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> GPTConfig:
    """A `GPTConfig` from a Hugging Face GPT-2 `config.json` dict; non-GPT-2 configs are refused."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise CheckpointFormatError(
            f"config.json has model_type {model_type!r}; jaxgpt loads GPT-2 checkpoints "
            f"(model_type 'gpt2')"
        )
    n_embd = hf.get("n_embd", 768)
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new",)),
        "n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (
            hf.get("scale_attn_by_inverse_layer_idx", False),
            (False,),
        ),
        "reorder_and_upcast_attn": (hf.get("reorder_and_upcast_attn", False), (False,)),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
        "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise CheckpointFormatError(
                f"config.json sets {key}={value!r}; jaxgpt supports only GPT-2's {allowed[0]!r}"
            )
    fields = dict(
        vocab_size=hf.get("vocab_size", 50257),
        block_size=hf.get("n_positions", 1024),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        embd_dropout=hf.get("embd_pdrop", 0.1),
        attn_dropout=hf.get("attn_pdrop", 0.1),
        resid_dropout=hf.get("resid_pdrop", 0.1),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )
    fields.update(overrides)
    try:
        return GPTConfig(**fields)
    except ConfigError as err:
        raise CheckpointFormatError(f"config.json describes an invalid model: {err}") from err


def config_to_hf(config: GPTConfig, eos_token_id: int = 50256) -> dict[str, Any]:
    """The Hugging Face `config.json` dict for a jaxgpt config; `eos_token_id` is where
    `generate` stops: GPT-2's <|endoftext|>, or a chat model's `<|end|>`."""
    if not config.use_bias:
        raise CheckpointFormatError("Hugging Face GPT-2 has biases; cannot export use_bias=False")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "embd_pdrop": config.embd_dropout,
        "attn_pdrop": config.attn_dropout,
        "resid_pdrop": config.resid_dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": eos_token_id,
    }


def _resolve_dir(path: str | Path) -> Path:
    """A local directory, or a hub model name already in the local Hugging Face cache."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointFormatError(f"{p} is a file; expected a GPT-2 model directory")
    name = str(path)
    if name.count("/") <= 1 and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, local_files_only=True))
        except ImportError:
            pass
        except Exception as err:  # not cached: say so rather than trying the network
            raise CheckpointFormatError(
                f"{name!r} is not a directory, nor a model in the local Hugging Face cache "
                f"(jaxgpt never downloads; for a hub model, fetch it first with "
                f"`huggingface-cli download {name}`)"
            ) from err
    raise CheckpointFormatError(f"model directory {str(path)!r} does not exist")


def _import_hf(module: str, what: str) -> Any:
    """`module` imported, or a MissingExtraError naming the `hf` extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{what} needs the {module.split('.')[0]!r} package, which this install lacks; "
            f"install the Hugging Face extra: pip install 'jaxgpt[hf]'"
        ) from err


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    safetensors_file = directory / "model.safetensors"
    bin_file = directory / "pytorch_model.bin"
    if safetensors_file.exists():
        safetensors_numpy = _import_hf("safetensors.numpy", f"reading {safetensors_file}")
        try:
            return safetensors_numpy.load_file(str(safetensors_file))
        except Exception as err:
            raise CheckpointFormatError(f"cannot read {safetensors_file}: {err}") from err
    if bin_file.exists():
        torch = _import_hf("torch", f"reading {bin_file}")

        try:
            state = torch.load(str(bin_file), map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointFormatError(f"cannot read {bin_file} safely: {err}") from err
        return {k: v.float().numpy() for k, v in state.items()}
    raise CheckpointFormatError(
        f"{directory} has no model.safetensors or pytorch_model.bin; not a GPT-2 checkpoint"
    )


def load_hf(path: str | Path, **config_overrides: Any) -> tuple[GPTConfig, Params]:
    """Load a Hugging Face GPT-2 checkpoint → `(GPTConfig, params)`.

    Args:
      path: a directory with `config.json` and `model.safetensors` (or `pytorch_model.bin`), or a
        hub model name (e.g. "gpt2") that is already in the local Hugging Face cache.
      config_overrides: GPTConfig fields to change (e.g. dtype="bfloat16", dropout rates).
    """
    directory = _resolve_dir(path)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise CheckpointFormatError(f"{directory} has no config.json; not a GPT-2 checkpoint")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointFormatError(f"{config_file} is not valid JSON: {err}") from err
    config = config_from_hf(hf_config, **config_overrides)
    tensors = _read_tensors(directory)
    # Checkpoints saved from GPT2LMHeadModel prefix names with "transformer."; GPT2Model's don't.
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}

    def take(name: str) -> jax.Array:
        if name not in tensors:
            raise CheckpointFormatError(f"checkpoint in {directory} lacks tensor {name!r}")
        value = np.asarray(tensors[name], dtype=np.float32)
        if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
            if value.shape[-1] != 3 * config.n_embd:
                raise CheckpointFormatError(
                    f"{directory}: tensors do not match config.json: {name} has shape "
                    f"{value.shape}, expected a last axis of 3 * n_embd = {3 * config.n_embd}"
                )
            value = _qkv_columns(value, config.n_head, to_hf=False)
        return jnp.asarray(value)

    def nest(names: dict[tuple[str, ...], str], prefix: str) -> Params:
        out: Params = {}
        for path_, name in names.items():
            node = out
            for part in path_[:-1]:
                node = node.setdefault(part, {})
            node[path_[-1]] = take(prefix + name)
        return out

    params = nest(_TOP_NAMES, "")
    params["blocks"] = [nest(_BLOCK_NAMES, f"h.{i}.") for i in range(config.n_layer)]
    params = {k: params[k] for k in ("wte", "wpe", "blocks", "ln_f")}
    try:
        check_params(params, config)
    except ValueError as err:
        raise CheckpointFormatError(
            f"{directory}: tensors do not match config.json: {err}"
        ) from err
    return config, params


def save_hf(
    config: GPTConfig,
    params: Params,
    path: str | Path,
    tokenizer: Tokenizer | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a directory that `transformers.GPT2LMHeadModel.from_pretrained` loads.

    A PPO policy's value head (`GPTConfig.head == "lm+value"`) is a training-only part and is
    left out; a reward model is refused.

    With `tokenizer` (GPT-2's BPE, possibly with added special tokens such as the chat tokens),
    also the tokenizer files `transformers.AutoTokenizer.from_pretrained` loads offline.

    The files are written into a temporary sibling directory that is renamed to `path` only when
    complete, so `path` never holds a half-written model. A `path` that exists and is not empty
    is refused unless `overwrite=True` (then it is replaced as a whole, after the new model is
    complete); `path`'s parent is created if needed.
    """
    safetensors_numpy = _import_hf("safetensors.numpy", "saving a Hugging Face checkpoint")
    check_params(params, config)
    if config.head == "reward":
        raise CheckpointFormatError(
            "a reward model (model.head='reward') has no GPT2LMHeadModel form; export a policy"
        )
    tokenizer_files = {} if tokenizer is None else hf_tokenizer_files(tokenizer, config)
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"cannot save a model to {directory}: it is a file")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise InputError(
            f"{directory} is not empty; pass overwrite=True to replace it, or choose a new path"
        )
    tensors: dict[str, np.ndarray] = {}

    def put(tree: Params, names: dict[tuple[str, ...], str], prefix: str) -> None:
        for path_, name in names.items():
            leaf = tree
            for part in path_:
                leaf = leaf[part]
            value = np.asarray(leaf, dtype=np.float32)
            if name.startswith("attn.c_attn."):
                value = _qkv_columns(value, config.n_head, to_hf=True)
            tensors["transformer." + prefix + name] = value

    put(params, _TOP_NAMES, "")
    for i, block_params in enumerate(params["blocks"]):
        put(block_params, _BLOCK_NAMES, f"h.{i}.")
    with atomic.staged_directory(directory, "a model directory") as tmp:
        safetensors_numpy.save_file(
            tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        hf_config = config_to_hf(config, _eos_id(tokenizer))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer is not None:  # what `generate` reads for where to stop
            generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id")}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name, data in tokenizer_files.items():
            (tmp / name).write_bytes(data)
    return directory


def _eos_id(tokenizer: Tokenizer | None) -> int:
    """A chat model's turns end with `<|end|>`; anything else ends with <|endoftext|> (50256)."""
    if tokenizer is not None and set(chat.CHAT_TOKENS) <= tokenizer.special_tokens_set:
        return tokenizer.encode_single_token(chat.END)
    return 50256


def _added_token(content: str) -> dict[str, Any]:
    return dict(
        content=content, lstrip=False, rstrip=False, normalized=False, single_word=False,
        special=True,
    )  # fmt: skip


def hf_tokenizer_files(tokenizer: Tokenizer, config: GPTConfig) -> dict[str, bytes]:
    """The Hugging Face tokenizer files for a GPT-2 BPE tokenizer: file name → contents.

    `vocab.json` and `merges.txt` are the bundled BPE files (GPT-2's own, hash-checked); the
    added special tokens are listed in `tokenizer_config.json` with their ids, and a tokenizer
    with the chat tokens gets the chat template and `<|end|>` as its end-of-sequence token (the
    end of an assistant turn, where generation stops).
    """
    if isinstance(tokenizer, CharTokenizer):
        raise CheckpointFormatError(
            "Hugging Face tokenizer files can be written only for GPT-2's BPE tokenizer, not "
            "the character tokenizer; export without a tokenizer (weights only)"
        )
    if tokenizer.n_vocab > config.vocab_size:
        raise CheckpointFormatError(
            f"the tokenizer has {tokenizer.n_vocab} tokens but the model only {config.vocab_size} "
            f"embedding rows; grow the vocabulary first (jaxgpt.params.grow_vocab)"
        )
    added = [ENDOFTEXT, *added_special_tokens(tokenizer)]
    is_chat = set(chat.CHAT_TOKENS) <= set(added)
    special = dict(
        bos_token=ENDOFTEXT,
        eos_token=chat.END if is_chat else ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
    )
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.block_size,
        **special,
        "added_tokens_decoder": {
            str(tokenizer.encode_single_token(t)): _added_token(t) for t in added
        },
    }
    if is_chat:
        tokenizer_config["chat_template"] = chat.hf_chat_template()
    special_map = {**special, "additional_special_tokens": added[1:]}

    def as_json(value: Any) -> bytes:
        return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    return {
        "vocab.json": read_bundled_bpe("encoder.json"),
        "merges.txt": read_bundled_bpe("vocab.bpe"),
        "tokenizer_config.json": as_json(tokenizer_config),
        "special_tokens_map.json": as_json(special_map),
    }


def load_hf_tokenizer(path: str | Path) -> Tokenizer:
    """GPT-2's BPE with the special tokens a Hugging Face directory adds after id 50256.

    The added tokens are read from `tokenizer_config.json` (`added_tokens_decoder`); a directory
    without one (e.g. a plain GPT-2 checkpoint) gives the plain GPT-2 tokenizer.
    """
    directory = _resolve_dir(path)
    config_file = directory / "tokenizer_config.json"
    if not config_file.exists():
        return get_tokenizer("gpt2")
    try:
        decoder = json.loads(config_file.read_text()).get("added_tokens_decoder", {})
        added = sorted((int(i), entry["content"]) for i, entry in decoder.items())
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointFormatError(f"cannot read added tokens from {config_file}: {err}") from err
    extra = [(i, name) for i, name in added if i > 50256]
    if [i for i, _ in extra] != list(range(50257, 50257 + len(extra))):
        raise CheckpointFormatError(
            f"{config_file} adds tokens at ids {[i for i, _ in extra]}; jaxgpt reads GPT-2's BPE "
            f"with added tokens numbered consecutively from 50257"
        )
    return get_tokenizer("gpt2", special_tokens=[name for _, name in extra])
