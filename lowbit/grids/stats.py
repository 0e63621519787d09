"""SpQR's second level: the per-group scales themselves quantized, ``bits``-bit min-max codes per
chunk of ``STATS_ROWS`` output rows, with a float16 minimum and step per chunk and group.

At 2 bits on groups of 16, float16 scales cost a full bit per weight; 3-bit scale codes cost
3/16 + 32/256 ≈ 0.31. The scales the weights are rounded with are the decoded ones (float32,
``lo + code·step`` from the stored float16 ``lo`` and ``step``), so a reload rebuilds them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.grids.sizes import STATS_ROWS, n_chunks


@dataclass
class ScaleStats:
    codes: torch.Tensor  # (rows, n_groups) uint8
    lo: torch.Tensor  # (chunks, n_groups) float16
    step: torch.Tensor  # (chunks, n_groups) float16
    bits: int

    def decode(self) -> torch.Tensor:
        chunk = torch.arange(self.codes.shape[0], device=self.codes.device) // STATS_ROWS
        return self.lo.float()[chunk] + self.codes.float() * self.step.float()[chunk]

    def cpu(self) -> "ScaleStats":
        return ScaleStats(self.codes.cpu(), self.lo.cpu(), self.step.cpu(), self.bits)

    @classmethod
    def empty(cls, rows: int, groups: int, bits: int, device=None) -> "ScaleStats":
        z = torch.zeros(n_chunks(rows), groups, dtype=torch.float16, device=device)
        return cls(torch.zeros(rows, groups, dtype=torch.uint8, device=device), z, z.clone(), bits)

    def assign(self, group: int, other: "ScaleStats") -> None:
        """Write one group's codes (``other`` holds a single group) into column ``group``."""
        self.codes[:, group] = other.codes[:, 0]
        self.lo[:, group], self.step[:, group] = other.lo[:, 0], other.step[:, 0]


def quantize_scales(scale: torch.Tensor, bits: int) -> ScaleStats:
    """Min-max ``bits``-bit codes of ``scale`` (rows, n_groups) per chunk of rows and group."""
    rows, groups = scale.shape
    pad = n_chunks(rows) * STATS_ROWS - rows
    s = torch.cat([scale.float(), scale.float()[-1:].expand(pad, groups)]) if pad else scale.float()
    s = s.view(-1, STATS_ROWS, groups)
    lo = s.amin(1).to(torch.float16)
    step = ((s.amax(1) - lo.float()) / (2**bits - 1)).to(torch.float16)
    safe = torch.where(step > 0, step.float(), torch.ones_like(step, dtype=torch.float32))
    codes = ((s - lo.float()[:, None]) / safe[:, None]).round().clamp(0, 2**bits - 1)
    codes = torch.where(step[:, None] > 0, codes, torch.zeros_like(codes))
    return ScaleStats(codes.reshape(-1, groups)[:rows].to(torch.uint8), lo, step, bits)
