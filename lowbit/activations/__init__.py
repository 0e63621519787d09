"""Activation and KV-cache fake quantization: quantizers, range observers, channel clustering."""

from lowbit.activations.clustering import cluster_labels, head_labels, permutation_from_labels
from lowbit.activations.observer import RangeObserver
from lowbit.activations.quantizer import ActQuantizer, fake_quantize

__all__ = ["ActQuantizer", "RangeObserver", "cluster_labels", "fake_quantize", "head_labels", "permutation_from_labels"]
