"""Maps a recipe's ``weights`` section to the rounding algorithm that implements it."""

from __future__ import annotations

import torch

from lowbit.grids import UniformGrid
from lowbit.recipes.schema import WeightSpec
from lowbit.rounding.gptq import gptq_quantize
from lowbit.rounding.quantized import QuantizedWeight
from lowbit.rounding.rtn import rtn_quantize


def grid_for(spec: WeightSpec) -> UniformGrid:
    return UniformGrid(bits=spec.bits, symmetric=spec.symmetric, group_size=spec.group_size,
                       clip_search=spec.clip_search)


def round_weight(w: torch.Tensor, h: torch.Tensor | None, spec: WeightSpec, name: str) -> QuantizedWeight:
    grid = grid_for(spec)
    if spec.method == "rtn":
        return rtn_quantize(w, grid)
    if h is None:
        raise ValueError(f"{spec.method} needs a Hessian for {name}")
    return gptq_quantize(w, h, grid, blocksize=spec.blocksize, damp=spec.damp, act_order=spec.act_order, name=name)
