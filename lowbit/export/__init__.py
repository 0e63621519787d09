"""The packed checkpoint format: integer codes in bytes, float16 scales, a readable config."""

from lowbit.export.load import load_quantized
from lowbit.export.save import save

__all__ = ["load_quantized", "save"]
