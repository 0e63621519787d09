"""Wall time per phase and the whole process's peak memory, for the one summary line a command prints.

Light on purpose (no torch): the CLI creates it before anything heavy is imported.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


def process_peak_mb() -> float:
    """Peak resident memory of this process since it started (loading and saving included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


@dataclass
class Phases:
    """``with phases("load"): …`` adds that block's seconds under its name (in first-seen order)."""

    start: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def summary(self) -> str:
        total = time.perf_counter() - self.start
        split = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        return f"wall time {total:.1f} s ({split}); peak memory {process_peak_mb():.0f} MB (whole process)"
