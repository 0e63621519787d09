"""Write a quantized model as ``model.safetensors`` + ``config.json`` + ``lowbit_config.json``.

Quantized linears are stored as :class:`~lowbit.runtime.QuantLinear` buffers (packed codes,
float16 scales, packed zeros, ``g_idx`` only when act-order permuted the groups), inside a
:class:`~lowbit.runtime.QuipLinear` (``in_scale`` + transform seeds) for QuIP layers; every other
tensor keeps its dtype. Tensors that share storage (tied embeddings) are written once.
Activation quantizers (calibrated ranges) and RPTQ's reordered norms (permutations) are ordinary
buffers of the model; ``lowbit_config.json`` names them so that loading can re-create them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lowbit import faults
from lowbit.activations.install import KINDS, activation_metadata
from lowbit.atomic import as_umask_allows, atomic_dir, save_tensors
from lowbit.errors import LowbitError
from lowbit.export.folder import check_replaceable
from lowbit.export.hf_config import ENTRY_MODULE, ENTRY_SOURCE, entry_config
from lowbit.models.resolve import CHECKPOINT_MARKER
from lowbit.pipeline.report import QuantReport
from lowbit.runtime import BinaryLinear, layer_metadata, packed_module
from lowbit.runtime.build import layer_bias, packed_layers

FORMAT_VERSION = 2  # 2: config.json wraps the base config (lowbit.hf); 1: it was the base config


def packed_weights(model: nn.Module) -> dict:
    """The quantized weights of a model loaded from a checkpoint, read back from its packed layers."""
    return {name: m.binary() if isinstance(m, BinaryLinear) else m.quantized()
            for name, m in packed_layers(model).items()}


def save(model: nn.Module, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
         report: QuantReport | None = None) -> Path:
    """Write ``model`` — quantized in this process, or loaded from a checkpoint — as a lowbit checkpoint."""
    quant = getattr(model, "lowbit_quant", None) or packed_weights(model)
    activations = activation_metadata(model)
    if not quant and not activations:
        raise LowbitError("model has not been quantized (no lowbit_quant); run lowbit.quantize first")
    recipe = getattr(model, "lowbit_recipe", {})
    out = Path(out_dir)
    check_replaceable(out)
    with atomic_dir(out) as tmp:
        _write(model, tmp, quant, activations, recipe, tokenizer, report)
    return out


def _write(model: nn.Module, out: Path, quant: dict, activations: dict, recipe: dict,
           tokenizer: PreTrainedTokenizerBase | None, report: QuantReport | None) -> None:
    """Every file of the checkpoint, into a folder that becomes the checkpoint only once they all exist."""
    group_size = recipe.get("weights", {}).get("group_size")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    quant = dict(sorted(quant.items(), key=lambda item: order[item[0]]))  # model order, however the run went
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, qw in quant.items():
        bias = layer_bias(model.get_submodule(name))
        bias = bias.detach().cpu() if bias is not None else None
        module = packed_module(qw, bias, group_size)
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value
        layers[name] = layer_metadata(module, group_size)
    # a float linear's weight and bias, or a loaded packed layer's buffers — not the activation quantizer on it
    skip = {f"{name}.{key}" for name in quant for key in model.get_submodule(name).state_dict()
            if key.split(".")[0] not in KINDS}
    seen: dict[tuple, str] = {}
    aliases = {}
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        ident = (value.data_ptr(), value.shape, value.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = narrowest(value.detach().cpu().contiguous())
    # one metadata key: safetensors writes several in a different order each run (bytes would differ)
    save_tensors(tensors, out / "model.safetensors", metadata={"format": "lowbit"})
    as_umask_allows(out / "model.safetensors")
    faults.reach("save:tensors")
    # not the base model's config.json: plain transformers would load random weights into it (lowbit.hf)
    (out / "config.json").write_text(json.dumps(entry_config(model.config), indent=2, sort_keys=True) + "\n")
    (out / f"{ENTRY_MODULE}.py").write_text(ENTRY_SOURCE)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    meta = {
        "format_version": FORMAT_VERSION,
        "base_model": getattr(model, "lowbit_source", None),
        "recipe": recipe,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "aliases": aliases,
        "layers": layers,
        "activations": activations,
    }
    (out / CHECKPOINT_MARKER).write_text(json.dumps(meta, indent=1))
    if report is not None:
        report.save(out / "report.json")



def narrowest(t: torch.Tensor) -> torch.Tensor:
    """``t`` in bfloat16 or float16 when that holds every value exactly, else as it is. A bfloat16 source
    model's embeddings, head and norms are bfloat16 values held in float32 while quantizing: stored in
    half the bytes, and loaded back to the same floats (a tensor a recipe changed keeps float32)."""
    if t.dtype not in (torch.float32, torch.float64):
        return t
    for narrow in (torch.bfloat16, torch.float16):
        if torch.equal(t.to(narrow).to(t.dtype), t):
            return t.to(narrow)
    return t
