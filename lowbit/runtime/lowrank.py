"""A quantized layer plus its low-rank error branch: ``y = inner(x) + A·(B·x)`` (LoRA-style).

``inner`` is any packed layer (:class:`QuantLinear`, :class:`QuipLinear`); ``A`` (out×r) and
``B`` (r×in) are float16 buffers, ``r·(in+out)`` extra multiply-adds per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.rounding import QuantizedWeight
from lowbit.transforms.lowrank import LowRank


class LowRankLinear(nn.Module):
    def __init__(self, inner: nn.Module, rank: int):
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features, self.bits = inner.in_features, inner.out_features, inner.bits
        self.register_buffer("a", torch.zeros(inner.out_features, rank, dtype=torch.float16))
        self.register_buffer("b", torch.zeros(rank, inner.in_features, dtype=torch.float16))

    @classmethod
    def wrap(cls, inner: nn.Module, lowrank: LowRank) -> "LowRankLinear":
        m = cls(inner, lowrank.rank)
        m.a.copy_(lowrank.a)
        m.b.copy_(lowrank.b)
        return m

    def quantized(self) -> QuantizedWeight:
        qw = self.inner.quantized()
        qw.lowrank = LowRank(self.a.clone(), self.b.clone())
        return qw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + F.linear(F.linear(x, self.b.to(x.dtype)), self.a.to(x.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.a.shape[1]}"
