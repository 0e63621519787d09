"""The low-rank error branches as a PEFT LoRA adapter, for tools that already serve LoRA.

``lora_A`` is ``B`` (r×in) and ``lora_B`` is ``A`` (out×r); ``lora_alpha = r`` per layer makes
PEFT's scaling ``alpha/r`` exactly 1. The adapter's base is the quantized model *without* its
branches (``Q(W)``): serve it on this checkpoint's dequantized weights, not on the original model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.atomic import as_umask_allows, save_tensors
from lowbit.errors import LowbitError
from lowbit.models.source import source_of
from lowbit.pipeline.result import Quantized
from lowbit.runtime import LowRankLinear


def lora_branches(quantized: Quantized | nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (A, B)`` from a loaded checkpoint (``LowRankLinear``) or what ``lowbit.quantize`` returned."""
    if isinstance(quantized, Quantized):
        return {n: (qw.lowrank.a, qw.lowrank.b) for n, qw in quantized.weights.items() if qw.lowrank is not None}
    return {n: (m.a, m.b) for n, m in quantized.named_modules() if isinstance(m, LowRankLinear)}


def export_lora(quantized: Quantized | nn.Module, out_dir: str | Path) -> Path:
    branches = lora_branches(quantized)
    if not branches:
        raise LowbitError("this model has no low-rank branches to export (recipe without lowrank)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, ranks = {}, {}
    for name, (a, b) in branches.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = b.detach().to(torch.float16).cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = a.detach().to(torch.float16).cpu().contiguous()
        ranks[name] = int(a.shape[1])
    save_tensors(tensors, out / "adapter_model.safetensors")
    as_umask_allows(out / "adapter_model.safetensors")
    r = max(ranks.values())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in ranks}),
        "rank_pattern": ranks, "alpha_pattern": ranks,
        "base_model_name_or_path": (quantized.source if isinstance(quantized, Quantized)
                                    else source_of(quantized)),  # the checkpoint it was loaded from
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out
