"""A quantized layer plus its low-rank error branch: ``y = inner(x) + A·(B·x)`` (LoRA-style).

``inner`` is any packed layer (:class:`QuantLinear`, :class:`QuipLinear`); ``A`` (out×r) and
``B`` (r×in) are float16 buffers, ``r·(in+out)`` extra multiply-adds per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.format import LayerSpec
from lowbit.rounding import QuantizedWeight
from lowbit.runtime.qlinear import register
from lowbit.transforms.lowrank import LowRank


class LowRankLinear(nn.Module):
    def __init__(self, inner: nn.Module, spec: LayerSpec):
        super().__init__()
        self.inner, self.spec = inner, spec
        self.in_features, self.out_features, self.bits = inner.in_features, inner.out_features, inner.bits
        register(self, spec.lowrank_tensors())  # a, b

    def quantized(self) -> QuantizedWeight:
        qw = self.inner.quantized()
        qw.lowrank = LowRank(self.a.clone(), self.b.clone())
        return qw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + F.linear(F.linear(x, self.b.to(x.dtype)), self.a.to(x.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.a.shape[1]}"
