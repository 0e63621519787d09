"""The result every rounding algorithm returns, and the loss used to compare them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """Codes (out, in) with per-(row, group) scale/zero; ``g_idx`` maps each column to its group.

    ``g_idx`` is the natural ``col // group_size`` unless act-order permuted the groups.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    def cpu(self) -> "QuantizedWeight":
        return QuantizedWeight(self.codes.cpu(), self.scale.cpu(), self.zero.cpu(), self.g_idx.cpu(), self.bits)

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return self.scale[:, g] * (self.codes.float() - self.zero[:, g])


def proxy_loss(delta: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(ΔW·H·ΔWᵀ)``: the output error the Hessian predicts for a weight change."""
    d = delta.to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", d, h.to(torch.float64), d))
