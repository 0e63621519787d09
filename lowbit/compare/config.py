"""What one comparison run holds fixed for every row: model, calibration set, evaluation protocol."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from lowbit.data.sources import source_key
from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from torch import nn

_SCHEME = re.compile(r"^w([1-8])(?:g(\d+))?$")


@dataclass(frozen=True)
class WeightScheme:
    """A peer's weight format, written like ``w4g128`` (``w4`` = per output channel)."""

    bits: int
    group_size: int | None

    @classmethod
    def parse(cls, text: str) -> "WeightScheme":
        m = _SCHEME.match(text.strip().lower())
        if not m or (m.group(2) is not None and int(m.group(2)) <= 0):
            raise LowbitError(f"weight scheme '{text}' is not like w4g128 or w4 (bits 1–8, positive group size)")
        return cls(int(m.group(1)), int(m.group(2)) if m.group(2) else None)

    def __str__(self) -> str:
        return f"w{self.bits}" + (f"g{self.group_size}" if self.group_size else "")

    def nominal_bits(self, in_features: int, zero_point: bool = True) -> float:
        """Bits per weight with a float16 scale (and a float16 zero) per group, per row without groups."""
        return self.bits + (32 if zero_point else 16) / (self.group_size or in_features)

    def mean_bits(self, linears: Iterable[nn.Linear], zero_point: bool = True) -> float:
        """``nominal_bits`` averaged over the layers' weights, each counted by its size."""
        sizes = [(m.weight.numel(), self.nominal_bits(m.in_features, zero_point)) for m in linears]
        return sum(n * b for n, b in sizes) / sum(n for n, _ in sizes)


@dataclass
class CompareConfig:
    model: str
    recipes: list[str]
    peers: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # applied to every recipe (``--set``)
    calib_dataset: str = "c4"
    nsamples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    datasets: list[str] = field(default_factory=lambda: ["wikitext2", "c4"])
    windows: int | None = None
    eval_seqlen: int = 2048
    kl: bool = True
    kl_windows: int | None = None  # KL on the first N windows only (it costs two forwards per window)
    peer_scheme: str = "w4g128"  # default weight format of a peer named without ``@scheme``
    device: str | None = None

    def validate(self) -> "CompareConfig":
        for name, value in (("nsamples", self.nsamples), ("calib_seqlen", self.calib_seqlen),
                            ("eval_seqlen", self.eval_seqlen)):
            if not isinstance(value, int) or value <= 0:
                raise LowbitError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("windows", self.windows), ("kl_windows", self.kl_windows)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise LowbitError(f"{name} must be a positive integer, got {value!r}")
        if not self.recipes and not self.peers:
            raise LowbitError("nothing to compare: name at least one recipe or peer")
        WeightScheme.parse(self.peer_scheme)
        return self

    def protocol(self) -> dict:
        """Everything besides the recipe that decides a row's numbers (part of every cache key)."""
        d = asdict(self)
        for k in ("recipes", "peers", "overrides", "device", "peer_scheme"):
            d.pop(k)
        d["datasets"] = [source_key(x) for x in d["datasets"]]  # a text file by its bytes: an edit is a new set
        if d["kl_windows"] is None:  # added later: left out at its default so that earlier caches stay valid
            d.pop("kl_windows")
        return d

    def kl_window_count(self) -> int | None:
        if self.kl_windows is None:
            return self.windows
        return self.kl_windows if self.windows is None else min(self.kl_windows, self.windows)

    def quantization_protocol(self) -> dict:
        """What decides a row's quantized model (not its evaluation): a change elsewhere re-evaluates only."""
        return {"model": self.model, **self.calibration()}

    def calibration(self) -> dict:
        return {"dataset": self.calib_dataset, "nsamples": self.nsamples, "seqlen": self.calib_seqlen,
                "seed": self.seed}
