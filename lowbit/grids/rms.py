"""QuIP's per-matrix grid: ``2^b`` evenly spaced levels on ``[-c·RMS(W), +c·RMS(W)]`` (c = 2.4).

After incoherence processing the weights are roughly Gaussian with no outliers, so one scale for
the whole matrix, set from its RMS, is enough (the reference code's ``qfn='b'``). The levels are
*midrise*: symmetric about zero with no zero level (at 2 bits: ±c/3·RMS, ±c·RMS), so the zero
point is ``maxq/2`` — a half-integer — and codes are ``round(w/scale + maxq/2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.grids.grid import GridParams, dequantize
from lowbit.grids.uniform import MIN_SCALE, natural_group_index


@dataclass(frozen=True)
class RMSGrid:
    """A :class:`~lowbit.grids.grid.Grid` with one group: every row shares the matrix's scale."""

    bits: int = 2
    rms_mult: float = 2.4
    group_size: None = None  # one group per row (the same scale in each)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise LowbitError(f"bits must be an integer from 1 to 8, got {self.bits!r}")
        if not self.rms_mult > 0:
            raise LowbitError(f"rms_mult must be positive, got {self.rms_mult!r}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, cols: int) -> int:
        return 1

    def group_index(self, cols: int, device: torch.device | None = None) -> torch.Tensor:
        return natural_group_index(cols, None, device)

    def fit(self, w: torch.Tensor) -> GridParams:
        """One scale for all of ``w`` (every row gets the same value)."""
        rms = w.float().pow(2).mean().sqrt()
        scale = (2 * self.rms_mult * rms / self.maxq).clamp_min(MIN_SCALE).to(torch.float16).float()
        rows = w.shape[0]
        return GridParams(scale.expand(rows, 1).clone(), torch.full((rows, 1), self.maxq / 2, device=w.device))

    fit_groups = fit

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / scale + zero), 0, self.maxq)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return dequantize(codes, scale, zero)

    def quantize_dequantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(w, scale, zero), scale, zero)
