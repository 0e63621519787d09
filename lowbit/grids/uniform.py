"""Uniform integer grids (GPTQ's min-max quantizer), per channel or per group of input columns.

A group size that does not divide the width leaves a smaller last group: group ``g`` covers
columns ``[g*gs, min((g+1)*gs, cols))``. Scales are rounded to float16 when fitted so that the
in-memory model and the packed checkpoint (which stores float16 scales) are bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.grids.grid import GridParams, dequantize

MIN_SCALE = 1e-5  # representable in float16; keeps all-zero groups finite
CLIP_GRID, CLIP_MAX_SHRINK, CLIP_NORM = 100, 0.8, 2.4  # GPTQ's quantizer defaults
# Candidates evaluated at once. On a CPU 4 MB of float32 stays in cache (64 MB buffers made the
# search 5x slower, most of it page faults of fresh allocations); a GPU wants few large launches.
CLIP_CHUNK_ELEMENTS = {"cpu": 2**20, "other": 2**24}


def natural_group_index(cols: int, group_size: int | None, device: torch.device | None = None) -> torch.Tensor:
    """Group of every column in natural order (act-order checkpoints store their own)."""
    idx = torch.arange(cols, device=device)
    return torch.zeros_like(idx) if group_size is None else idx // group_size


@dataclass(frozen=True)
class UniformGrid:
    """``bits``-bit integer grid; ``group_size=None`` means one scale per output channel.

    ``clip_search``: shrink each row's range by factors ``1, 0.99, …, 0.2`` and keep the one
    with the least ``Σ|w - q(w)|^2.4`` (GPTQ's ``mse`` quantizer option); outliers then
    saturate instead of stretching the grid for every other weight.
    """

    bits: int = 4
    symmetric: bool = False
    group_size: int | None = None
    clip_search: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise LowbitError(f"bits must be an integer from 1 to 8, got {self.bits!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0
        ):
            raise LowbitError(f"group_size must be a positive integer or null, got {self.group_size!r}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, cols: int) -> int:
        return 1 if self.group_size is None else math.ceil(cols / self.group_size)

    def group_index(self, cols: int, device: torch.device | None = None) -> torch.Tensor:
        return natural_group_index(cols, self.group_size, device)

    def fit(self, w: torch.Tensor) -> GridParams:
        """Min-max fit over the last dimension of ``w`` (rows, cols) -> one group per row."""
        w = w.float()
        zero_t = torch.zeros(w.shape[0], device=w.device)
        xmin = torch.minimum(w.min(dim=1).values, zero_t)
        xmax = torch.maximum(w.max(dim=1).values, zero_t)
        if not self.clip_search:
            return self.range_params(xmin, xmax)
        n_shrink = int(CLIP_MAX_SHRINK * CLIP_GRID)
        elements = CLIP_CHUNK_ELEMENTS["cpu" if w.device.type == "cpu" else "other"]
        chunk = max(1, elements // (n_shrink * w.shape[1]))
        parts = [self._clip(w[r : r + chunk], xmin[r : r + chunk], xmax[r : r + chunk], n_shrink)
                 for r in range(0, w.shape[0], chunk)]
        return GridParams(torch.cat([p.scale for p in parts]), torch.cat([p.zero for p in parts]))

    def _clip(self, w: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, n_shrink: int) -> GridParams:
        """Every shrink factor at once, ``(n_shrink, rows, cols)``; ties go to the least shrink."""
        shrink = 1 - torch.arange(n_shrink, device=w.device) / CLIP_GRID
        cand = self.range_params((shrink[:, None] * xmin).reshape(-1), (shrink[:, None] * xmax).reshape(-1))
        scale = cand.scale.view(n_shrink, -1, 1)
        zero = cand.zero.view(n_shrink, -1, 1)
        err = self.quantize_dequantize(w.unsqueeze(0), scale, zero).sub_(w).abs_().pow_(CLIP_NORM).sum(2)
        best = err.argmin(0)
        rows = torch.arange(w.shape[0], device=w.device)
        return GridParams(scale[best, rows], zero[best, rows])

    def range_params(self, xmin: torch.Tensor, xmax: torch.Tensor) -> GridParams:
        if self.symmetric:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        both_zero = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
        xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
        scale = ((xmax - xmin) / self.maxq).clamp_min(MIN_SCALE)
        scale = scale.to(torch.float16).float()
        if self.symmetric:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale).clamp(0, self.maxq)
        return GridParams(scale.unsqueeze(1), zero.unsqueeze(1))

    def fit_groups(self, w: torch.Tensor) -> GridParams:
        """Fit every group of ``w`` (rows, cols) at once; shapes ``(rows, n_groups)``."""
        if self.group_size is None:
            return self.fit(w)
        parts = [self.fit(w[:, s : s + self.group_size]) for s in range(0, w.shape[1], self.group_size)]
        return GridParams(torch.cat([p.scale for p in parts], 1), torch.cat([p.zero for p in parts], 1))

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes in ``[0, maxq]``; scale/zero (same shape) broadcast against ``w``. One buffer
        for every step: fresh tensors per step made the clipping search 6x slower on a CPU."""
        return torch.div(w, scale).round_().add_(zero).clamp_(0, self.maxq)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return dequantize(codes, scale, zero)

    def quantize_dequantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(w))``, op for op, in the buffer ``quantize`` made (it is ours)."""
        return self.quantize(w, scale, zero).to(scale.dtype).sub_(zero).mul_(scale)
