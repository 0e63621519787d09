"""The ``rotation`` section: QuaRot's rotation of the residual stream, folded into the weights before any block is
quantized (``surgery.rotation``). Off by default (``kind: none``)."""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.recipes.checks import check_choice, check_seed

ROTATIONS = ("none", "hadamard", "kron")


@dataclass(frozen=True)
class RotationSpec:
    """``kind``: ``hadamard`` (randomized Hadamard, Kronecker-extended where the width is not a power of two) or
    ``kron`` (a Kronecker of random orthogonals); ``seed`` draws it."""

    kind: str = "none"
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def validate(self) -> None:
        check_choice(self.kind, "rotation.kind", ROTATIONS)
        check_seed(self.seed, "rotation.seed")
