"""LDLQ (QuIP): adaptive rounding with linear feedback from the LDL factor of the Hessian.

With ``H = (I+A)·D·(I+A)ᵀ`` (``A`` strictly upper triangular), column ``k`` is rounded as
``ŵ_k = Q(w_k + (W − Ŵ)_{:,<k}·A_{<k,k})``; the rounding noise ``η`` then gives the proxy loss
``Σ_k D_k·‖η_k‖²``, the least any such feedback achieves. QuIP proves it is the same algorithm as
GPTQ (tested: same codes in float64); it is written here in its own form, with lazy blocks —
feedback from earlier blocks is one matrix product, within a block one column at a time.
Group grids are fitted at a group's first column on the error-optimal values of the group's
columns given everything rounded so far, ``W_g + (W−Ŵ)_{<k}·H_{<k,≥k}·H_{≥k,≥k}⁻¹`` restricted to
the group — GPTQ's running values. In LDL terms that is ``(W−Ŵ)_{<k}·A_{<k,g}·(I+A_{g,g})⁻¹``
(the leading columns of ``U₂₂⁻¹`` only involve the group's own triangle), so no inverse of the
remaining Hessian is needed.
"""

from __future__ import annotations

import torch

from lowbit.grids import Grid
from lowbit.hessians import robust_udu
from lowbit.rounding.quantized import QuantizedWeight
from lowbit.rounding.sequential import SequentialProblem, initial_params


def ldlq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: Grid,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    name: str = "layer",
    dtype: torch.dtype = torch.float32,
) -> QuantizedWeight:
    """Quantize ``w`` (out, in) given the Hessian ``h`` (in, in); ``act_order`` is LDLQ-RG's ordering."""
    rows, cols = w.shape
    prob = SequentialProblem.build(w, h, damp, act_order)
    a, _ = robust_udu(prob.h, damp, name)
    A, W = a.to(dtype), prob.w.to(dtype)
    err = torch.zeros_like(W)  # W − Ŵ, filled column by column
    gs = grid.group_size
    scale, zero, codes, col_scale, col_zero = initial_params(W, grid, dtype)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        fed = W[:, i1:i2] + err[:, :i1] @ A[:i1, i1:i2]  # feedback from finished blocks
        for k in range(i1, i2):
            if gs is not None and k % gs == 0:
                g_end = min(k + gs, cols)
                unit = A[k:g_end, k:g_end] + torch.eye(g_end - k, dtype=dtype, device=A.device)
                fed_group = torch.linalg.solve_triangular(unit, err[:, :k] @ A[:k, k:g_end], upper=True, left=False)
                p = grid.fit(W[:, k:g_end] + fed_group)
                scale[:, k // gs : k // gs + 1], zero[:, k // gs : k // gs + 1] = p.scale, p.zero
                col_scale, col_zero = p.scale[:, 0].to(dtype), p.zero[:, 0].to(dtype)
            z = fed[:, k - i1] + err[:, i1:k] @ A[i1:k, k]
            q = grid.quantize(z, col_scale, col_zero)
            codes[:, k] = q.to(torch.uint8)
            err[:, k] = W[:, k] - grid.dequantize(q, col_scale, col_zero).to(dtype)
    return prob.result(codes, scale, zero, grid)
