"""Greedy refinement (QuIP's "G" passes): coordinate descent on the proxy loss, grid fixed.

For one column ``k`` with the others held, ``tr((Ŵ−W)·H·(Ŵ−W)ᵀ)`` is a convex quadratic in
``ŵ_k`` whose minimum is ``ŵ_k − ((Ŵ−W)·H)_k / H_kk``; the nearest grid point to it is the best
grid value, so no pass can increase the loss. Works after any rounding (RTN, GPTQ, LDLQ).

The gradient ``(Ŵ−W)·H`` is kept up to date lazily, as GPTQ does its error feedback: a changed
column updates only the columns of its block at once, and the block's changes reach the rest in
one matrix product when the block is done. Same visits and the same result as updating every
column each time (up to float summation order), at a fraction of the memory traffic.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.grids import Grid
from lowbit.rounding.quantized import QuantizedWeight

BLOCK = 128


def greedy_refine(
    w: torch.Tensor, h: torch.Tensor, qw: QuantizedWeight, grid: Grid, passes: int = 1,
    order: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, block: int = BLOCK,
) -> QuantizedWeight:
    """Improve ``qw``'s codes for ``w`` under the (damped) Hessian ``h``; everything else stays.
    Columns are visited in ``order`` (default: left to right)."""
    n = w.shape[1]
    perm = order.long() if order is not None else torch.arange(n, device=w.device)
    W, H = w.to(dtype)[:, perm], h.to(dtype)[perm][:, perm]  # work in visiting order: blocks are contiguous
    g = qw.g_idx.long()[perm]
    scale, zero = qw.scale.to(dtype), qw.zero.to(dtype)
    codes = qw.codes[:, perm].clone()
    what = qw.dequantize().to(dtype)[:, perm]
    eh = (what - W) @ H  # gradient/2 of the loss w.r.t. Ŵ
    for _ in range(passes):
        for b0 in range(0, n, block):
            b1 = min(b0 + block, n)
            changed = torch.zeros(W.shape[0], b1 - b0, dtype=dtype, device=W.device)
            for k in range(b0, b1):
                s, z = scale[:, g[k]], zero[:, g[k]]
                q = grid.quantize(what[:, k] - eh[:, k] / H[k, k], s, z)
                new = grid.dequantize(q, s, z)
                delta = new - what[:, k]
                if torch.any(delta != 0):
                    eh[:, b0:b1] += delta.unsqueeze(1) * H[k, b0:b1].unsqueeze(0)
                    what[:, k], codes[:, k], changed[:, k - b0] = new, q.to(codes.dtype), delta
            eh[:, :b0] += changed @ H[b0:b1, :b0]
            eh[:, b1:] += changed @ H[b0:b1, b1:]
    return dataclasses.replace(qw, codes=codes[:, torch.argsort(perm)])  # scales, zeros, scale codes: as they were
