"""BiLLM-style binarization (Huang et al. 2024) with GPTQ's error feedback: OAC's 1-bit base.

Per block of ``blocksize`` columns (after the feedback of earlier blocks):

* **salient columns** — the columns with the largest ``Σ_i w_ij² / U_jj²`` (OBS saliency, ``U`` the
  Cholesky factor of ``H⁻¹``; with OAC's Hessian, saliency by the output loss) get *residual*
  binarization per row: ``α₁·sign(w) + α₂·sign(w − α₁·sign(w))``;
* **the rest** is split per block at a magnitude break point ``p`` into a concentrated
  (``|w| ≤ p``) and a sparse part, each binarized per row as ``α·sign(w)`` (BiLLM's bell-shaped split).

How many salient columns (from ``SALIENT_CANDIDATES``) and which break point (``SPLIT_STEPS``
fractions of the block's largest non-salient ``|w|``) are searched per block, minimising the
OBS-weighted error ``Σ_j ‖w_j − q_j‖² / U_jj²`` — the error GPTQ would feed forward (an
interpretation: BiLLM's text does not fix the search grid or the error it minimises). The
block's error is then fed into later columns as in GPTQ, with the block's binarization fixed.

Stored: one sign per weight, a second sign per salient weight, a split bit per non-salient
weight, a salient-column bitmap, and four float16 ``α`` per row and block — all counted in
the bytes :mod:`lowbit.format` declares, so the effective bits include what BiLLM's own count leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.hessians import robust_cholesky_inverse
from lowbit.rounding.sequential import SequentialProblem

SALIENT_CANDIDATES = (0, 1, 2, 4, 8, 16, 32)
SPLIT_STEPS = 40
# alphas[..., k]: salient first / residual scale, concentrated scale, sparse scale
SAL1, SAL2, CONC, SPARSE = range(4)


def _sign(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


@dataclass
class BinaryWeight:
    signs: torch.Tensor  # (rows, cols) bool: sign of the first binarization (True = +)
    residual: torch.Tensor  # (rows, cols) bool: second sign (used on salient columns)
    split: torch.Tensor  # (rows, cols) bool: non-salient weight in the sparse (large) part
    salient: torch.Tensor  # (cols,) bool
    alphas: torch.Tensor  # (rows, n_blocks, 4)
    blocksize: int
    bits: int = 1
    transform: None = None  # the pipeline's optional parts, absent for binary weights
    lowrank: None = None
    sparse: None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.signs.shape)

    @property
    def numel(self) -> int:
        return self.signs.numel()

    def weight(self) -> torch.Tensor:
        rows, cols = self.shape
        block = torch.arange(cols, device=self.signs.device) // self.blocksize
        a = self.alphas.float()[:, block]  # (rows, cols, 4)
        s1 = torch.where(self.signs, 1.0, -1.0)
        s2 = torch.where(self.residual, 1.0, -1.0)
        salient = a[..., SAL1] * s1 + a[..., SAL2] * s2
        rest = torch.where(self.split, a[..., SPARSE], a[..., CONC]) * s1
        return torch.where(self.salient.unsqueeze(0), salient, rest)

    def cpu(self) -> "BinaryWeight":
        return BinaryWeight(self.signs.cpu(), self.residual.cpu(), self.split.cpu(), self.salient.cpu(),
                            self.alphas.cpu(), self.blocksize)


def _binarize_split(w: torch.Tensor,
                    weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best break point for non-salient columns ``w`` (rows, n): ``(q, split, α_conc, α_sparse)``.
    All ``SPLIT_STEPS - 1`` break points are scored at once; ``(w − α·sign w)² = (|w| − α)²``."""
    mag = w.abs()
    top = mag.max() if w.numel() else torch.zeros((), dtype=w.dtype, device=w.device)
    thresholds = (torch.arange(1, SPLIT_STEPS, dtype=w.dtype, device=w.device) / SPLIT_STEPS) * top
    split = mag.unsqueeze(0) > thresholds[:, None, None]  # (T, rows, n)
    n_s = split.sum(2)
    sum_s = (mag.unsqueeze(0) * split).sum(2)
    a_s = sum_s / n_s.clamp(min=1)
    a_c = (mag.sum(1).unsqueeze(0) - sum_s) / (mag.shape[1] - n_s).clamp(min=1)
    alpha = torch.where(split, a_s[..., None], a_c[..., None])
    err = (((mag.unsqueeze(0) - alpha) ** 2) * weight).sum((1, 2))
    t = int(torch.argmin(err))  # the first of equal errors: the smallest break point, as a loop would pick
    return alpha[t] * _sign(w), split[t], a_c[t], a_s[t]


def _binarize_block(w: torch.Tensor, d: torch.Tensor):
    """BiLLM on one block ``w`` (rows, n) with ``d`` = diag of ``U`` for its columns."""
    rows, n = w.shape
    weight = (1.0 / d**2).unsqueeze(0)  # OBS weighting of each column's error
    order = torch.argsort((w**2).sum(0) / d**2, descending=True)
    best = None
    for k in (k for k in SALIENT_CANDIDATES if k <= n // 2):
        salient = torch.zeros(n, dtype=torch.bool, device=w.device)
        salient[order[:k]] = True
        q = torch.zeros_like(w)
        a1 = a2 = torch.zeros(rows, dtype=w.dtype, device=w.device)
        res = torch.ones_like(w, dtype=torch.bool)
        if k:
            ws = w[:, salient]
            a1 = ws.abs().mean(1)
            r = ws - a1[:, None] * _sign(ws)
            a2 = r.abs().mean(1)
            q[:, salient] = a1[:, None] * _sign(ws) + a2[:, None] * _sign(r)
            res[:, salient] = r >= 0
        q_rest, split_rest, a_c, a_s = _binarize_split(w[:, ~salient], weight[:, ~salient])
        q[:, ~salient] = q_rest
        split = torch.zeros_like(w, dtype=torch.bool)
        split[:, ~salient] = split_rest
        err = float((((w - q) ** 2) * weight).sum())
        if best is None or err < best[0]:
            best = (err, q, salient, res, split, torch.stack([a1, a2, a_c, a_s], dim=1))
    return best[1:]


def billm_quantize(w: torch.Tensor, h: torch.Tensor, *, blocksize: int = 128, damp: float = 0.01,
                   name: str = "layer") -> BinaryWeight:
    """Binarize ``w`` (out, in) given the Hessian ``h`` of its inputs (layer-wise or OAC's)."""
    rows, cols = w.shape
    prob = SequentialProblem.build(w, h, damp, act_order=False)
    upper = robust_cholesky_inverse(prob.h, damp, name).to(torch.float32)
    W = prob.w.to(torch.float32)
    d = torch.diag(upper)
    n_blocks = -(-cols // blocksize)
    signs = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    residual, split = torch.ones_like(signs), torch.zeros_like(signs)
    salient = torch.zeros(cols, dtype=torch.bool, device=W.device)
    alphas = torch.zeros(rows, n_blocks, 4, dtype=torch.float32, device=W.device)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        q, sal, res, spl, alpha = _binarize_block(W1, d[i1:i2])
        alpha = alpha.to(torch.float16).float()  # as stored: feedback sees the stored scales
        signs[:, i1:i2], residual[:, i1:i2], split[:, i1:i2], salient[i1:i2] = W1 >= 0, res, spl, sal
        alphas[:, b] = alpha
        q = BinaryWeight(signs[:, i1:i2], res, spl, sal, alpha.unsqueeze(1), i2 - i1).weight()
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):  # GPTQ's feedback with the block's binarization fixed
            err = (W1[:, i] - q[:, i]) / upper[i1 + i, i1 + i]
            W1[:, i:] -= err.unsqueeze(1) * upper[i1 + i, i1 + i:i2].unsqueeze(0)
            err1[:, i] = err
        W[:, i2:] -= err1 @ upper[i1:i2, i2:]
    return BinaryWeight(signs, residual, split, salient, alphas.to(torch.float16), blocksize)
