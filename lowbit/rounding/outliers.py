"""SpQR-style sparse outliers: a budgeted set of weights kept in float16 instead of on the grid.

Which weights: the largest OBS errors of rounding them, ``((w − q(w)) / U_jj)²`` with ``U`` the
Cholesky factor of ``H⁻¹`` in rounding order (the same ``U_jj`` GPTQ divides by), so a Hessian
that weighs the model's output (OAC) picks different weights than ``XᵀX`` does. Chosen once per
layer from round-to-nearest residuals, globally, so the count is exactly the budget; GPTQ then
keeps them exact (zero error, no feedback) and fits each group's range without them.
"""

from __future__ import annotations

import torch

from lowbit.grids import Grid
from lowbit.rounding.rtn import rtn_quantize


def outlier_budget(numel: int, fraction: float) -> int:
    return int(round(fraction * numel))


def select_outliers(w: torch.Tensor, hinv_diag: torch.Tensor, grid: Grid, fraction: float) -> torch.Tensor:
    """Boolean mask (same shape as ``w``) of the ``round(fraction·numel)`` weights whose rounding
    costs most: ``((w − rtn(w)) / hinv_diag)²`` with ``hinv_diag`` the diagonal of ``U`` (``H⁻¹ = UᵀU``)."""
    k = outlier_budget(w.numel(), fraction)
    mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    if k == 0:
        return mask
    est = rtn_quantize(w.float(), grid).dequantize()
    sens = ((w.float() - est) / hinv_diag.float().unsqueeze(0)) ** 2
    mask.view(-1)[torch.topk(sens.reshape(-1), k).indices] = True
    return mask
