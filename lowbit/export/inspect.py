"""``lowbit inspect``: what a saved checkpoint holds, read from its files without building the model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from lowbit.backends import cpu_backend
from lowbit.errors import LowbitError
from lowbit.format import LayerSpec, groups_key
from lowbit.models.resolve import CHECKPOINT_MARKER, INDEX, tensor_files, tensor_shape

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class LayerSummary:
    name: str
    shape: tuple[int, int]
    bits: int
    group_size: int | None
    extras: str  # act-order, incoherence, low-rank rank
    bytes: int  # everything stored under the layer's prefix
    rel_output_error: float | None
    backend: str = "reference"  # the CPU back-end lowbit.runtime.kernels gives it (eval --kernels)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / (self.shape[0] * self.shape[1])


@dataclass
class CheckpointSummary:
    path: Path
    base_model: str | None
    recipe: dict
    layers: list[LayerSummary]
    activation_quantizers: int
    total_bytes: int
    quant_seconds: float | None
    parameters: int = 0  # of the whole model: quantized weights and every other tensor, tied ones once

    def table(self) -> str:
        name = self.recipe.get("name", "?")
        lines = [f"{self.path}: recipe {name} on {self.base_model}",
                 f"  {self.recipe.get('description', '')}".rstrip(),
                 f"  {len(self.layers)} quantized layers, {self.activation_quantizers} activation quantizers, "
                 f"tensors {self.total_bytes / 2**20:.1f} MB"
                 + (f" for {self.parameters / 1e6:.1f}M parameters ({8 * self.total_bytes / self.parameters:.2f} "
                    "bits per parameter, embeddings and every float tensor included)" if self.parameters else "")
                 + (f", quantized in {self.quant_seconds:.1f} s" if self.quant_seconds else ""),
                 "",
                 (f"{'layer':44s} {'shape':>11s} {'bits':>4s} {'group':>5s} {'bits/w':>7s} {'KB':>8s} "
                  f"{'rel.out.err':>11s} {'cpu':>9s}  extras")]
        for s in self.layers:
            err = "-" if s.rel_output_error is None else f"{s.rel_output_error:.3e}"
            lines.append(f"{s.name:44s} {s.shape[0]:>5d}×{s.shape[1]:<5d} {s.bits:4d} {s.group_size or '-':>5} "
                         f"{s.bits_per_weight:7.3f} {s.bytes / 1024:8.1f} {err:>11s} {s.backend:>9s}  {s.extras}")
        if self.layers:
            numel = sum(s.shape[0] * s.shape[1] for s in self.layers)
            lines.append(f"{'all quantized layers':44s} {'':11s} {'':4s} {'':5s} "
                         f"{8 * sum(s.bytes for s in self.layers) / numel:7.3f} "
                         f"{sum(s.bytes for s in self.layers) / 1024:8.1f}")
        return "\n".join(lines)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise LowbitError(f"{path} is damaged (not JSON)") from None
    if not isinstance(data, dict):
        raise LowbitError(f"{path} is damaged (not a JSON object)")
    return data


def _tensor_sizes(files: set[Path]) -> tuple[dict[str, int], dict[str, int]]:
    """Each tensor's bytes and element count, from the files' headers alone (no torch, no tensor read)."""
    sizes: dict[str, int] = {}
    numels: dict[str, int] = {}
    try:
        for path in sorted(files):
            with safe_open(str(path), "numpy") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    numels[key] = n
                    sizes[key] = n * _DTYPE_BYTES.get(sl.get_dtype(), 4)
    except Exception as exc:  # safetensors' own error type: missing, truncated or not safetensors
        raise LowbitError(f"{path} cannot be read ({str(exc).splitlines()[0]})") from None
    return sizes, numels


def _groups_sort_to_natural(path: Path, key: str, cols: int, group_size: int | None) -> bool:
    """Whether an act-order layer's ``g_idx`` becomes ``col // group_size`` once its columns are sorted by
    group (then the kernels take it, in that column order)."""
    import numpy as np

    if group_size is None:
        return True
    with safe_open(str(path), "numpy") as f:
        g = np.sort(f.get_tensor(key))
    return bool(np.array_equal(g, np.arange(cols) // group_size))


def inspect_checkpoint(path: str | Path) -> CheckpointSummary:
    path = Path(path)
    marker = path / CHECKPOINT_MARKER
    if not marker.exists():
        raise LowbitError(f"{path} is not a lowbit checkpoint (no {CHECKPOINT_MARKER})")
    meta = _json(marker)
    report = _json(path / "report.json") if (path / "report.json").exists() else {}
    rows = {r.get("name"): r for r in report.get("layers", []) if isinstance(r, dict)}
    files = _files(path)
    sizes, numels = _tensor_sizes(set(files.values()))
    try:
        method = meta.get("recipe", {}).get("weights", {}).get("method")
        most = max((r["tokens"] for r in rows.values() if isinstance(r.get("tokens"), int)), default=0)
        layers = [_layer(files, name, info, sizes, rows.get(name, {}), method, most)
                  for name, info in meta.get("layers", {}).items()]
        quantizers = len(meta.get("activations", {}).get("quantizers", {}))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise LowbitError(f"{marker} is damaged ({type(exc).__name__} {exc})") from None
    prefixes = tuple(f"{s.name}." for s in layers)
    parameters = sum(s.shape[0] * s.shape[1] for s in layers) + sum(
        n for k, n in numels.items() if not k.startswith(prefixes))
    return CheckpointSummary(path, meta.get("base_model"), meta.get("recipe", {}), layers, quantizers,
                             sum(f.stat().st_size for f in set(files.values())), report.get("total_seconds"),
                             parameters)


def _files(path: Path) -> dict[str, Path]:
    """Which file holds each tensor (one, or the shards of a checkpoint written block by block)."""
    if not (path / INDEX).is_file() and not (path / "model.safetensors").is_file():
        raise LowbitError(f"{path / 'model.safetensors'} cannot be read (missing)")
    try:
        return tensor_files(path)
    except LowbitError:
        raise
    except Exception as exc:  # safetensors' own error type: truncated or not safetensors
        raise LowbitError(f"{path / 'model.safetensors'} cannot be read ({str(exc).splitlines()[0]})") from None


def _layer(files: dict[str, Path], name: str, info: dict, sizes: dict[str, int], row: dict, method: str | None,
           most: int) -> LayerSummary:
    """``row``: the layer's line of report.json; ``most``: the largest token count of any layer (a layer that
    saw fewer is an expert, reached by the tokens routed to it)."""
    spec = LayerSpec.from_json(info, info.get("groups") or tensor_shape(files, groups_key(name, info))[1])
    extras = []
    tokens = row.get("tokens")
    if row.get("method") not in (None, method):  # a fallback: an expert calibration (nearly) missed
        extras.append(f"{row['method']} ({tokens} tokens)")
    elif isinstance(tokens, int) and tokens < most:
        extras.append(f"{tokens} tokens")
    if spec.act_order:
        extras.append("act-order")
    if spec.incoherence is not None:
        extras.append(f"incoherence {spec.incoherence.get('kind', '')}".strip())
    if spec.lowrank_rank:
        extras.append(f"low-rank r={spec.lowrank_rank}")
    declared = {f"{name}.{d.key}": d.nbytes for d in spec.tensors()}
    if any(sizes.get(k) != n for k, n in declared.items()):
        raise ValueError(f"{name}'s tensors are not the ones its entry declares")
    layer_bytes = sum(v for k, v in sizes.items() if k.startswith(name + "."))
    (rows, cols), gs = spec.shape, spec.group_size
    plain = spec.plain
    if plain and spec.act_order:
        key = f"{name}.{spec.grid_prefix}g_idx"
        plain = _groups_sort_to_natural(files[key], key, cols, gs)
    backend = cpu_backend(spec.bits, cols, rows, gs, spec.groups, plain)
    return LayerSummary(name, (rows, cols), spec.bits, gs, ", ".join(extras),
                        layer_bytes, row.get("rel_output_error"), backend)
