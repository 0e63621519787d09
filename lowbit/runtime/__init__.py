"""Modules that run quantized weights at inference time."""

from lowbit.runtime.qlinear import QuantLinear

__all__ = ["QuantLinear"]
