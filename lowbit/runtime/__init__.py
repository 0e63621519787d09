"""Modules that run quantized weights at inference time."""

from lowbit.runtime.binary import BinaryLinear
from lowbit.runtime.build import empty_module, packed_module
from lowbit.runtime.kept_weight import KeptWeight, keep_dequantized
from lowbit.runtime.lowrank import LowRankLinear
from lowbit.runtime.qlinear import QuantLinear
from lowbit.runtime.quip import QuipLinear

__all__ = ["BinaryLinear", "KeptWeight", "LowRankLinear", "QuantLinear", "QuipLinear", "empty_module",
           "keep_dequantized", "packed_module"]
