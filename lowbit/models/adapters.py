"""Where a causal LM keeps its transformer blocks and the linear layers inside them.

Generic over Hugging Face decoder-only models (Llama, Qwen2, Mistral, Gemma, OPT, …): the
blocks are the ``ModuleList`` with ``config.num_hidden_layers`` entries; the quantizable layers
are the ``nn.Linear`` modules inside a block. ``lm_head`` and embeddings stay in full precision.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from lowbit.errors import LowbitError


def find_blocks(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """Return the dotted path and the ``ModuleList`` of decoder blocks."""
    n = getattr(model.config, "num_hidden_layers", None)
    if n is None and hasattr(model.config, "get_text_config"):
        n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and len(module) > 0:
            return path, module
    raise LowbitError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise LowbitError(f"block {type(block).__name__} has no nn.Linear layers to quantize")
    return linears
