"""Low-rank reconstruction of the quantization error (ASER's ER; LoRC when not whitened).

For the output error ``‖(E − M)·Xᵀ‖²_F = ‖(E − M)·S‖²_F`` with ``XᵀX = S·Sᵀ``, the best rank-r
``M`` is the truncated SVD of ``E·S`` mapped back: ``E·S = UΣVᵀ``, ``M = U_rΣ_rV_rᵀ·S⁻¹``
(Eckart–Young in the whitened space). Plain SVD of ``E`` is optimal for ``‖E − M‖_F`` only.
The factors are split as ``A = U_r·Σ_r^½`` and ``B = Σ_r^½·V_rᵀ·S⁻¹`` (the same product as the
paper's ``A = U_rΣ_r``, better balanced for float16 storage) and rounded to float16 here, so the
in-memory model and the checkpoint serve the same branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.hessians.conditioning import damped_copy, with_damping_retries


@dataclass
class LowRank:
    a: torch.Tensor  # (out, r) float16
    b: torch.Tensor  # (r, in) float16

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def product(self) -> torch.Tensor:
        if self.a.dtype == torch.float64:
            return self.a @ self.b
        return self.a.float() @ self.b.float()

    def cpu(self) -> "LowRank":
        return LowRank(self.a.cpu(), self.b.cpu())


def choose_rank(sigma: torch.Tensor, shape: tuple[int, int], rank: int = 0, energy: float | None = None,
                budget: float | None = None) -> int:
    """Fixed ``rank``, or the least rank whose singular values keep ``energy`` of ``Σσ²``; never
    more than ``budget·m·n/(m+n)`` (extra parameters as a fraction of the layer's)."""
    r = rank
    if energy is not None:
        e = sigma.double().pow(2)
        total = float(e.sum())
        r = 0 if total == 0 else int(torch.searchsorted(torch.cumsum(e, 0) / total,
                                                        torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1
    if budget is not None:
        m, n = shape
        r = min(r, int(math.floor(budget * m * n / (m + n))))
    return max(0, min(r, len(sigma)))


def whitening_factor(h: torch.Tensor, damp: float, name: str = "layer") -> torch.Tensor:
    """Lower Cholesky factor ``S`` of the damped Gram matrix; dead inputs get a unit diagonal."""
    h, _ = damped_copy(h.to(torch.float64), damp)
    return with_damping_retries(torch.linalg.cholesky, h, damp, name)


def reconstruct_error(error: torch.Tensor, h: torch.Tensor | None, rank: int = 0, energy: float | None = None,
                      budget: float | None = None, whiten: bool = True, damp: float = 0.01,
                      name: str = "layer", dtype: torch.dtype = torch.float16) -> LowRank | None:
    """``A·B`` ≈ ``error`` (out, in); ``h`` ∝ ``XᵀX`` of the layer's inputs (needed when whitening)."""
    e = error.to(torch.float64)
    if whiten:
        if h is None:
            raise ValueError(f"{name}: whitened low-rank reconstruction needs the layer's Hessian")
        s = whitening_factor(h.to(e.device), damp, name)
        u, sigma, vh = torch.linalg.svd(e @ s, full_matrices=False)
    else:
        u, sigma, vh = torch.linalg.svd(e, full_matrices=False)
    r = choose_rank(sigma, tuple(e.shape), rank, energy, budget)
    if r == 0:
        return None
    root = sigma[:r].sqrt()
    a = u[:, :r] * root
    b = root[:, None] * vh[:r]
    if whiten:  # B = Σ^½·V_rᵀ·S⁻¹  ⇔  Sᵀ·Bᵀ = (Σ^½·V_rᵀ)ᵀ
        b = torch.linalg.solve_triangular(s.T, b.T, upper=True).T
    return LowRank(a.to(dtype), b.to(dtype))
