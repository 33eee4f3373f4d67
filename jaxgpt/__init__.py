"""jaxgpt: GPT-2 as pure JAX functions.

The prompt's journey, module by module:
  tokenizer.py (text → ids) → model.py (embeddings → blocks → logits; attention in attention.py)
  → sampling.py (logits → next token) → tokenizer.py (ids → text).
"""

from jaxgpt.config import PRESETS, GPTConfig, get_preset
from jaxgpt.errors import (
    CheckpointFormatError,
    ConfigError,
    InputError,
    JaxgptError,
    TokenizerError,
)
from jaxgpt.eval import logprobs
from jaxgpt.model import forward, forward_cached, init_cache
from jaxgpt.params import count_params, init_params, param_table
from jaxgpt.pretrained import load_hf, save_hf
from jaxgpt.sampling import Greedy, RandomSampling, make_sampler
from jaxgpt.tokenizer import CharTokenizer, get_tokenizer

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CharTokenizer",
    "CheckpointFormatError",
    "ConfigError",
    "GPTConfig",
    "Greedy",
    "InputError",
    "JaxgptError",
    "RandomSampling",
    "TokenizerError",
    "count_params",
    "forward",
    "forward_cached",
    "get_preset",
    "get_tokenizer",
    "init_cache",
    "init_params",
    "load_hf",
    "logprobs",
    "make_sampler",
    "param_table",
    "save_hf",
]
