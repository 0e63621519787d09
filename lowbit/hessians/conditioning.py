"""Making a Hessian usable: dead inputs, damping, and Cholesky with automatic damping retries."""

from __future__ import annotations

import logging

import torch

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


def condition_hessian(h: torch.Tensor, w: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a damped copy of ``h`` and ``w`` with dead inputs (``H_ii == 0``) zeroed.

    Dead inputs carry no signal, so their weights cannot matter to the output; setting
    ``H_ii = 1`` keeps the matrix invertible (GPTQ's rule).
    """
    h, dead = damped_copy(h, damp)
    w = w.clone()
    w[:, dead] = 0.0
    return h, w


def damped_copy(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``h`` with dead inputs set to ``H_ii = 1`` and damping added; and the dead mask."""
    h = h.clone()
    return h, damp_in_place(h, damp)


def damp_in_place(h: torch.Tensor, damp: float) -> torch.Tensor:
    """In place: dead inputs set to ``H_ii = 1``, damping added (the diagonal alone changes); the dead mask."""
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    add_damping(h, damp)
    return dead


def add_damping(h: torch.Tensor, damp: float) -> None:
    """In place: ``H += damp · mean(diag H) · I``."""
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp * torch.mean(torch.diag(h))


def permute_symmetric_(h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """In place: ``h[perm][:, perm]`` (the same bits), moving rows then columns along the permutation's cycles
    with one row of scratch: indexing would hold two more n×n matrices at once (1.9 GB at 11008 inputs)."""
    order = perm.tolist()
    for dim in (0, 1):
        seen = [False] * len(order)
        for start, target in enumerate(order):
            if seen[start] or target == start:
                continue
            first = h.select(dim, start).clone()
            i = start
            while True:  # slot i takes what sits at order[i]
                seen[i] = True
                j = order[i]
                if j == start:
                    h.select(dim, i).copy_(first)
                    break
                h.select(dim, i).copy_(h.select(dim, j))
                i = j
    return h


def robust_cholesky_inverse(
    h: torch.Tensor, damp: float, name: str = "layer", retries: int = 6
) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹`` (GPTQ's form), with :func:`with_damping_retries`.

    The three steps write into one new matrix (``out=`` the input: LAPACK works in place, and the results are
    the same bits as with fresh outputs): at a 7B model's 11008 inputs each float64 copy is 0.97 GB."""

    def factor(m: torch.Tensor) -> torch.Tensor:
        f = torch.linalg.cholesky(m)
        torch.cholesky_inverse(f, out=f)
        return torch.linalg.cholesky(f, upper=True, out=f)

    return with_damping_retries(factor, h, damp, name, retries)


def robust_udu(
    h: torch.Tensor, damp: float, name: str = "layer", retries: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``H = (I+A)·diag(d)·(I+A)ᵀ`` with ``A`` strictly upper triangular (LDLQ's form).

    The reversed-order LDL: the Cholesky factor of ``H`` with rows and columns flipped is lower
    triangular, so flipping it back gives an upper ``V`` with ``H = V·Vᵀ``; ``V = (I+A)·diag(√d)``.
    """

    def factor(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.linalg.cholesky(m.flip(0, 1)).flip(0, 1)
        s = torch.diagonal(v)
        unit = v / s.unsqueeze(0)
        return unit - torch.eye(m.shape[0], dtype=m.dtype, device=m.device), s * s

    return with_damping_retries(factor, h, damp, name, retries)


def with_damping_retries(factor, h: torch.Tensor, damp: float, name: str = "layer", retries: int = 6):
    """``factor(h)``; when ``h`` is not positive definite add 10× more damping and try again.

    ``h`` must already carry ``damp``; each retry raises the total damping tenfold. The last
    failure raises a :class:`LowbitError` naming the layer.
    """
    base = torch.mean(torch.diag(h)) / (1 + damp) if damp > 0 else torch.mean(torch.diag(h))
    current = damp
    for attempt in range(retries + 1):
        try:
            result = factor(h)
            parts = result if isinstance(result, tuple) else (result,)
            # a non-finite entry makes the sum non-finite; isfinite(p) would take 1.4 copies of p at its peak
            if not all(torch.isfinite(p.sum()) for p in parts):
                raise torch.linalg.LinAlgError("non-finite factor")
            if attempt:
                log.warning("%s: Hessian needed damping %.3g to be positive definite", name, current)
            return result
        except torch.linalg.LinAlgError:
            new = max(current, 1e-6) * 10
            diag = torch.arange(h.shape[0], device=h.device)
            h = h.clone()
            h[diag, diag] += (new - current) * base
            current = new
    raise LowbitError(
        f"{name}: Hessian is not positive definite even with damping {current:.3g}; "
        "check the calibration data (NaN/inf activations?) or raise weights.damp"
    )
