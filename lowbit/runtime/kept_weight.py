"""Opt-in: a packed layer keeps its dequantized weight after the first call.

Packed layers rebuild their float weight on every call so that memory holds only the bits. For
evaluation over hundreds of 2048-token windows on a CPU that rebuild is paid per window and
layer — measured on SmolLM2-135M with one thread, 4.7 s per forward for the binary layers of
``oac-w1`` (a window is ≈ 11 s) and 0.9 s for the SpQR-style ``oac-w2``. :func:`keep_dequantized`
trades the memory of the unquantized model back for that time; the weight, and so every output,
is the same tensor either way.
"""

from __future__ import annotations

import torch
from torch import nn


class KeptWeight:
    """Mixed into packed layers: :meth:`dense_weight` rebuilds, :meth:`weight_for` may keep it."""

    keep: bool = False
    _kept: torch.Tensor | None = None

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        kept = self._kept
        if kept is not None and kept.dtype == x.dtype and kept.device == x.device:
            return kept
        w = self.dense_weight().to(x.dtype)
        if self.keep:
            self._kept = w  # a plain attribute: not in the state dict, never saved
        return w


def keep_dequantized(model: nn.Module, keep: bool = True) -> int:
    """Switch weight keeping on (or off, freeing the kept weights) for every packed layer; returns their count."""
    layers = [m for m in model.modules() if isinstance(m, KeptWeight)]
    for m in layers:
        m.keep, m._kept = keep, None
    return len(layers)
