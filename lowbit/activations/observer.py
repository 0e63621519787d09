"""Running per-channel minima and maxima of activations over all calibration tokens."""

from __future__ import annotations

import torch


class RangeObserver:
    """Keeps ``min``/``max`` over every dimension of ``x`` except the trailing ``channel_dims``."""

    def __init__(self, channel_dims: int = 1):
        self.channel_dims = channel_dims
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        flat = x.reshape(-1, *x.shape[x.dim() - self.channel_dims:])
        lo, hi = flat.amin(0), flat.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer saw no activations")
        return self.lo.cpu(), self.hi.cpu()
