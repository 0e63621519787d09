"""What GPTQ and LDLQ share: the conditioned (optionally act-ordered) problem and the result.

Both round columns one after another with error feedback; they differ only in how the feedback
is written (GPTQ: through the Cholesky factor of ``H⁻¹``; LDLQ: through the LDL factor of ``H``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.grids import Grid
from lowbit.hessians import condition_hessian
from lowbit.hessians.conditioning import permute_symmetric_
from lowbit.rounding.quantized import QuantizedWeight


@dataclass
class SequentialProblem:
    """Damped Hessian and weights (float64), columns in rounding order (``perm``, or natural)."""

    w: torch.Tensor
    h: torch.Tensor
    perm: torch.Tensor | None

    @classmethod
    def build(cls, w: torch.Tensor, h: torch.Tensor, damp: float, act_order: bool) -> "SequentialProblem":
        hd, wd = condition_hessian(h.to(torch.float64), w.to(torch.float64), damp)
        perm = None
        if act_order:  # columns with the most input energy first (GPTQ act-order, LDLQ-RG's ordering)
            perm = torch.argsort(torch.diag(hd), descending=True)
            wd, hd = wd[:, perm], permute_symmetric_(hd, perm)  # hd is this problem's own copy
        return cls(wd, hd, perm)

    def pop_hessian(self) -> torch.Tensor:
        """The Hessian, no longer held here (GPTQ needs only its factor after: one n×n float64 copy less)."""
        h, self.h = self.h, None
        return h

    def result(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> QuantizedWeight:
        """Codes back in natural column order; ``g_idx`` follows the permutation."""
        g_idx = grid.group_index(codes.shape[1], device=codes.device)
        if self.perm is not None:
            inv = torch.argsort(self.perm)
            codes, g_idx = codes[:, inv], g_idx[inv]
        return QuantizedWeight(codes, scale, zero, g_idx, grid.bits, group_size=grid.group_size)


def initial_params(w: torch.Tensor, grid: Grid, dtype: torch.dtype):
    """``scale``/``zero`` (rows × groups), ``codes`` (rows × cols) and the current column's scale and
    zero: fitted on all of ``w`` for a per-channel grid, zero until the first group is fitted."""
    rows, cols = w.shape
    scale = torch.zeros(rows, grid.n_groups(cols), dtype=torch.float32, device=w.device)
    zero = torch.zeros_like(scale)
    if grid.group_size is None:
        p = grid.fit(w)
        scale[:, :1], zero[:, :1] = p.scale, p.zero
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=w.device)
    return scale, zero, codes, scale[:, 0].to(dtype), zero[:, 0].to(dtype)
