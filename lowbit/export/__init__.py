"""The packed checkpoint format: integer codes in bytes, float16 scales, a readable config.

Imported on first use: ``lowbit.export.inspect`` reads a checkpoint without torch.
"""

from lowbit.lazy import lazy_attributes

__all__ = ["export_lora", "load_quantized", "save"]
__getattr__, __dir__ = lazy_attributes(__name__, {
    "export_lora": ("lowbit.export.lora", "export_lora"), "load_quantized": ("lowbit.export.load", "load_quantized"),
    "save": ("lowbit.export.write", "save")})
