"""Loading models (aliases, local dirs, hub ids) and finding their blocks and linears.

Imported on first use: ``lowbit.models.resolve`` classifies a model name without torch.
"""

from lowbit.lazy import lazy_attributes

__all__ = ["ALIASES", "block_linears", "find_blocks", "keep_first_blocks", "load_model"]
__getattr__, __dir__ = lazy_attributes(__name__, {
    "ALIASES": ("lowbit.models.aliases", "ALIASES"), "block_linears": ("lowbit.models.adapters", "block_linears"),
    "find_blocks": ("lowbit.models.adapters", "find_blocks"),
    "keep_first_blocks": ("lowbit.models.adapters", "keep_first_blocks"),
    "load_model": ("lowbit.models.loading", "load_model")})
