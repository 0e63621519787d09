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
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedTokenizerBase

from lowbit import faults
from lowbit.activations.install import KINDS, activation_metadata
from lowbit.atomic import as_umask_allows, atomic_dir, atomic_path, atomic_write_text, save_tensors
from lowbit.errors import LowbitError
from lowbit.export.folder import check_replaceable
from lowbit.export.hf_config import ENTRY_MODULE, ENTRY_SOURCE, entry_config
from lowbit.export.load import checkpoint_meta
from lowbit.models.onload import DiskModel
from lowbit.models.resolve import CHECKPOINT_MARKER, INDEX
from lowbit.models.source import source_of
from lowbit.pipeline.report import QuantReport
from lowbit.pipeline.result import Quantized
from lowbit.runtime import BinaryLinear, packed_module
from lowbit.runtime.build import layer_bias, packed_layers

# 4: each layer's entry is lowbit.format's LayerSpec, with its groups; 3: tensors may be shards that
# model.safetensors.index.json names; 2: config.json wraps the base config (lowbit.hf); 1: it was the base config
FORMAT_VERSION = 4


def packed_weights(model: nn.Module) -> dict:
    """The quantized weights of a model loaded from a checkpoint, read back from its packed layers."""
    return {name: m.binary() if isinstance(m, BinaryLinear) else m.quantized()
            for name, m in packed_layers(model).items()}


def save(quantized: Quantized | nn.Module, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
         report: QuantReport | None = None) -> Path:
    """Write what ``lowbit.quantize`` returned — or a model loaded from a checkpoint — as a lowbit checkpoint
    (``report``: instead of the result's own)."""
    if isinstance(quantized, Quantized):
        model, quant, recipe, base = quantized.model, quantized.weights, quantized.recipe.to_dict(), quantized.source
        report = report or quantized.report
    else:
        model, quant = quantized, packed_weights(quantized)
        meta = checkpoint_meta(model) if quant else {}  # what the checkpoint it was loaded from recorded
        recipe, base = meta.get("recipe", {}), meta.get("base_model")
    activations = activation_metadata(model)
    if not quant and not activations:
        raise LowbitError("nothing quantized to save: pass what lowbit.quantize returned (or a model loaded from a "
                          "lowbit checkpoint)")
    out = Path(out_dir)
    check_replaceable(out)
    with atomic_dir(out) as tmp:
        _write(model, tmp, quant, activations, recipe, base, tokenizer, report)
    return out


def _write(model: nn.Module, out: Path, quant: dict, activations: dict, recipe: dict, base: str | None,
           tokenizer: PreTrainedTokenizerBase | None, report: QuantReport | None) -> None:
    """Every file of the checkpoint, into a folder that becomes the checkpoint only once they all exist."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    quant = dict(sorted(quant.items(), key=lambda item: order[item[0]]))  # model order, however the run went
    tensors, layers, aliases = module_tensors(model, quant)
    # one metadata key: safetensors writes several in a different order each run (bytes would differ)
    save_tensors(tensors, out / "model.safetensors", metadata={"format": "lowbit"})
    as_umask_allows(out / "model.safetensors")
    faults.reach("save:tensors")
    _write_configs(model, out, tokenizer, report, recipe=recipe, base=base, dtype=next(model.parameters()).dtype,
                   aliases=aliases, layers=layers, activations=activations)


def module_tensors(module: nn.Module, quant: dict, prefix: str = ""
                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str]]:
    """A module's tensors as the checkpoint stores them (names under ``prefix``), its packed layers' metadata
    and the names of tensors that share another's storage (written once)."""
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, qw in quant.items():
        bias = layer_bias(module.get_submodule(name))
        bias = bias.detach().cpu() if bias is not None else None
        packed = packed_module(qw, bias)
        for key, value in packed.state_dict().items():
            tensors[f"{prefix}{name}.{key}"] = value
        layers[prefix + name] = packed.spec.to_json()
    # a float linear's weight and bias, or a loaded packed layer's buffers — not the activation quantizer on it
    skip = {f"{name}.{key}" for name in quant for key in module.get_submodule(name).state_dict()
            if key.split(".")[0] not in KINDS}
    unique, aliases = _unique({k: v for k, v in module.state_dict().items() if k not in skip}, prefix)
    tensors.update(unique)
    return tensors, layers, aliases


def _unique(state: dict[str, torch.Tensor], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Float tensors in their narrowest exact dtype, each storage once; the names of the ones left out."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for key, value in state.items():
        ident = (value.data_ptr(), value.shape, value.dtype)
        if ident in seen:
            aliases[prefix + key] = seen[ident]
            continue
        seen[ident] = prefix + key
        tensors[prefix + key] = narrowest(value.detach().cpu().contiguous())
    return tensors, aliases


def _write_configs(model: nn.Module, out: Path, tokenizer: PreTrainedTokenizerBase | None,
                   report: QuantReport | None, *, recipe: dict, base: str | None, dtype: torch.dtype, aliases: dict,
                   layers: dict, activations: dict) -> None:
    """Everything but the tensors: the configs that say how to read them, the tokenizer, the report."""
    # not the base model's config.json: plain transformers would load random weights into it (lowbit.hf)
    (out / "config.json").write_text(json.dumps(entry_config(model.config), indent=2, sort_keys=True) + "\n")
    (out / f"{ENTRY_MODULE}.py").write_text(ENTRY_SOURCE)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    meta = {
        "format_version": FORMAT_VERSION,
        "base_model": base,
        "recipe": recipe,
        "dtype": str(dtype).removeprefix("torch."),
        "aliases": aliases,
        "layers": layers,
        "activations": activations,
    }
    (out / CHECKPOINT_MARKER).write_text(json.dumps(meta, indent=1))
    if report is not None:
        report.save(out / "report.json")


class ShardWriter:
    """Each finished block's tensors written as its own safetensors shard the moment it is done, so that a
    model quantized block by block never exists whole in memory (``save_streamed`` adds the rest)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def shard(self, b: int) -> Path:
        return self.root / f"block-{b:05d}.safetensors"

    def has(self, b: int) -> bool:
        return self.shard(b).is_file() and self.shard(b).with_suffix(".json").is_file()

    def write(self, b: int, block: nn.Module, weights: dict, prefix: str) -> None:
        tensors, layers, aliases = module_tensors(block, weights, prefix)
        meta = activation_metadata(block)
        activations = {kind: {prefix + k: v for k, v in table.items()} for kind, table in meta.items()}
        with atomic_path(self.shard(b)) as tmp:
            save_tensors(tensors, tmp, metadata={"format": "lowbit"})
        atomic_write_text(self.shard(b).with_suffix(".json"),
                          json.dumps({"layers": layers, "aliases": aliases, "activations": activations}))


def save_streamed(disk: DiskModel, shards: ShardWriter, out_dir: str | Path, recipe: dict,
                  tokenizer: PreTrainedTokenizerBase | None = None, report: QuantReport | None = None) -> Path:
    """The checkpoint of a model quantized block by block: its block shards (linked, not copied), the tensors
    outside the blocks read from the source files, and a shard index. One shard is in memory at a time."""
    out = Path(out_dir)
    check_replaceable(out)
    weight_map: dict[str, str] = {}
    layers: dict = {}
    aliases: dict = {}
    activations: dict = {}
    with atomic_dir(out) as tmp:
        for b in range(len(disk.blocks)):
            if not shards.has(b):
                raise LowbitError(f"block {b} has no shard in {shards.root}: rerun with --resume")
            name = shards.shard(b).name
            _link(shards.shard(b), tmp / name)
            with safe_open(str(tmp / name), "pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), name))
            part = json.loads(shards.shard(b).with_suffix(".json").read_text())
            layers.update(part["layers"])
            aliases.update(part["aliases"])
            for kind, table in part["activations"].items():
                activations.setdefault(kind, {}).update(table)
        with disk.onloaded(None):  # embeddings, final norm, head (and any buffer the model saves)
            inside = disk.blocks_path + "."
            tensors, rest_aliases = _unique({k: v for k, v in disk.model.state_dict().items()
                                             if not k.startswith(inside)})
        aliases.update(rest_aliases)
        save_tensors(tensors, tmp / "model-rest.safetensors", metadata={"format": "lowbit"})
        weight_map.update({k: "model-rest.safetensors" for k in tensors})
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=1, sort_keys=True))
        for f in (*set(weight_map.values()), INDEX):
            as_umask_allows(tmp / f)
        faults.reach("save:tensors")
        _write_configs(disk.model, tmp, tokenizer, report, recipe=recipe, base=source_of(disk.model),
                       dtype=disk.dtype, aliases=aliases, layers=layers, activations=activations)
    return out


def _link(src: Path, dst: Path) -> None:
    """A hard link where the file system allows one (no bytes copied), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


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
