"""jaxgpt's accelerator kernels (Pallas): flash attention with its backward, and decode attention.

They compute exactly `jaxgpt.attention.reference_attention`; pick them with
`GPTConfig(attention="pallas")` (see `jaxgpt.attention.multi_head_attention` and docs/kernels.md).
"""

from jaxgpt.kernels.decode_attention import DecodeBlocks, decode_attention
from jaxgpt.kernels.flash_attention import BlockSizes, default_block_sizes, flash_attention

__all__ = [
    "BlockSizes",
    "DecodeBlocks",
    "decode_attention",
    "default_block_sizes",
    "flash_attention",
]
