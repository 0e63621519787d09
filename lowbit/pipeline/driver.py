"""Sequential quantization: block k+1 is calibrated on the outputs of the already-quantized block k.

``quantize_model`` checks the model and recipe, builds the recipe's stages (``pipeline.stages``) and runs
them in the block engine (``pipeline.engine``). Memory stays at one block's work plus the calibration
activations ``(n, seq, hidden)``. The quantized codes of every layer are returned (``Quantized.weights``)
for packing at save time (or go to a sink, block by block, when the model is onloaded); the model's
own weights are replaced by their dequantized values (fake quantization), which is exactly what the
packed runtime computes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from lowbit.activations.calibrate import check_layout
from lowbit.errors import LowbitError
from lowbit.memory import peak_memory_mb
from lowbit.models import block_linears, find_blocks
from lowbit.models.adapters import weights_left_in_float
from lowbit.models.layout import block_layout
from lowbit.models.linearize import linearize, router_names
from lowbit.models.onload import DiskModel
from lowbit.models.source import source_of
from lowbit.pipeline.engine import BlockSink, KeptWeights, Run, run_blocks
from lowbit.pipeline.report import QuantReport
from lowbit.pipeline.result import Quantized
from lowbit.pipeline.resume import ProgressStore, fingerprint
from lowbit.pipeline.stages import build_stages
from lowbit.recipes import Recipe

log = logging.getLogger(__name__)

__all__ = ["quantize_model"]


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    calib: torch.Tensor | None,
    *,
    progress_dir: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    hessian_cache: str | Path | None = None,
    onload: DiskModel | None = None,
    sink: BlockSink | None = None,
) -> Quantized:
    """Quantize ``model`` in place following ``recipe``; returns the model, its layers' rounding results, the
    recipe, where the model came from, and the per-layer report.

    GPT-2's ``Conv1D`` layers and fused mixture-of-experts tensors are first replaced, in place, by the
    ``nn.Linear`` layers they compute with (``models.linearize``): the same outputs, new module names.

    ``hessian_cache``: a directory where output-adaptive Hessians are kept and looked up, so that
    recipes on the same model and calibration set run OAC's gradient pass once (``HessianCache``).

    ``onload``: ``model`` is that skeleton, weightless; each block is read from disk when its turn comes
    and given back after, once ``sink`` has its packed layers (none are returned).
    """
    recipe.validate()
    _check_run(recipe, calib, onload, sink, progress_dir)
    if replaced := linearize(model):  # Conv1D and fused experts as nn.Linear: what every stage below reads
        log.info("as nn.Linear layers: %s", ", ".join(replaced))
    blocks_path, blocks = find_blocks(model)
    skip = [re.compile(p) for p in recipe.pipeline.skip]
    quantizable = [_quantizable(blk, f"{blocks_path}.{b}.", skip) for b, blk in enumerate(blocks)]
    _check_model(model, blocks, quantizable, recipe)
    weights: dict = {}
    store = None
    if progress_dir is not None:
        fp = fingerprint(source_of(model) or type(model).__name__, recipe.to_dict(),
                         calib if calib is not None else torch.zeros(0))
        store = ProgressStore(Path(progress_dir), fp, resume)
    run = Run(model, recipe, calib, blocks_path, blocks, quantizable, QuantReport(recipe=recipe.name),
              sink if sink is not None else KeptWeights(weights), store, onload, show_progress)
    run_blocks(run, build_stages(model, blocks, recipe, hessian_cache))
    report = run.report
    report.total_seconds = run.costs.total()
    report.peak_memory_mb = max(peak_memory_mb(), store.peak_memory_mb if store is not None else 0.0,
                                report.hessian_pass.get("peak_memory_mb", 0.0))  # an earlier run's pass too
    return Quantized(model, weights, recipe, source_of(model), report)


def _check_run(recipe: Recipe, calib: torch.Tensor | None, onload: DiskModel | None, sink: BlockSink | None,
               progress_dir: str | Path | None) -> None:
    if onload is not None and (sink is None or progress_dir is None):
        raise ValueError("onloading needs a sink for the finished blocks and a progress directory")
    if onload is not None and recipe.rotation.enabled:
        raise LowbitError("rotation folds into the whole model at once: quantize without --onload")
    if onload is not None and recipe.needs_calibration and recipe.hessian.source == "output_adaptive":
        raise LowbitError("output-adaptive Hessians (OAC) need the whole model's gradients: quantize without "
                          "--onload")
    if recipe.needs_calibration and calib is None:
        raise LowbitError(f"recipe {recipe.name} needs calibration data: pass calibration token ids")


def _check_model(model: nn.Module, blocks: nn.ModuleList, quantizable: list[dict[str, nn.Linear]],
                 recipe: Recipe) -> None:
    """Before any work: nothing to quantize, weights that stay in float, a block layout the recipe cannot take."""
    if recipe.weights.method != "none":
        if not any(quantizable):
            raise LowbitError(f"pipeline.skip {recipe.pipeline.skip} matches every linear layer: nothing to quantize")
        routers = router_names(blocks[0])
        left = [n for n in weights_left_in_float(blocks[0]) if n.rpartition(".")[0] not in routers]
        if left:
            log.warning("these weights of every block are not nn.Linear layers and stay in float (lowbit quantizes "
                        "only nn.Linear weights): %s", ", ".join(left))
        if routers:
            log.info("mixture-of-experts routers stay in float: %s", ", ".join(sorted(routers)))
    if recipe.activations.enabled or recipe.smoothing.enabled:
        for block in blocks:
            check_layout(block_layout(block, model.config), recipe.activations, recipe.smoothing,
                         type(model).__name__)


def _quantizable(block: nn.Module, prefix: str, skip: list[re.Pattern]) -> dict[str, nn.Linear]:
    """The block's linears less the recipe's skip patterns and mixture-of-experts routers (kept in float)."""
    routers = router_names(block)
    return {n: m for n, m in block_linears(block).items()
            if n not in routers and not any(p.search(prefix + n) for p in skip)}
