"""Seeded structured orthogonal matrices that are applied fast and never stored densely.

Two families, as in QuIP and its successors:

- :class:`RandomHadamard` — ``V = (H_{2^k}/√2^k ⊗ Q_b)·diag(s)`` for ``n = 2^k·b`` with ``b`` odd:
  a Walsh–Hadamard transform on the power-of-two factor (``O(n log n)``), a small seeded random
  orthogonal ``b×b`` block for the odd factor (no Hadamard matrix exists for b = 3, 9, …), and
  random signs ``s``. For power-of-two widths it is the randomized Hadamard transform of QuIP#.
- :class:`RandomKronecker` — ``V = (Q_p ⊗ Q_q)·P`` with ``n = p·q`` (p the largest divisor
  ``≤ √n``), two seeded Haar-random orthogonal factors and a random permutation ``P``: the
  paper's construction (``O(n(p+q))`` to apply).

Both are rebuilt from ``(n, seed)`` alone, so checkpoints store seeds, not matrices. Convention:
``apply(x)`` computes ``V·x`` for every row vector ``x`` along the last dimension (``x @ Vᵀ``);
``apply_t(x)`` computes ``Vᵀ·x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lowbit.errors import LowbitError


def haar_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random ``n×n`` orthogonal matrix (float64): QR of a Gaussian with the sign fix."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def fwht(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal fast Walsh–Hadamard transform along ``dim`` (length a power of two)."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    if n & (n - 1):
        raise LowbitError(f"Walsh–Hadamard transform needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    y = y.reshape(*lead, n) / math.sqrt(n)
    return y.movedim(-1, dim)


def split_power_of_two(n: int) -> tuple[int, int]:
    """``n = 2^k · b`` with ``b`` odd -> ``(2^k, b)``."""
    p = n & -n
    return p, n // p


def balanced_factors(n: int) -> tuple[int, int]:
    """``n = p·q`` with ``p`` the largest divisor not above ``√n`` (``p = 1`` for primes)."""
    p = int(math.isqrt(n))
    while n % p:
        p -= 1
    return p, n // p


class _Structured:
    n: int
    seed: int

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The factors on ``x``'s device (floats in its dtype), cached per (dtype, device)."""
        key = (x.dtype, x.device)
        if key not in self._cache:
            self._cache[key] = tuple(t.to(x.device, x.dtype if t.is_floating_point() else t.dtype)
                                     for t in self._tensors())
        return self._cache[key]

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``n×n`` matrix — for tests and small problems only."""
        return self.apply(torch.eye(self.n, dtype=dtype)).T

    def describe(self) -> dict:
        return {"kind": self.kind, "n": self.n, "seed": self.seed}


@dataclass
class RandomHadamard(_Structured):
    n: int
    seed: int
    kind: str = field(default="hadamard", init=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.pow2, self.odd = split_power_of_two(self.n)
        self.signs = torch.randint(0, 2, (self.n,), generator=g, dtype=torch.float64) * 2 - 1
        self.block = haar_orthogonal(self.odd, g)
        self._cache: dict = {}

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.signs, self.block

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        signs, block = self._params(x)
        y = (x * signs).reshape(*x.shape[:-1], self.pow2, self.odd)
        y = fwht(y, dim=-2)
        if self.odd > 1:
            y = y @ block.T
        return y.reshape(x.shape)

    def apply_t(self, x: torch.Tensor) -> torch.Tensor:
        signs, block = self._params(x)
        y = x.reshape(*x.shape[:-1], self.pow2, self.odd)
        if self.odd > 1:
            y = y @ block
        y = fwht(y, dim=-2)  # symmetric and orthonormal: its own inverse
        return y.reshape(x.shape) * signs


@dataclass
class RandomKronecker(_Structured):
    n: int
    seed: int
    kind: str = field(default="kron", init=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.p, self.q = balanced_factors(self.n)
        self.left = haar_orthogonal(self.p, g)
        self.right = haar_orthogonal(self.q, g)
        self.perm = torch.randperm(self.n, generator=g)
        self.inv_perm = torch.argsort(self.perm)
        self._cache: dict = {}

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.left, self.right, self.perm, self.inv_perm

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        left, right, perm, _ = self._params(x)
        y = x[..., perm].reshape(*x.shape[:-1], self.p, self.q)  # (P·x)_i = x_perm[i]
        return (left @ y @ right.T).reshape(x.shape)

    def apply_t(self, x: torch.Tensor) -> torch.Tensor:
        left, right, _, inv = self._params(x)
        y = x.reshape(*x.shape[:-1], self.p, self.q)
        y = (left.T @ y @ right).reshape(x.shape)
        return y[..., inv]


KINDS = {"hadamard": RandomHadamard, "kron": RandomKronecker}


def make_orthogonal(kind: str, n: int, seed: int) -> RandomHadamard | RandomKronecker:
    if kind not in KINDS:
        raise LowbitError(f"unknown orthogonal transform '{kind}' (known: {', '.join(KINDS)})")
    return KINDS[kind](n, seed)
