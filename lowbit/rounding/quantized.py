"""The result every rounding algorithm returns, and the loss used to compare them. How it is stored (its
tensors, its bytes) is declared once, in :mod:`lowbit.format`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lowbit.grids.uniform import natural_group_index

if TYPE_CHECKING:
    from lowbit.grids.stats import ScaleStats
    from lowbit.transforms.incoherence import Incoherence
    from lowbit.transforms.lowrank import LowRank


@dataclass
class SparseOutliers:
    """SpQR-style outliers of a quantized weight (chosen in ``rounding.outliers``): flat (row-major) indices
    into the ``(out, in)`` weight, sorted, and their float16 values."""

    index: torch.Tensor  # int64 in memory, int32 in checkpoints
    values: torch.Tensor  # float16

    @property
    def count(self) -> int:
        return int(self.index.numel())

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


@dataclass
class QuantizedWeight:
    """Codes (out, in) with per-(row, group) scale/zero; ``g_idx`` maps each column to its group.

    ``g_idx`` is the natural ``col // group_size`` unless act-order permuted the groups.
    ``transform``: the codes live in a rotated space (QuIP's incoherence); :meth:`weight` undoes it.
    ``lowrank``: a float16 ``A·B`` branch added to the dequantized weight (ASER / LoRC).
    ``sparse``: SpQR-style outliers, float16 values that replace the grid value at their positions.
    ``scale_stats``: the scales' own codes (SpQR's second level); ``scale`` holds their decoded values.
    ``group_size``: the grid's (``None``: one group per row), as the rounding fitted it.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    transform: "Incoherence | None" = None
    lowrank: "LowRank | None" = None
    sparse: "SparseOutliers | None" = None
    scale_stats: "ScaleStats | None" = None
    group_size: int | None = None

    @property
    def numel(self) -> int:
        return self.codes.numel()

    def cpu(self) -> "QuantizedWeight":
        return dataclasses.replace(self, codes=self.codes.cpu(), scale=self.scale.cpu(), zero=self.zero.cpu(),
                                   g_idx=self.g_idx.cpu(),
                                   lowrank=self.lowrank.cpu() if self.lowrank is not None else None,
                                   sparse=self.sparse.cpu() if self.sparse is not None else None,
                                   scale_stats=self.scale_stats.cpu() if self.scale_stats is not None else None)

    def dequantize(self) -> torch.Tensor:
        """The grid values of the codes, outliers in place (in the transformed space, if there is one)."""
        w = _dequantize(self.codes, self.scale, self.zero, self.g_idx.long())
        return self.sparse.apply(w) if self.sparse is not None else w

    def weight(self) -> torch.Tensor:
        """The dense weight that acts on the layer's original inputs (float32)."""
        w = self.dequantize()
        if self.transform is not None:
            w = self.transform.inverse_weight(w.to(torch.float64)).to(torch.float32)
        if self.lowrank is not None:
            w = w + self.lowrank.product().to(w.device)
        return w


def proxy_loss(delta: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(ΔW·H·ΔWᵀ)``: the output error the Hessian predicts for a weight change."""
    d = delta.to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", d, h.to(torch.float64), d))


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``scale[:, g]·(codes − zero[:, g])``. A packed layer runs this on every forward, so groups in
    natural order (one per row, or equal runs of columns) broadcast their scale and zero instead of
    gathering a full-size copy of each — the same products, so the same floats."""
    rows, cols = codes.shape
    n_groups = scale.shape[1]
    if n_groups == 1:
        return scale * (codes.float() - zero)
    size = cols // n_groups
    if cols % n_groups == 0 and torch.equal(g, natural_group_index(cols, size, g.device)):
        w = scale.unsqueeze(2) * (codes.float().view(rows, n_groups, size) - zero.unsqueeze(2))
        return w.view(rows, cols)
    idx = g.unsqueeze(0).expand(rows, cols)  # act-order's permuted groups, a smaller last group
    return torch.gather(scale, 1, idx) * (codes.float() - torch.gather(zero, 1, idx))
