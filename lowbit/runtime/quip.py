"""A QuIP layer at inference: ``y = Uᵀ·dequant(Ŵ)·V·(x / d) + b`` with fast structured transforms.

The codes, scales and zeros are those of a :class:`QuantLinear` in the rotated space; ``U`` and
``V`` are rebuilt from their seeds (randomized Hadamard: ``O(n log n)`` per token; Kronecker:
``O(n(p+q))``) and applied to activations — no dense ``n×n`` matrix is stored or multiplied.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.rounding import QuantizedWeight
from lowbit.runtime.qlinear import QuantLinear
from lowbit.transforms.incoherence import Incoherence


class QuipLinear(nn.Module):
    def __init__(self, inner: QuantLinear, transform: Incoherence, bias: bool):
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features, self.bits = inner.in_features, inner.out_features, inner.bits
        self.register_buffer("in_scale", transform.in_scale.to(torch.float32).clone())
        self.transform = transform.bind(inner.out_features, inner.in_features)  # seeds, U and V
        self.bias = nn.Parameter(torch.zeros(inner.out_features)) if bias else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, group_size: int | None) -> "QuipLinear":
        m = cls(QuantLinear.from_quantized(qw, None, group_size), qw.transform, bias is not None)
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    def quantized(self) -> QuantizedWeight:
        qw = self.inner.quantized()
        qw.transform = Incoherence.from_metadata(self.transform.metadata(), self.in_scale.cpu(), self.out_features)
        return qw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.transform  # U and V only: the scale is the in_scale buffer (it follows .to(device))
        y = t.u.apply_t(self.inner(t.v.apply(x / self.in_scale.to(x.dtype))))
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        t = self.transform
        return f"transform={t.kind}, seeds=({t.seed_out}, {t.seed_in})"
