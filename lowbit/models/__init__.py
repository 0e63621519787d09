"""Loading models (aliases, local dirs, hub ids) and finding their blocks and linears.

Imported on first use: ``lowbit.models.resolve`` classifies a model name without torch.
"""

import importlib as _importlib

__all__ = ["ALIASES", "block_linears", "find_blocks", "keep_first_blocks", "load_model"]
_LAZY = {"ALIASES": "lowbit.models.aliases", "block_linears": "lowbit.models.adapters",
         "find_blocks": "lowbit.models.adapters", "keep_first_blocks": "lowbit.models.adapters",
         "load_model": "lowbit.models.loading"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lowbit.models' has no attribute {name!r}")
    return getattr(_importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
