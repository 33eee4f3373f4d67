"""jaxgpt: GPT-2 as pure JAX functions.

The prompt's journey, module by module:
  tokenizer.py (text → ids) → model.py (embeddings → blocks → logits; attention in attention.py)
  → sampling.py (logits → next token) → decode.py (KV cache, the generation loop)
  → tokenizer.py (ids → text).
  chat.py renders conversations as (ids, training mask); objectives.py holds the losses.

Everything the README and docs/ show users is importable from here (`jaxgpt.generate`,
`jaxgpt.forward`, ...), except two modules used by their own name: `jaxgpt.train` (it imports
orbax, slow to load) and `jaxgpt.trace` (its `trace` function would hide the module).
"""

from jaxgpt.cli.common import LoadedModel, load_model
from jaxgpt.config import PRESETS, GPTConfig, get_preset
from jaxgpt.data import get_batch, prepare
from jaxgpt.decode import generate
from jaxgpt.errors import (
    ChatFormatError,
    CheckpointFormatError,
    ConfigError,
    InputError,
    JaxgptError,
    MissingExtraError,
    TokenizerError,
)
from jaxgpt.eval import logprobs
from jaxgpt.experiment import Experiment, load_experiment
from jaxgpt.flops import flops_per_token
from jaxgpt.model import forward, forward_cached, init_cache
from jaxgpt.params import count_params, init_params, param_table
from jaxgpt.pretrained import load_hf, save_hf
from jaxgpt.sampling import Greedy, RandomSampling, make_sampler
from jaxgpt.tokenizer import CharTokenizer, get_tokenizer

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CharTokenizer",
    "ChatFormatError",
    "CheckpointFormatError",
    "ConfigError",
    "Experiment",
    "GPTConfig",
    "Greedy",
    "InputError",
    "JaxgptError",
    "LoadedModel",
    "MissingExtraError",
    "RandomSampling",
    "TokenizerError",
    "count_params",
    "flops_per_token",
    "forward",
    "forward_cached",
    "generate",
    "get_batch",
    "get_preset",
    "get_tokenizer",
    "init_cache",
    "init_params",
    "load_experiment",
    "load_hf",
    "load_model",
    "logprobs",
    "make_sampler",
    "param_table",
    "prepare",
    "save_hf",
]
