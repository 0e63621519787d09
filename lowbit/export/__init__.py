"""The packed checkpoint format: integer codes in bytes, float16 scales, a readable config."""

from lowbit.export.load import load_quantized
from lowbit.export.lora import export_lora
from lowbit.export.save import save

__all__ = ["export_lora", "load_quantized", "save"]
