"""What GPTQ and LDLQ share: the conditioned (optionally act-ordered) problem and the result.

Both round columns one after another with error feedback; they differ only in how the feedback
is written (GPTQ: through the Cholesky factor of ``H⁻¹``; LDLQ: through the LDL factor of ``H``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lowbit.grids import Grid
from lowbit.hessians import condition_hessian
from lowbit.hessians.conditioning import damp_in_place, permute_symmetric_
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

    @classmethod
    @contextmanager
    def borrowed(cls, w: torch.Tensor, h: torch.Tensor, damp: float, act_order: bool
                 ) -> Iterator["SequentialProblem"]:
        """:meth:`build` without a copy of a float64 ``h``: ``h`` itself is conditioned (its diagonal, and the
        order of its rows and columns) for the ``with`` block, then put back bit for bit (``h.diag`` saved,
        the permutation undone). For a computation that needs the conditioned matrix only for a while, as GPTQ
        needs it to factor: at a 7B model's 11008 inputs a copy is 0.97 GB. ``prob.h`` is ``None`` after."""
        if h.dtype != torch.float64:  # converting copies anyway: that copy is ours
            prob = cls.build(w, h, damp, act_order)
            yield prob
            prob.h = None
            return
        diag = torch.diag(h).clone()
        wd = w.to(torch.float64).clone()
        perm = None
        try:
            wd[:, damp_in_place(h, damp)] = 0.0  # dead inputs: as condition_hessian
            if act_order:
                perm = torch.argsort(torch.diag(h), descending=True)
                wd = wd[:, perm]
                permute_symmetric_(h, perm)
            prob = cls(wd, h, perm)
            yield prob
            prob.h = None
        finally:
            if perm is not None:
                permute_symmetric_(h, torch.argsort(perm))
            i = torch.arange(h.shape[0], device=h.device)
            h[i, i] = diag

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
