"""K/V-cache quantization at the one place every architecture hands keys and values over:
``transformers``' attention interface. Keys arrive after RoPE (what a cache stores), shaped
``(batch, kv_heads, seq, head_dim)``, before grouped-query heads are repeated.

The model's attention implementation is switched to ``"lowbit"``, which runs each layer's
``k_quant``/``v_quant`` (and calibration observers, when present) and then SDPA.
"""

from __future__ import annotations

from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "lowbit"


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    observe = getattr(module, "lowbit_kv_observe", None)
    if observe is not None:
        observe(key, value)
    if hasattr(module, "k_quant"):
        key = module.k_quant(key)
    if hasattr(module, "v_quant"):
        value = module.v_quant(value)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_lowbit_attention(config) -> None:
    """Route every attention layer sharing ``config`` through :func:`_attention`."""
    if config._attn_implementation != NAME:
        config._attn_implementation = NAME
