"""Per-block progress on disk, so an interrupted run resumes at the first unfinished block.

Only each finished block's quantized weights are stored (not activations): on resume the
calibration inputs are replayed through the finished blocks, which costs a forward pass and
reproduces the uninterrupted run's inputs exactly (none when every block is stored). A
fingerprint of the model, recipe and calibration tokens guards against resuming a different run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lowbit.atomic import atomic_path, atomic_write_text, save_tensors
from lowbit.errors import LowbitError, ResumeMismatch
from lowbit.format import LayerSpec
from lowbit.format.codec import decode, encode, spec_of
from lowbit.rounding import QuantizedWeight

# 2: a block's layers are stored as checkpoints store them (lowbit.format); 1: unpacked codes and float scales
VERSION = 2


def fingerprint(model_source: str, recipe: dict, calib: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(model_source.encode())
    h.update(json.dumps(recipe, sort_keys=True).encode())
    h.update(calib.numpy().tobytes())
    return h.hexdigest()


def _read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("fingerprint"), str) and isinstance(data.get("done"), list):
            if data.get("version", 1) != VERSION:  # a caller may start afresh, as for another run's state
                raise ResumeMismatch(f"resume state {path} was written by another lowbit version (format "
                                     f"{data.get('version', 1)}, this one reads {VERSION}): rerun without --resume")
            return data
    except (ValueError, UnicodeDecodeError):
        pass
    raise LowbitError(f"resume state {path} is damaged: rerun without --resume to start afresh")


class ProgressStore:
    def __init__(self, root: Path, fp: str, resume: bool):
        self.root = Path(root)
        self.manifest = self.root / "manifest.json"
        self.done: list[int] = []
        self.block_seconds: dict[str, float] = {}  # of the run that quantized each block
        self.peak_memory_mb = 0.0
        self.costs: dict = {}  # the run's costs outside the blocks (calibration capture, OAC's pass)
        if resume and self.manifest.exists():
            data = _read_manifest(self.manifest)
            if data["fingerprint"] != fp:
                raise ResumeMismatch(
                    f"cannot resume from {self.root}: it belongs to a different model, recipe or calibration set"
                )
            self.done = data["done"]
            self.block_seconds = data.get("block_seconds", {})
            self.peak_memory_mb = data.get("peak_memory_mb", 0.0)
            self.costs = data.get("costs", {})
        elif self.root.exists():
            for pattern in ("block_*", "oac_*"):
                for f in self.root.glob(pattern):
                    f.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        self.fp = fp
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_text(self.manifest, json.dumps({"version": VERSION, "fingerprint": self.fp, "done": self.done,
                                                     "block_seconds": self.block_seconds,
                                                     "peak_memory_mb": self.peak_memory_mb,
                                                     "costs": self.costs}))

    def save_costs(self, **costs) -> None:
        """Kept so that a run resumed with every block stored, which repeats neither, still reports them."""
        self.costs.update(costs)
        self._write_manifest()

    @property
    def hessian_state(self) -> Path:
        """Where OAC's gradient pass keeps its running sums (see ``output_adaptive_hessians``)."""
        return self.root / "oac_hessians.safetensors"

    def finish(self) -> None:
        """Every block is stored: the gradient pass's sums (~0.5 GB on SmolLM2) are no longer needed."""
        for f in self.root.glob("oac_*"):  # one file per gradient pass
            f.unlink()

    def save_block(self, index: int, weights: dict[str, QuantizedWeight], report: list[dict],
                   seconds: float = 0.0, peak_memory_mb: float = 0.0) -> None:
        specs = {name: spec_of(qw) for name, qw in weights.items()}
        tensors = {f"{name}.{k}": v.cpu() for name, qw in weights.items() for k, v in encode(specs[name], qw).items()}
        meta = {name: json.dumps(spec.to_json()) for name, spec in specs.items()}
        with atomic_path(self.root / f"block_{index:04d}.safetensors") as tmp:
            save_tensors(tensors, tmp, metadata=meta)
        atomic_write_text(self.root / f"block_{index:04d}.json", json.dumps(report))
        self.done.append(index)
        self.block_seconds[str(index)] = seconds
        self.peak_memory_mb = max(self.peak_memory_mb, peak_memory_mb)
        self._write_manifest()

    def save_activation_plan(self, index: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Written before the block's weights: the block counts as done only once both exist."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(self.root / f"block_{index:04d}_act.safetensors") as tmp:
            save_tensors(tensors, tmp, metadata={"quantizers": json.dumps(meta)})

    def load_activation_plan(self, index: int) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors import safe_open

        path = self.root / f"block_{index:04d}_act.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["quantizers"])
        return load_file(str(path)), meta

    def load_block(self, index: int) -> tuple[dict[str, QuantizedWeight], list[dict]]:
        path = self.root / f"block_{index:04d}.safetensors"
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        weights = {}
        for name, raw in meta.items():
            prefix = f"{name}."
            weights[name] = decode(LayerSpec.from_json(json.loads(raw)),
                                   {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
        report = json.loads((self.root / f"block_{index:04d}.json").read_text())
        return weights, report
