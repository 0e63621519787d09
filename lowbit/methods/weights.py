"""Maps a recipe's ``weights``, ``transform`` and ``lowrank`` sections to the pieces that implement them.

A method is a composition: optional outlier extraction (ASER: columns left out of the quantized
weight) → optional incoherence transform of ``(W, H)`` → rounding (RTN, GPTQ or LDLQ) on a grid
(min-max or QuIP's RMS), GPTQ optionally keeping SpQR-style sparse outliers → optional greedy
passes → optional low-rank reconstruction of the error
``W − Q(W)``; the transform and the low-rank branch travel with the codes to the runtime.
"""

from __future__ import annotations

import torch

from lowbit.grids import Grid, RMSGrid, UniformGrid
from lowbit.hessians import condition_hessian
from lowbit.recipes.schema import LowRankSpec, TransformSpec, WeightSpec
from lowbit.rounding.binary import BinaryWeight, billm_quantize
from lowbit.rounding.gptq import gptq_quantize
from lowbit.rounding.greedy import greedy_refine
from lowbit.rounding.ldlq import ldlq_quantize
from lowbit.rounding.quantized import QuantizedWeight
from lowbit.rounding.rtn import rtn_quantize
from lowbit.transforms.incoherence import Incoherence
from lowbit.transforms.lowrank import reconstruct_error

SEQUENTIAL = {"gptq": gptq_quantize, "ldlq": ldlq_quantize}


def grid_for(spec: WeightSpec) -> Grid:
    if spec.grid == "rms":
        return RMSGrid(bits=spec.bits, rms_mult=spec.rms_mult)
    return UniformGrid(bits=spec.bits, symmetric=spec.symmetric, group_size=spec.group_size,
                       clip_search=spec.clip_search)


def outlier_columns(w: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` input columns with the largest weight magnitude (after smoothing, where
    activation outliers have migrated to)."""
    return torch.topk(w.abs().amax(0), min(count, w.shape[1])).indices


def round_weight(w: torch.Tensor, h: torch.Tensor | None, spec: WeightSpec, name: str,
                 transform: TransformSpec | None = None, lowrank: LowRankSpec | None = None,
                 outliers: int = 0) -> QuantizedWeight | BinaryWeight:
    original, h_original = w, h
    if outliers:
        w = w.clone()
        w[:, outlier_columns(w, outliers)] = 0
    qw = _round(w, h, spec, name, transform)
    if lowrank is not None and lowrank.enabled:
        error = original.to(torch.float64) - qw.weight().to(torch.float64)
        qw.lowrank = reconstruct_error(error, h_original, lowrank.rank, lowrank.energy, lowrank.budget,
                                       lowrank.whiten, lowrank.damp, name)
    return qw


def _round(w: torch.Tensor, h: torch.Tensor | None, spec: WeightSpec, name: str,
           transform: TransformSpec | None) -> QuantizedWeight | BinaryWeight:
    if spec.method == "billm":
        if h is None:
            raise ValueError(f"billm needs a Hessian for {name}")
        return billm_quantize(w, h, blocksize=spec.blocksize, damp=spec.damp, name=name)
    grid = grid_for(spec)
    t = None
    if transform is not None and transform.incoherence != "none":
        t = Incoherence.fit(w, h, transform.incoherence, transform.seed, name, rescale=transform.rescale)
        if h is not None:  # without a Hessian (RTN) the weights are only rotated
            h = t.forward_hessian(h.to(torch.float64))
        w = t.forward_weight(w.to(torch.float64))
    if spec.method == "rtn":
        qw = rtn_quantize(w.float(), grid, spec.stats_bits)
    else:
        if h is None:
            raise ValueError(f"{spec.method} needs a Hessian for {name}")
        extra = {k: v for k, v in (("outlier_fraction", spec.outlier_fraction), ("stats_bits", spec.stats_bits)) if v}
        qw = SEQUENTIAL[spec.method](w, h, grid, blocksize=spec.blocksize, damp=spec.damp,
                                     act_order=spec.act_order, name=name, **extra)
    if spec.greedy_passes and h is not None:
        hd, wd = condition_hessian(h.to(torch.float64), w.to(torch.float64), spec.damp)
        order = torch.argsort(torch.diag(hd), descending=True) if spec.act_order else None
        qw = greedy_refine(wd, hd, qw, grid, spec.greedy_passes, order=order)
    qw.transform = t
    return qw
