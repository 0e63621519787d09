"""Fake quantization of activations: round to a ``bits``-bit grid and back, in the tensor's dtype.

A static quantizer holds calibrated ``scale``/``zero`` tables whose shape broadcasts against the
tensor's trailing dimensions — ``(channels,)`` for a linear input, ``(heads, 1, head_dim)`` for
the K/V cache, ``(1,)`` per tensor; a per-cluster table is a per-channel table whose channels
share their cluster's values. A dynamic quantizer fits one range per token at run time.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.grids import UniformGrid


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``scale·(clamp(round(x/scale) + zero, 0, 2^bits − 1) − zero)``, computed in float32."""
    xf = x.float()
    q = torch.clamp(torch.round(xf / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).to(x.dtype)


def range_to_params(lo: torch.Tensor, hi: torch.Tensor, bits: int,
                    symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the grid covering ``[min(lo, 0), max(hi, 0)]`` (elementwise)."""
    shape = lo.shape
    lo = torch.clamp(lo.float().reshape(-1), max=0)
    hi = torch.clamp(hi.float().reshape(-1), min=0)
    p = UniformGrid(bits=bits, symmetric=symmetric).range_params(lo, hi)
    return p.scale.view(shape), p.zero.view(shape)


class ActQuantizer(nn.Module):
    """Quantizes what passes through it; ``dynamic``: one range per token (last dimension)."""

    def __init__(self, bits: int, symmetric: bool = False, dynamic: bool = False, shape: tuple[int, ...] = (1,)):
        super().__init__()
        self.bits, self.symmetric, self.dynamic, self.shape = bits, symmetric, dynamic, tuple(shape)
        if not dynamic:
            self.register_buffer("scale", torch.ones(self.shape))
            self.register_buffer("zero", torch.zeros(self.shape))

    @classmethod
    def from_ranges(cls, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                    labels: torch.Tensor | None = None) -> ActQuantizer:
        """Static quantizer from per-channel ranges; with ``labels`` every channel gets its
        cluster's range (min of the members' minima, max of their maxima)."""
        if labels is not None:
            lo, hi = cluster_ranges(lo, hi, labels)
        q = cls(bits, symmetric, False, tuple(lo.shape))
        scale, zero = range_to_params(lo, hi, bits, symmetric)
        q.scale.copy_(scale)
        q.zero.copy_(zero)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            lo = x.detach().amin(-1, keepdim=True)
            hi = x.detach().amax(-1, keepdim=True)
            scale, zero = range_to_params(lo, hi, self.bits, self.symmetric)
            return fake_quantize(x, scale, zero, self.bits)
        return fake_quantize(x, self.scale, self.zero, self.bits)

    def metadata(self) -> dict:
        return {"bits": self.bits, "symmetric": self.symmetric, "dynamic": self.dynamic, "shape": list(self.shape)}

    @classmethod
    def from_metadata(cls, meta: dict) -> ActQuantizer:
        return cls(meta["bits"], meta["symmetric"], meta["dynamic"], tuple(meta["shape"]))

    def extra_repr(self) -> str:
        kind = "dynamic per-token" if self.dynamic else f"static {self.shape}"
        return f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, {kind}"


def cluster_ranges(lo: torch.Tensor, hi: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel tables where each channel carries its cluster's [min, max]; labels are
    numbered independently per leading index (per head) when the tables have several rows."""
    lo2, hi2, lab = (lo.reshape(-1, lo.shape[-1]), hi.reshape(-1, hi.shape[-1]),
                     labels.reshape(-1, labels.shape[-1]).long())
    n = int(lab.max()) + 1
    out_lo, out_hi = torch.empty_like(lo2), torch.empty_like(hi2)
    for r in range(lab.shape[0]):
        cmin = torch.full((n,), float("inf"), dtype=lo2.dtype).scatter_reduce(0, lab[r], lo2[r], "amin")
        cmax = torch.full((n,), float("-inf"), dtype=hi2.dtype).scatter_reduce(0, lab[r], hi2[r], "amax")
        out_lo[r], out_hi[r] = cmin[lab[r]], cmax[lab[r]]
    return out_lo.view(lo.shape), out_hi.view(hi.shape)
