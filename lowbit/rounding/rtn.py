"""Round-to-nearest: the baseline every other algorithm must beat."""

from __future__ import annotations

import torch

from lowbit.grids import UniformGrid
from lowbit.rounding.quantized import QuantizedWeight


def rtn_quantize(w: torch.Tensor, grid: UniformGrid) -> QuantizedWeight:
    params = grid.fit_groups(w.float())
    g_idx = grid.group_index(w.shape[1], device=w.device)
    codes = grid.quantize(w, params.scale[:, g_idx], params.zero[:, g_idx])
    return QuantizedWeight(codes.to(torch.uint8), params.scale, params.zero, g_idx, grid.bits)
