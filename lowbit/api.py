"""The single entry point: ``quantize(model, recipe, calib)``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lowbit import recipes as _recipes
from lowbit.data import calibration
from lowbit.errors import LowbitError
from lowbit.pipeline import Quantized, QuantReport, quantize_model
from lowbit.recipes import Recipe

if TYPE_CHECKING:
    from lowbit.models.onload import DiskModel


def calibration_for(recipe: Recipe, tok: PreTrainedTokenizerBase, model: nn.Module | None = None) -> torch.Tensor:
    c = recipe.calibration
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return calibration(c.dataset, tok, c.nsamples, c.seqlen, c.seed, c.sampling, model_type=model_type)


def quantize(
    model: nn.Module,
    recipe: Recipe | str,
    calib: torch.Tensor | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress_dir: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    hessian_cache: str | Path | None = None,
) -> Quantized:
    """Quantize ``model`` in place; ``calib`` defaults to the recipe's calibration set (needs ``tokenizer``).
    Returns the model with its weights rounded, each layer's rounding result, the recipe, the model's source and
    the report (``lowbit.save`` writes it; ``.packed()`` is the model with packed layers).

    ``hessian_cache``: a directory shared by runs on the same model and calibration set, where OAC's
    gradient pass is kept so that it runs once for every output-adaptive recipe.
    """
    recipe = _recipes.get(recipe)
    if calib is None and recipe.needs_calibration:
        if tokenizer is None:
            raise LowbitError("pass calibration token ids or a tokenizer to build them from the recipe")
        calib = calibration_for(recipe, tokenizer, model)
    return quantize_model(model, recipe, calib, progress_dir=progress_dir, resume=resume,
                          show_progress=show_progress, hessian_cache=hessian_cache)


def quantize_to_disk(
    source: str | Path,
    recipe: Recipe | str,
    out: str | Path,
    *,
    calib: torch.Tensor | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    show_progress: bool = True,
    source_name: str | None = None,
    disk: DiskModel | None = None,
) -> QuantReport:
    """Quantize the model in folder ``source`` block by block, from its safetensors files, into checkpoint ``out``.

    Memory holds one block (in ``dtype``, by default the files' own), the embeddings while calibration
    inputs are captured, and the calibration activations; each finished block is written as a shard of
    ``out`` at once (``out/.progress`` keeps them until the checkpoint is whole, for ``resume``).
    """
    from lowbit.export.write import ShardWriter, save_streamed
    from lowbit.models.onload import DiskModel
    from lowbit.models.source import set_source

    recipe = _recipes.get(recipe)
    disk = disk or DiskModel(source, dtype=dtype, device=device)
    set_source(disk.model, source_name or str(Path(source).resolve()))
    if calib is None and recipe.needs_calibration:
        if tokenizer is None:
            raise LowbitError("pass calibration token ids or a tokenizer to build them from the recipe")
        calib = calibration_for(recipe, tokenizer, disk.model)
    progress = Path(out) / ".progress"
    shards = ShardWriter(progress / "shards")
    report = quantize_model(disk.model, recipe, calib, progress_dir=progress, resume=resume,
                            show_progress=show_progress, onload=disk, sink=shards).report
    save_streamed(disk, shards, out, recipe.to_dict(), tokenizer, report)
    return report


def load_model(name_or_path, dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` of a built-in alias, a local folder or GGUF file, a hub id — or a lowbit checkpoint
    (its packed layers; ``dtype`` defaults to the saved one, float32 for the rest). A name or path, or the
    ``ModelRef`` that ``models.resolve.resolve`` made of one."""
    from lowbit.models.loading import load_model as load_float
    from lowbit.models.resolve import ModelRef, resolve

    ref = name_or_path if isinstance(name_or_path, ModelRef) else resolve(str(name_or_path))
    if ref.kind == "checkpoint":
        from lowbit.export.load import load_quantized

        return load_quantized(ref.path, dtype=dtype)
    return load_float(ref, dtype)
