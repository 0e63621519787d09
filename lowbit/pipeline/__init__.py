"""The block-by-block driver: capture, observe, round, propagate, checkpoint."""

from lowbit.pipeline.driver import quantize_model
from lowbit.pipeline.report import LayerReport, QuantReport

__all__ = ["LayerReport", "QuantReport", "quantize_model"]
