"""A linear layer that stores packed integer codes and dequantizes them when it runs.

Memory holds ``bits/8`` bytes per weight plus float16 scales and packed zeros; the dequantized
matrix exists only during the call (CPU path in plain torch). Grids whose zero point is not an
integer (QuIP's midrise RMS grid: ``maxq/2``) keep float16 ``zeros`` instead of packed ones.
SpQR-style outliers are a sparse list (int32 flat index, float16 value) written over the grid values;
SpQR's quantized scales are packed codes with a float16 minimum and step per 16 rows and group.
Which tensors, in which shapes and dtypes, is :mod:`lowbit.format`'s declaration; :func:`~lowbit.runtime.build.
packed_module` builds a layer from a rounding's result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.format import LayerSpec
from lowbit.format.codec import decode, empty, zero_points
from lowbit.rounding import QuantizedWeight
from lowbit.runtime.kept_weight import KeptWeight
from lowbit.runtime.kernels import serves


def register(module: nn.Module, spec_tensors) -> None:
    """Buffers for the tensors a :class:`LayerSpec` declares (filled by ``load_state_dict``)."""
    for d in spec_tensors:
        module.register_buffer(d.key, empty(d))


class QuantLinear(KeptWeight, nn.Module):
    """The grid part of a layer (``spec.grid()``): its buffers are the tensors the spec declares."""

    # a CPU kernel back-end (lowbit.runtime.kernels), set at load time; a plain attribute, never saved
    kernel = None

    def __init__(self, spec: LayerSpec, bias: bool):
        super().__init__()
        self.spec = spec.grid()
        (self.out_features, self.in_features), self.bits = spec.shape, spec.bits
        self.n_groups, self.group_size, self.float_zeros = spec.groups, spec.group_size, spec.float_zeros
        self.n_outliers, self.stats_bits = spec.outliers, spec.stats_bits
        register(self, self.spec.grid_tensors())
        if not spec.act_order:
            self.g_idx = None  # a buffer when act-order permuted the groups
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def zero_points(self) -> torch.Tensor:
        """The ``(out, groups)`` zero points as floats, without unpacking the codes."""
        return zero_points(self.spec, self._grid())

    def quantized(self) -> QuantizedWeight:
        return decode(self.spec, self._grid())

    def _grid(self) -> dict[str, torch.Tensor]:
        """The declared tensors, as this module holds them (its buffers)."""
        return {d.key: getattr(self, d.key) for d in self.spec.grid_tensors()}

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
