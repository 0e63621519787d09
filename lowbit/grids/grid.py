"""What every rounding algorithm asks of a grid, whatever its shape (min-max per channel or group, QuIP's RMS)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class GridParams:
    """Scale and zero point of one fitted grid, shape ``(rows, n_groups)`` (float32 each)."""

    scale: torch.Tensor
    zero: torch.Tensor


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale·(codes − zero)``: the value of a code on any grid (``scale``/``zero`` broadcast against it)."""
    return scale * (codes.to(scale.dtype) - zero)


class Grid(Protocol):
    """A ``bits``-bit grid: codes in ``[0, maxq]``, one scale and zero per row and group of ``group_size``
    columns (``None``: one group per row)."""

    bits: int
    group_size: int | None

    @property
    def maxq(self) -> int: ...

    def n_groups(self, cols: int) -> int: ...

    def group_index(self, cols: int, device: torch.device | None = None) -> torch.Tensor:
        """The group of every column (``col // group_size``)."""

    def fit(self, w: torch.Tensor) -> GridParams:
        """One group per row of ``w``: the scale and zero that its values get."""

    def fit_groups(self, w: torch.Tensor) -> GridParams:
        """Every group of ``w`` at once, shapes ``(rows, n_groups)``."""

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes (as floats) in ``[0, maxq]``."""

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor: ...

    def quantize_dequantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor: ...
