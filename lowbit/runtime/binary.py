"""A linear layer that stores BiLLM-style binary weights bit-packed and rebuilds them when it runs.

Bits on disk and in memory: one sign per weight, a residual sign per salient weight, a split bit
per non-salient weight (each packed only where it is used), a salient-column bitmap, and float16
scales per row and block — what :meth:`BinaryWeight.storage_bits` counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.grids import pack_codes, packed_nbytes, unpack_codes
from lowbit.rounding.binary import BinaryWeight
from lowbit.runtime.kept_weight import KeptWeight


class BinaryLinear(KeptWeight, nn.Module):
    def __init__(self, in_features: int, out_features: int, n_salient: int, n_blocks: int, blocksize: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.n_salient, self.blocksize, self.bits = n_salient, blocksize, 1
        rows, cols = out_features, in_features
        self.register_buffer("signs", torch.zeros(packed_nbytes(rows * cols, 1), dtype=torch.uint8))
        self.register_buffer("residual", torch.zeros(packed_nbytes(rows * n_salient, 1), dtype=torch.uint8))
        self.register_buffer("split", torch.zeros(packed_nbytes(rows * (cols - n_salient), 1), dtype=torch.uint8))
        self.register_buffer("salient", torch.zeros(packed_nbytes(cols, 1), dtype=torch.uint8))
        self.register_buffer("alphas", torch.zeros(rows, n_blocks, 4, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_binary(cls, bw: BinaryWeight, bias: torch.Tensor | None) -> "BinaryLinear":
        rows, cols = bw.shape
        sal = bw.salient
        m = cls(cols, rows, int(sal.sum()), bw.alphas.shape[1], bw.blocksize, bias is not None)
        m.signs.copy_(pack_codes(bw.signs, 1))
        m.residual.copy_(pack_codes(bw.residual[:, sal], 1))
        m.split.copy_(pack_codes(bw.split[:, ~sal], 1))
        m.salient.copy_(pack_codes(sal, 1))
        m.alphas.copy_(bw.alphas.to(torch.float16))
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    def binary(self) -> BinaryWeight:
        rows, cols, n_sal = self.out_features, self.in_features, self.n_salient
        sal = unpack_codes(self.salient, 1, cols).bool()
        residual = torch.ones(rows, cols, dtype=torch.bool, device=sal.device)
        residual[:, sal] = unpack_codes(self.residual, 1, rows * n_sal).bool().view(rows, n_sal)
        split = torch.zeros(rows, cols, dtype=torch.bool, device=sal.device)
        split[:, ~sal] = unpack_codes(self.split, 1, rows * (cols - n_sal)).bool().view(rows, cols - n_sal)
        signs = unpack_codes(self.signs, 1, rows * cols).bool().view(rows, cols)
        return BinaryWeight(signs, residual, split, sal, self.alphas, self.blocksize)

    def dense_weight(self) -> torch.Tensor:
        return self.binary().weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_for(x), self.bias.to(x.dtype) if self.bias is not None else None)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, binary, salient columns={self.n_salient}"
