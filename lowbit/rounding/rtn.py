"""Round-to-nearest: the baseline every other algorithm must beat."""

from __future__ import annotations

import torch

from lowbit.grids import Grid
from lowbit.grids.stats import quantize_scales
from lowbit.rounding.quantized import QuantizedWeight


def rtn_quantize(w: torch.Tensor, grid: Grid, stats_bits: int | None = None) -> QuantizedWeight:
    params = grid.fit_groups(w.float())
    stats = quantize_scales(params.scale, stats_bits) if stats_bits else None
    scale = stats.decode() if stats is not None else params.scale
    g_idx = grid.group_index(w.shape[1], device=w.device)
    codes = grid.quantize(w, scale[:, g_idx], params.zero[:, g_idx])
    return QuantizedWeight(codes.to(torch.uint8), scale, params.zero, g_idx, grid.bits, scale_stats=stats,
                           group_size=grid.group_size)
