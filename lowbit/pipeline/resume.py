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
from lowbit.grids.stats import ScaleStats
from lowbit.rounding import QuantizedWeight
from lowbit.rounding.binary import BinaryWeight
from lowbit.rounding.quantized import SparseOutliers
from lowbit.transforms.incoherence import Incoherence
from lowbit.transforms.lowrank import LowRank

FIELDS = ("codes", "scale", "zero", "g_idx")
BINARY_FIELDS = ("signs", "residual", "split", "salient", "alphas")


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
        atomic_write_text(self.manifest, json.dumps({"fingerprint": self.fp, "done": self.done,
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
        binary = {name: qw for name, qw in weights.items() if isinstance(qw, BinaryWeight)}
        weights = {name: qw for name, qw in weights.items() if name not in binary}
        tensors = {f"{name}.{f}": getattr(qw, f).contiguous() for name, qw in weights.items() for f in FIELDS}
        tensors.update({f"{name}.{f}": getattr(qw, f).contiguous()
                        for name, qw in binary.items() for f in BINARY_FIELDS})
        tensors.update({f"{name}.in_scale": qw.transform.in_scale.contiguous()
                        for name, qw in weights.items() if qw.transform is not None})
        for name, qw in weights.items():
            if qw.lowrank is not None:
                tensors[f"{name}.lowrank_a"] = qw.lowrank.a.contiguous()
                tensors[f"{name}.lowrank_b"] = qw.lowrank.b.contiguous()
            if qw.sparse is not None:
                tensors[f"{name}.outlier_index"] = qw.sparse.index.contiguous()
                tensors[f"{name}.outlier_value"] = qw.sparse.values.contiguous()
            if qw.scale_stats is not None:
                st = qw.scale_stats
                tensors[f"{name}.scale_codes"], tensors[f"{name}.scale_lo"] = st.codes.contiguous(), st.lo.contiguous()
                tensors[f"{name}.scale_step"] = st.step.contiguous()
        meta = {name: json.dumps({"bits": qw.bits, "transform": qw.transform.metadata() if qw.transform else None,
                                  "stats_bits": qw.scale_stats.bits if qw.scale_stats is not None else None})
                for name, qw in weights.items()}
        meta.update({name: json.dumps({"bits": 1, "binary_blocksize": qw.blocksize}) for name, qw in binary.items()})
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
            info = json.loads(raw)
            if "binary_blocksize" in info:
                weights[name] = BinaryWeight(*(tensors[f"{name}.{f}"] for f in BINARY_FIELDS), info["binary_blocksize"])
                continue
            qw = QuantizedWeight(*(tensors[f"{name}.{f}"] for f in FIELDS), bits=info["bits"])
            if info["transform"] is not None:
                qw.transform = Incoherence.from_metadata(info["transform"], tensors[f"{name}.in_scale"],
                                                         qw.codes.shape[0])
            if f"{name}.lowrank_a" in tensors:
                qw.lowrank = LowRank(tensors[f"{name}.lowrank_a"], tensors[f"{name}.lowrank_b"])
            if f"{name}.outlier_index" in tensors:
                qw.sparse = SparseOutliers(tensors[f"{name}.outlier_index"], tensors[f"{name}.outlier_value"])
            if info.get("stats_bits"):
                qw.scale_stats = ScaleStats(tensors[f"{name}.scale_codes"], tensors[f"{name}.scale_lo"],
                                            tensors[f"{name}.scale_step"], info["stats_bits"])
            weights[name] = qw
        report = json.loads((self.root / f"block_{index:04d}.json").read_text())
        return weights, report
