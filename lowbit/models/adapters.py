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


def keep_first_blocks(model: PreTrainedModel, n: int) -> PreTrainedModel:
    """Cut ``model`` to its first ``n`` decoder blocks, in place.

    For benchmarks that time or compare rounding on a few blocks of a real model: the cut model
    runs those blocks exactly as the whole model does (per-layer attention types included), so
    a result on the first blocks is the whole model's on them.
    """
    path, blocks = find_blocks(model)
    if not 0 < n <= len(blocks):
        raise LowbitError(f"cannot keep {n} of the {len(blocks)} decoder blocks of {type(model).__name__}")
    model.set_submodule(path, blocks[:n])
    configs = {id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)()) if c}
    for cfg in configs.values():
        cfg.num_hidden_layers = n
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:n]
    return model


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise LowbitError(f"block {type(block).__name__} has no nn.Linear layers to quantize")
    return linears


def weights_left_in_float(block: nn.Module) -> list[str]:
    """Matrices of a block that are not ``nn.Linear`` weights, so no recipe quantizes them: the 3-D expert
    tensors of mixture-of-experts blocks (``mlp.experts.gate_up_proj``), routers, GPT-2's ``Conv1D``."""
    linear = {f"{name}.{p}" for name, m in block.named_modules() if isinstance(m, nn.Linear)
              for p in ("weight", "bias")}
    return [name for name, p in block.named_parameters() if p.dim() >= 2 and name not in linear]
