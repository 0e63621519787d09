"""What a quantization run measured: per-layer errors and times, totals, peak memory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class LayerReport:
    name: str
    block: int
    shape: tuple[int, int]
    bits: int
    method: str
    proxy_loss: float | None  # tr(ΔW·H·ΔWᵀ) with the undamped Hessian
    rel_output_error: float | None  # tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ) = ‖ΔW·X‖² / ‖W·X‖²
    rel_weight_error: float  # ‖ΔW‖² / ‖W‖²
    seconds: float
    tokens: int | None = None  # calibration tokens that reached the layer (an expert: those routed to it)


@dataclass
class QuantReport:
    recipe: str
    layers: list[LayerReport] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    capture_seconds: float = 0.0
    hessian_pass: dict = field(default_factory=dict)  # output-adaptive gradient pass: seconds, peak memory
    activation_seconds: float = 0.0  # observing ranges, clustering, folding (activation quantization)
    activation_quantizers: int = 0
    total_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    resumed_blocks: int = 0
    tuning: list[dict] = field(default_factory=list)  # per tuned block: output error before / after, seconds

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1))

    def table(self) -> str:
        rows = ["block  layer                          bits  rel.out.err  rel.w.err   time(s)"]
        for r in self.layers:
            out = f"{r.rel_output_error:11.3e}" if r.rel_output_error is not None else "          -"
            rows.append(f"{r.block:5d}  {r.name:30s} {r.bits:4d}  {out}  {r.rel_weight_error:9.3e}  {r.seconds:8.2f}")
        rows.append(f"total {self.total_seconds:.1f} s, peak memory {self.peak_memory_mb:.0f} MB")
        return "\n".join(rows)


    def worst(self, k: int = 5) -> str:
        """The ``k`` layers with the largest relative output error (weight error without a Hessian)."""
        key = (lambda r: r.rel_output_error) if all(r.rel_output_error is not None for r in self.layers) else (
            lambda r: r.rel_weight_error)
        rows = sorted(self.layers, key=key, reverse=True)[:k]
        return "\n".join(f"  {r.name:40s} {key(r):.3e}" for r in rows)
