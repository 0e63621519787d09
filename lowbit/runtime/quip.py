"""A QuIP layer at inference: ``y = Uᵀ·dequant(Ŵ)·V·(x / d) + b`` with fast structured transforms.

The codes, scales and zeros are those of a :class:`QuantLinear` in the rotated space; ``U`` and
``V`` are rebuilt from their seeds (randomized Hadamard: ``O(n log n)`` per token; Kronecker:
``O(n(p+q))``) and applied to activations — no dense ``n×n`` matrix is stored or multiplied.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lowbit.format import LayerSpec
from lowbit.rounding import QuantizedWeight
from lowbit.runtime.qlinear import QuantLinear, register
from lowbit.transforms.incoherence import Incoherence


class QuipLinear(nn.Module):
    """``spec``'s QuIP part around its grid part ``inner``; the bias is applied here, in the original basis."""

    def __init__(self, inner: QuantLinear, spec: LayerSpec, bias: bool):
        super().__init__()
        self.inner, self.spec = inner, dataclasses.replace(spec, lowrank_rank=0)
        self.in_features, self.out_features, self.bits = inner.in_features, inner.out_features, inner.bits
        register(self, spec.quip_tensors())  # in_scale
        # U and V, rebuilt from the seeds; the scale is the in_scale buffer (it follows .to(device))
        self.transform = Incoherence.from_metadata(spec.incoherence, torch.ones(self.in_features), self.out_features)
        self.bias = nn.Parameter(torch.zeros(inner.out_features)) if bias else None

    def quantized(self) -> QuantizedWeight:
        qw = self.inner.quantized()
        qw.transform = Incoherence.from_metadata(self.transform.metadata(), self.in_scale.cpu(), self.out_features)
        return qw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.transform
        y = t.u.apply_t(self.inner(t.v.apply(x / self.in_scale.to(x.dtype))))
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        t = self.transform
        return f"transform={t.kind}, seeds=({t.seed_out}, {t.seed_in})"
