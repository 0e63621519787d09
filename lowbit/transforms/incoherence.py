"""QuIP's incoherence processing of one linear layer: rescale, normalise, rotate — and undo it.

For ``W`` (out × in) with input Hessian ``H`` (in × in), the proxy loss ``tr(ΔW·H·ΔWᵀ)`` is kept
exactly while the problem is made *incoherent* (no large entries in ``W``, no eigenvector of
``H`` aligned with a coordinate), which is what lets a coarse grid work at 2 bits:

1. ``D = (diag H / diag WᵀW)^{1/4}``: ``W ← W·D``, ``H ← D⁻¹·H·D⁻¹`` balances column norms
   against input energy (optional, the paper's step 1);
2. ``H ← H·n / tr(H)`` so that damping means the same thing for every layer;
3. ``W ← U·W·Vᵀ``, ``H ← V·H·Vᵀ`` with seeded structured orthogonal ``U`` (out) and ``V`` (in).

The quantized layer then computes ``y = Uᵀ·Ŵ·V·(x / d)`` — the transforms run on activations,
never as dense matrices (:mod:`lowbit.runtime.quip`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from lowbit.transforms.orthogonal import make_orthogonal

RESCALE_CLAMP = 1e4  # bounds d to [1e-4, 1e4]: a dead input or an all-zero column cannot blow up


def layer_seed(base_seed: int, name: str) -> int:
    """A per-layer seed that depends only on the recipe seed and the layer's name."""
    digest = hashlib.sha256(f"{base_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


def incoherence(w: torch.Tensor, h: torch.Tensor | None = None) -> tuple[float, float | None]:
    """The paper's μ: ``max|W_ij|·√(mn)/‖W‖_F`` and ``max|Q_ij|·√n`` for the eigenvectors of ``H``."""
    w = w.to(torch.float64)
    mu_w = float(w.abs().max() * (w.numel() ** 0.5) / w.norm().clamp_min(1e-300))
    mu_h = None
    if h is not None:
        _, q = torch.linalg.eigh(h.to(torch.float64))
        mu_h = float(q.abs().max() * (h.shape[0] ** 0.5))
    return mu_w, mu_h


@dataclass
class Incoherence:
    """The transforms of one layer: ``in_scale`` is ``d`` (length in), seeds rebuild ``U`` and ``V``."""

    kind: str
    seed_out: int
    seed_in: int
    in_scale: torch.Tensor

    def __post_init__(self) -> None:
        self.u = self.v = None  # the structured orthogonals, rebuilt from the seeds by bind()

    # -- construction ------------------------------------------------------------------
    @classmethod
    def fit(cls, w: torch.Tensor, h: torch.Tensor | None, kind: str, seed: int, name: str = "layer",
            rescale: bool = True) -> "Incoherence":
        """Seeds from ``(seed, name)``; ``d`` from ``diag H`` and ``W``'s column norms (1 without ``H``)."""
        d = torch.ones(w.shape[1], dtype=torch.float64)
        if rescale and h is not None:
            h_diag = torch.diag(h).to(torch.float64)
            w_norm = w.to(torch.float64).pow(2).sum(0)
            live = (h_diag > 0) & (w_norm > 0)  # dead inputs / empty columns keep d = 1
            d[live] = (h_diag[live] / w_norm[live]) ** 0.25
            d = (d / d[live].pow(2).mean().sqrt() if live.any() else d)  # the overall scale is arbitrary
            d = d.clamp(1 / RESCALE_CLAMP, RESCALE_CLAMP)
        s = layer_seed(seed, name)
        t = cls(kind, seed_out=s, seed_in=s + 1, in_scale=d.to(torch.float32).cpu())
        t.bind(w.shape[0], w.shape[1])
        return t

    def bind(self, out_features: int, in_features: int) -> "Incoherence":
        """Rebuild ``U`` and ``V`` for a layer of this shape (after loading from a checkpoint)."""
        self.u = make_orthogonal(self.kind, out_features, self.seed_out)
        self.v = make_orthogonal(self.kind, in_features, self.seed_in)
        return self

    # -- weights and Hessians ----------------------------------------------------------
    def forward_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``U·(W·D)·Vᵀ``"""
        w = w * self.in_scale.to(w)
        w = self.v.apply(w)  # rows: (W D) Vᵀ
        return self.u.apply(w.T).T  # columns: U (·)

    def inverse_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The dense weight that acts on the original inputs: ``Uᵀ·W'·V·D⁻¹``."""
        w = self.u.apply_t(w.T).T
        w = self.v.apply_t(w)
        return w / self.in_scale.to(w)

    def forward_hessian(self, h: torch.Tensor) -> torch.Tensor:
        """``V·D⁻¹·H·D⁻¹·Vᵀ``, normalised to ``tr = n``."""
        inv = 1 / self.in_scale.to(h)
        h = h * inv.unsqueeze(0) * inv.unsqueeze(1)
        h = self.v.apply(self.v.apply(h).T).T
        h = (h + h.T) / 2
        return h * (h.shape[0] / torch.trace(h).clamp_min(1e-300))

    def metadata(self) -> dict:
        """What a checkpoint records besides ``in_scale``: :meth:`from_metadata` rebuilds the rest."""
        return {"kind": self.kind, "seed_out": self.seed_out, "seed_in": self.seed_in}

    @classmethod
    def from_metadata(cls, meta: dict, in_scale: torch.Tensor, out_features: int) -> "Incoherence":
        return cls(meta["kind"], meta["seed_out"], meta["seed_in"], in_scale).bind(out_features, in_scale.numel())
