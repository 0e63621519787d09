"""The block-by-block driver: capture, observe, round, propagate, checkpoint."""

from lowbit.pipeline.driver import quantize_model
from lowbit.pipeline.report import LayerReport, QuantReport
from lowbit.pipeline.result import Quantized

__all__ = ["LayerReport", "QuantReport", "Quantized", "quantize_model"]
