"""The packed checkpoint format: integer codes in bytes, float16 scales, a readable config.

Imported on first use: ``lowbit.export.inspect`` reads a checkpoint without torch.
"""

import importlib as _importlib

__all__ = ["export_lora", "load_quantized", "save"]
_LAZY = {"export_lora": "lowbit.export.lora", "load_quantized": "lowbit.export.load", "save": "lowbit.export.write"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lowbit.export' has no attribute {name!r}")
    return getattr(_importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
