"""Loading models (aliases, local dirs, hub ids) and finding their blocks and linears."""

from lowbit.models.adapters import block_linears, find_blocks, keep_first_blocks
from lowbit.models.loading import ALIASES, load_model

__all__ = ["ALIASES", "block_linears", "find_blocks", "keep_first_blocks", "load_model"]
