"""The ``tuning`` section: after a block's layers are rounded, tune them against the block's full-precision output.

Off by default (``iters: 0``); see ``pipeline.tuning`` for what moves and how.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.recipes.checks import check_bool, check_float, check_int, check_seed

MAX_TUNING_ITERS = 100_000
MAX_TUNING_BATCH = 4_096


@dataclass(frozen=True)
class TuningSpec:
    """``iters`` sign-gradient steps per block, each over ``batch_size`` calibration samples (their first
    ``tokens`` tokens when set: a causal block's outputs there do not depend on what follows). ``lr`` is
    the step in code units (AutoRound's light recipe's 5e-3; its ``1 / iters`` at 10 iterations moved so many
    codes at once that SmolLM2's first block got 30 times worse); ``scales`` also moves each group's scale,
    by up to ``scale_range`` of itself. ``seed`` orders the batches."""

    iters: int = 0
    lr: float = 5e-3
    batch_size: int = 4
    tokens: int | None = None
    scales: bool = True
    scale_range: float = 0.2
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.iters > 0

    def validate(self) -> None:
        check_int(self.iters, "tuning.iters", 0, MAX_TUNING_ITERS)
        check_float(self.lr, "tuning.lr", 0.0, 1.0, lo_open=True)
        check_int(self.batch_size, "tuning.batch_size", 1, MAX_TUNING_BATCH)
        check_int(self.tokens, "tuning.tokens", 1, 1 << 20, null=True)
        check_bool(self.scales, "tuning.scales")
        check_float(self.scale_range, "tuning.scale_range", 0.0, 0.9)
        check_seed(self.seed, "tuning.seed")
