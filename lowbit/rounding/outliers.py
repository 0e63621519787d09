"""SpQR-style sparse outliers: a budgeted set of weights kept in float16 instead of on the grid.

Which weights: the largest OBS errors of rounding them, ``((w − q(w)) / U_jj)²`` with ``U`` the
Cholesky factor of ``H⁻¹`` in rounding order (the same ``U_jj`` GPTQ divides by), so a Hessian
that weighs the model's output (OAC) picks different weights than ``XᵀX`` does. Chosen once per
layer from round-to-nearest residuals, globally, so the count is exactly the budget; GPTQ then
keeps them exact (zero error, no feedback) and fits each group's range without them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.grids import UniformGrid

INDEX_BITS, VALUE_BITS = 32, 16  # int32 flat index + float16 value per outlier


@dataclass
class SparseOutliers:
    """Flat (row-major) indices into the ``(out, in)`` weight, sorted, and their float16 values."""

    index: torch.Tensor  # int64 in memory, int32 in checkpoints
    values: torch.Tensor  # float16

    @property
    def count(self) -> int:
        return int(self.index.numel())

    def storage_bits(self) -> int:
        return self.count * (INDEX_BITS + VALUE_BITS)

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` with the outlier positions overwritten (a copy)."""
        out = w.clone()
        out.view(-1)[self.index.long()] = self.values.to(out.dtype)
        return out

    def cpu(self) -> "SparseOutliers":
        return SparseOutliers(self.index.cpu(), self.values.cpu())

    @classmethod
    def from_mask(cls, mask: torch.Tensor, w: torch.Tensor) -> "SparseOutliers":
        index = torch.nonzero(mask.reshape(-1)).squeeze(1)
        return cls(index, w.reshape(-1)[index].to(torch.float16))


def outlier_budget(numel: int, fraction: float) -> int:
    return int(round(fraction * numel))


def select_outliers(w: torch.Tensor, hinv_diag: torch.Tensor, grid: UniformGrid, fraction: float) -> torch.Tensor:
    """Boolean mask (same shape as ``w``) of the ``round(fraction·numel)`` weights whose rounding
    costs most: ``((w − rtn(w)) / hinv_diag)²`` with ``hinv_diag`` the diagonal of ``U`` (``H⁻¹ = UᵀU``)."""
    from lowbit.rounding.rtn import rtn_quantize

    k = outlier_budget(w.numel(), fraction)
    mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    if k == 0:
        return mask
    est = rtn_quantize(w.float(), grid).dequantize()
    sens = ((w.float() - est) / hinv_diag.float().unsqueeze(0)) ** 2
    mask.view(-1)[torch.topk(sens.reshape(-1), k).indices] = True
    return mask
