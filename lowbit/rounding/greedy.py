"""Greedy refinement (QuIP's "G" passes): coordinate descent on the proxy loss, grid fixed.

For one column ``k`` with the others held, ``tr((Ŵ−W)·H·(Ŵ−W)ᵀ)`` is a convex quadratic in
``ŵ_k`` whose minimum is ``ŵ_k − ((Ŵ−W)·H)_k / H_kk``; the nearest grid point to it is the best
grid value, so no pass can increase the loss. Works after any rounding (RTN, GPTQ, LDLQ).
"""

from __future__ import annotations

import torch

from lowbit.rounding.quantized import QuantizedWeight


def greedy_refine(
    w: torch.Tensor, h: torch.Tensor, qw: QuantizedWeight, grid, passes: int = 1,
    order: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
) -> QuantizedWeight:
    """Improve ``qw``'s codes for ``w`` under the (damped) Hessian ``h``; scales and zeros stay."""
    W, H = w.to(dtype), h.to(dtype)
    g = qw.g_idx.long()
    scale, zero = qw.scale.to(dtype), qw.zero.to(dtype)
    codes = qw.codes.clone()
    what = qw.dequantize().to(dtype)
    eh = (what - W) @ H  # gradient/2 of the loss w.r.t. Ŵ, kept up to date
    cols = order.tolist() if order is not None else range(W.shape[1])
    for _ in range(passes):
        for k in cols:
            s, z = scale[:, g[k]], zero[:, g[k]]
            target = what[:, k] - eh[:, k] / H[k, k]
            q = grid.quantize(target, s, z)
            new = grid.dequantize(q, s, z)
            delta = new - what[:, k]
            if torch.any(delta != 0):
                eh += delta.unsqueeze(1) * H[k].unsqueeze(0)
                what[:, k] = new
                codes[:, k] = q.to(codes.dtype)
    return QuantizedWeight(codes, qw.scale, qw.zero, qw.g_idx, qw.bits)
