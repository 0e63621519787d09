"""A linear layer that stores packed integer codes and dequantizes them when it runs.

Memory holds ``bits/8`` bytes per weight plus float16 scales and packed zeros; the dequantized
matrix exists only during the call (CPU path in plain torch). Grids whose zero point is not an
integer (QuIP's midrise RMS grid: ``maxq/2``) keep float16 ``zeros`` instead of packed ones.
SpQR-style outliers are a sparse list (int32 flat index, float16 value) written over the grid values;
SpQR's quantized scales are packed codes with a float16 minimum and step per 16 rows and group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.grids import natural_group_index, pack_codes, packed_nbytes, unpack_codes
from lowbit.grids.stats import ScaleStats, n_chunks
from lowbit.rounding import QuantizedWeight
from lowbit.rounding.quantized import SparseOutliers
from lowbit.runtime.kept_weight import KeptWeight
from lowbit.runtime.kernels import serves


class QuantLinear(KeptWeight, nn.Module):
    # a CPU kernel back-end (lowbit.runtime.kernels), set at load time; a plain attribute, never saved
    kernel = None

    def __init__(self, in_features: int, out_features: int, bits: int, n_groups: int,
                 bias: bool, has_g_idx: bool, group_size: int | None, float_zeros: bool = False,
                 n_outliers: int = 0, stats_bits: int | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.n_groups, self.group_size, self.float_zeros = n_groups, group_size, float_zeros
        self.register_buffer("qweight", torch.zeros(packed_nbytes(in_features * out_features, bits), dtype=torch.uint8))
        self.stats_bits = stats_bits
        if stats_bits:
            self.register_buffer("scale_codes", torch.zeros(packed_nbytes(out_features * n_groups, stats_bits),
                                                            dtype=torch.uint8))
            self.register_buffer("scale_lo", torch.zeros(n_chunks(out_features), n_groups, dtype=torch.float16))
            self.register_buffer("scale_step", torch.zeros(n_chunks(out_features), n_groups, dtype=torch.float16))
        else:
            self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16))
        if float_zeros:
            self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.float16))
        else:
            self.register_buffer("qzeros", torch.zeros(packed_nbytes(out_features * n_groups, bits), dtype=torch.uint8))
        if has_g_idx:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        else:
            self.g_idx = None
        self.n_outliers = n_outliers
        if n_outliers:
            self.register_buffer("outlier_index", torch.zeros(n_outliers, dtype=torch.int32))
            self.register_buffer("outlier_value", torch.zeros(n_outliers, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, group_size: int | None) -> "QuantLinear":
        out_f, in_f = qw.codes.shape
        natural = natural_group_index(in_f, group_size, qw.g_idx.device)
        has_g_idx = not torch.equal(qw.g_idx.long(), natural)
        float_zeros = not torch.equal(qw.zero, qw.zero.round())
        n_out = qw.sparse.count if qw.sparse is not None else 0
        st = qw.scale_stats
        m = cls(in_f, out_f, qw.bits, qw.scale.shape[1], bias is not None, has_g_idx, group_size, float_zeros, n_out,
                st.bits if st is not None else None)
        m.qweight.copy_(pack_codes(qw.codes, qw.bits))
        if st is not None:
            m.scale_codes.copy_(pack_codes(st.codes, st.bits))
            m.scale_lo.copy_(st.lo)
            m.scale_step.copy_(st.step)
        else:
            m.scales.copy_(qw.scale.to(torch.float16))
        if float_zeros:
            m.zeros.copy_(qw.zero.to(torch.float16))
        else:
            m.qzeros.copy_(pack_codes(qw.zero.round().to(torch.int64), qw.bits))
        if has_g_idx:
            m.g_idx.copy_(qw.g_idx.to(torch.int32))
        if n_out:
            m.outlier_index.copy_(qw.sparse.index.to(torch.int32))
            m.outlier_value.copy_(qw.sparse.values)
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    def zero_points(self) -> torch.Tensor:
        """The ``(out, groups)`` zero points as floats, without unpacking the codes."""
        zero = (self.zeros.float() if self.float_zeros
                else unpack_codes(self.qzeros, self.bits, self.out_features * self.n_groups).float())
        return zero.view(self.out_features, self.n_groups)

    def quantized(self) -> QuantizedWeight:
        codes = unpack_codes(self.qweight, self.bits, self.in_features * self.out_features)
        zero = self.zero_points()
        g_idx = (self.g_idx if self.g_idx is not None
                 else natural_group_index(self.in_features, self.group_size, self.qweight.device))
        sparse = SparseOutliers(self.outlier_index.long(), self.outlier_value) if self.n_outliers else None
        stats = None
        if self.stats_bits:
            stat_codes = unpack_codes(self.scale_codes, self.stats_bits, self.out_features * self.n_groups)
            stats = ScaleStats(stat_codes.view(self.out_features, self.n_groups), self.scale_lo, self.scale_step,
                               self.stats_bits)
        scale = stats.decode() if stats is not None else self.scales.float()
        return QuantizedWeight(codes.view(self.out_features, self.in_features), scale,
                               zero, g_idx, self.bits, sparse=sparse,
                               scale_stats=stats)

    def dense_weight(self) -> torch.Tensor:
        return self.quantized().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if serves(self.kernel, x):
            y = self.kernel(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
            return y + bias if bias is not None else y
        return F.linear(x, self.weight_for(x), bias)

    def extra_repr(self) -> str:
        extra = f", outliers={self.n_outliers}" if self.n_outliers else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, groups={self.n_groups}{extra}"
