"""Rounding algorithms: turn a weight matrix (+ Hessian) into codes on a grid."""

from lowbit.rounding.gptq import gptq_quantize
from lowbit.rounding.quantized import QuantizedWeight, proxy_loss
from lowbit.rounding.rtn import rtn_quantize

__all__ = ["QuantizedWeight", "gptq_quantize", "proxy_loss", "rtn_quantize"]
