"""What tuning moves in a rounded layer, around any rounding's result (RTN, GPTQ, LDLQ; QuIP's rotated codes).

Each code is ``round(codes + f + v)``: ``f`` is where in its rounding cell the float weight sat (in
``(-0.5, 0.5)``; a code that GPTQ's error feedback moved off the nearest value sits at the edge of its cell),
``v`` in ``[-0.5, 0.5]`` is learnt, the rounding seen through as the identity by the gradient
(straight-through) — AutoRound's offsets, on top of any rounding's codes: a weight near the edge of its cell
flips with a small ``v``, one in the middle of it needs a large one. Each group's scale may move by a factor
``a``, ``|a - 1| ≤ scale_range``. ``v = 0, a = 1`` is the rounding's own result exactly. The weight is
rebuilt as ``QuantizedWeight.weight`` builds it (outliers, the inverse incoherence transform, a low-rank
branch), so the gradient reaches codes that live in a rotated space.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.rounding.quantized import QuantizedWeight, SparseOutliers


@dataclasses.dataclass
class Tunable:
    qw: QuantizedWeight
    base: torch.Tensor  # (out, in): the codes plus where in its cell the float weight sat, code steps
    offset: torch.Tensor  # (out, in), learnt, code steps
    scale_factor: torch.Tensor | None  # (out, n_groups), around 1; None: the scales stay

    @classmethod
    def start(cls, qw: QuantizedWeight, scales: bool, device: torch.device,
              w: torch.Tensor | None = None) -> Tunable:
        """Zero offsets and unit factors around ``qw``, ``w`` the float weight it rounds (without it, every code
        starts in the middle of its cell). Scales that are themselves quantized (SpQR's second level) stay."""
        codes = qw.codes.to(device, torch.float32)
        base = codes
        if w is not None:
            w = w.to(device, torch.float64)
            if qw.transform is not None:
                w = qw.transform.forward_weight(w)
            g = qw.g_idx.to(device).long()
            continuous = w / qw.scale.to(device, torch.float64)[:, g] + qw.zero.to(device, torch.float64)[:, g]
            inside = (continuous - codes).nan_to_num(0.0)
            # a code the rounding moved off the nearest value (GPTQ's feedback) was chosen: it starts mid-cell
            base = codes + torch.where(inside.abs() < 0.5, inside, 0.0).clamp(-0.49, 0.49).to(torch.float32)
        offset = torch.zeros(qw.codes.shape, dtype=torch.float32, device=device, requires_grad=True)
        factor = None
        if scales and qw.scale_stats is None:
            factor = torch.ones(qw.scale.shape, dtype=torch.float32, device=device, requires_grad=True)
        return cls(qw, base, offset, factor)

    def _scale(self) -> torch.Tensor:
        """The scales as the checkpoint stores them (float16 values, as the grids fit them), so that the model
        tuned is the model saved; the float16 rounding is the identity for the gradient."""
        scale = self.qw.scale.to(self.offset.device, torch.float32)
        if self.scale_factor is None:
            return scale
        scale = scale * self.scale_factor
        return scale + (scale.to(torch.float16).float() - scale).detach()

    def weight(self) -> torch.Tensor:
        """The layer's weight for the current offsets and factors, differentiable in both (float32): the
        rounding's own ``QuantizedWeight.weight`` on straight-through codes and the current scales."""
        qw, dev = self.qw, self.offset.device
        c = self.base + self.offset
        codes = (c + (c.round() - c).detach()).clamp(0, 2**qw.bits - 1)  # round(c), identity for the gradient
        sparse = SparseOutliers(qw.sparse.index.to(dev), qw.sparse.values.to(dev)) if qw.sparse is not None else None
        return dataclasses.replace(qw, codes=codes, scale=self._scale(), zero=qw.zero.to(dev), g_idx=qw.g_idx.to(dev),
                                   sparse=sparse).weight()

    @torch.no_grad()
    def sign_step(self, lr: float, scale_range: float) -> None:
        """Signed-gradient descent, AutoRound's update: every parameter moves by ``lr`` against its gradient's sign."""
        self.offset -= lr * self.offset.grad.sign()
        self.offset.clamp_(-0.5, 0.5)
        self.offset.grad = None
        if self.scale_factor is not None:  # its range crossed in as many steps as the offsets' range
            self.scale_factor -= lr * scale_range * self.scale_factor.grad.sign()
            self.scale_factor.clamp_(1.0 - scale_range, 1.0 + scale_range)
            self.scale_factor.grad = None

    @torch.no_grad()
    def result(self) -> QuantizedWeight:
        """The tuned codes and scales as a quantized weight (on the host, like every rounding's result)."""
        codes = (self.base + self.offset).round().clamp(0, 2**self.qw.bits - 1)
        scale = self._scale().to(self.qw.scale.dtype)
        return dataclasses.replace(self.qw, codes=codes.to(self.qw.codes.dtype).cpu(), scale=scale.cpu())

    def state(self) -> dict[str, torch.Tensor]:
        return {"offset": self.offset.detach().clone(),
                **({"scale_factor": self.scale_factor.detach().clone()} if self.scale_factor is not None else {})}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.offset.copy_(state["offset"])
        if self.scale_factor is not None:
            self.scale_factor.copy_(state["scale_factor"])
