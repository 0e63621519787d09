"""A linear layer that stores BiLLM-style binary weights bit-packed and rebuilds them when it runs.

Bits on disk and in memory: one sign per weight, a residual sign per salient weight, a split bit
per non-salient weight (each packed only where it is used), a salient-column bitmap, and float16
scales per row and block — what :mod:`lowbit.format` declares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.format import LayerSpec
from lowbit.format.codec import decode
from lowbit.rounding.binary import BinaryWeight
from lowbit.runtime.kept_weight import KeptWeight
from lowbit.runtime.qlinear import register


class BinaryLinear(KeptWeight, nn.Module):
    def __init__(self, spec: LayerSpec, bias: bool):
        super().__init__()
        self.spec = spec
        (self.out_features, self.in_features), self.bits = spec.shape, 1
        self.n_salient, self.blocksize = spec.n_salient, spec.blocksize
        register(self, spec.grid_tensors())
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def binary(self) -> BinaryWeight:
        return decode(self.spec, {d.key: getattr(self, d.key) for d in self.spec.grid_tensors()})

    def dense_weight(self) -> torch.Tensor:
        return self.binary().weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_for(x), self.bias.to(x.dtype) if self.bias is not None else None)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, binary, salient columns={self.n_salient}"
