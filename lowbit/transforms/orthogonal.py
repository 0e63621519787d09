"""Seeded structured orthogonal matrices that are applied fast and never stored densely.

Two families, as in QuIP and its successors:

- :class:`RandomHadamard` — ``V = (H_{2^k}/√2^k ⊗ Q_b)·diag(s)`` for ``n = 2^k·b`` with ``b`` odd:
  a Walsh–Hadamard transform on the power-of-two factor (``O(n log n)``: radix-≤32 butterfly
  passes, see :func:`hadamard_blocks`), a small seeded random orthogonal ``b×b`` block for the
  odd factor (no Hadamard matrix exists for b = 3, 9, …), and random signs ``s``. For
  power-of-two widths it is the randomized Hadamard transform of QuIP#.
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
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).contiguous()


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


def sylvester(n: int) -> torch.Tensor:
    """The orthonormal Sylvester–Hadamard matrix of a power-of-two order (float64)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard_blocks(pow2: int, max_block_bits: int = 5) -> list[int]:
    """Orders of the Sylvester blocks whose Kronecker product is ``H_{pow2}``, each ≤ 2^max_block_bits.

    Applying ``H_{2^k}`` as ``⌈k/5⌉`` passes of a ≤32×32 matrix product is the butterfly with radix
    32: still ``O(n log n)`` work, but each pass is one BLAS call instead of five elementwise ones.
    """
    k = pow2.bit_length() - 1
    parts = max(1, math.ceil(k / max_block_bits))
    bits = [k // parts + (1 if i < k % parts else 0) for i in range(parts)]
    return [2**b for b in bits]


def kron_apply(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """``(F_1 ⊗ … ⊗ F_m)·x`` for every row vector ``x`` along the last dimension (row-major index)."""
    lead, n = x.shape[:-1], x.shape[-1]
    before = 1
    for f in factors:
        size = f.shape[0]
        after = n // (before * size)
        y = x.reshape(-1, before, size, after)
        x = f @ y if after > 1 else (y.squeeze(-1) @ f.T).unsqueeze(-1)
        before *= size
    return x.reshape(*lead, n)


@dataclass
class _Structured:
    """An orthogonal ``V = (F_1 ⊗ … ⊗ F_m)·S`` with small dense factors and a signed permutation ``S``."""

    n: int
    seed: int

    def __post_init__(self) -> None:
        self._factors, self._perm, self._signs = self._build(torch.Generator().manual_seed(self.seed))
        self._inv_perm = torch.argsort(self._perm) if self._perm is not None else None
        self._cache: dict = {}

    def _build(self, g: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    def _on(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """Factors, their transposes and the signs on ``x``'s device and dtype (cached)."""
        key = (x.dtype, x.device)
        if key not in self._cache:
            fs = [f.to(x.device, x.dtype) for f in self._factors]
            signs = self._signs.to(x.device, x.dtype) if self._signs is not None else None
            self._cache[key] = (fs, [f.T.contiguous() for f in fs], signs)
        return self._cache[key]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        fs, _, signs = self._on(x)
        if self._perm is not None:
            x = x[..., self._perm.to(x.device)]  # (P·x)_i = x_perm[i]
        if signs is not None:
            x = x * signs
        return kron_apply(x, fs)

    def apply_t(self, x: torch.Tensor) -> torch.Tensor:
        _, fts, signs = self._on(x)
        x = kron_apply(x, fts)
        if signs is not None:
            x = x * signs
        if self._inv_perm is not None:
            x = x[..., self._inv_perm.to(x.device)]
        return x

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``n×n`` matrix — for tests and small problems only."""
        return self.apply(torch.eye(self.n, dtype=dtype)).T


@dataclass
class RandomHadamard(_Structured):
    """``(H_{2^k} ⊗ Q_b)·diag(s)``: Sylvester blocks of ≤ 32 with the odd block folded into the last."""

    kind: str = field(default="hadamard", init=False)

    def _build(self, g):
        signs = torch.randint(0, 2, (self.n,), generator=g, dtype=torch.float64) * 2 - 1
        pow2, odd = split_power_of_two(self.n)
        factors = [sylvester(b) for b in hadamard_blocks(pow2)] if pow2 > 1 else []
        block = haar_orthogonal(odd, g)
        factors = factors[:-1] + [torch.kron(factors[-1], block)] if factors else [block]
        return factors, None, signs


@dataclass
class RandomKronecker(_Structured):
    """``(Q_p ⊗ Q_q)·P``: the paper's two Haar-random orthogonal factors and a random permutation."""

    kind: str = field(default="kron", init=False)

    def _build(self, g):
        p, q = balanced_factors(self.n)
        left, right = haar_orthogonal(p, g), haar_orthogonal(q, g)
        return [left, right], torch.randperm(self.n, generator=g), None


KINDS = {"hadamard": RandomHadamard, "kron": RandomKronecker}


def make_orthogonal(kind: str, n: int, seed: int) -> RandomHadamard | RandomKronecker:
    if kind not in KINDS:
        raise LowbitError(f"unknown orthogonal transform '{kind}' (known: {', '.join(KINDS)})")
    return KINDS[kind](n, seed)
