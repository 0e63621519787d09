"""What quantizing returns: one typed value instead of attributes stuck on the model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from lowbit.activations.install import KINDS, attach
from lowbit.format.codec import Weight, effective_bits
from lowbit.pipeline.report import QuantReport
from lowbit.recipes import Recipe
from lowbit.runtime import packed_module
from lowbit.runtime.build import layer_bias


@dataclass(frozen=True)
class Quantized:
    """``model``: each quantized linear holds its rounded weight as a float tensor (the weight its packed layer
    computes with; evaluation runs this model). ``weights``: every layer's rounding result, what ``lowbit.save``
    packs (empty when the model was onloaded: its blocks went to the checkpoint's shards). ``source``: where the
    float model came from.
    """

    model: nn.Module
    weights: Mapping[str, Weight]
    recipe: Recipe
    source: str | None
    report: QuantReport

    @property
    def effective_bits(self) -> float | None:
        """Stored bits per quantized weight (``None``: no weight was quantized)."""
        return effective_bits(self.weights) if self.weights else None

    def packed(self) -> nn.Module:
        """The model with every quantized linear replaced, in place, by the runtime module that holds its packed
        tensors (as a checkpoint loads): memory falls to the stored bits. Activation quantizers move along."""
        for name, qw in self.weights.items():
            old = self.model.get_submodule(name)
            new = packed_module(qw, layer_bias(old))
            for kind in KINDS:
                if kind in old._modules:
                    attach(new, kind, old._modules[kind], self.model.config)
            self.model.set_submodule(name, new)
        return self.model
