"""GPTQ (OPTQ): column-wise rounding with error feedback through the Cholesky factor of ``H⁻¹``.

Lazy batches of ``blocksize`` columns keep the rank-1 updates cache-friendly; the result is
identical to the naive one-column-at-a-time OBS update (tested against a float64 reference).
Group parameters are fitted when the sweep reaches a group's first column, on the columns'
values *after* all error feedback received so far, including lazy-batch updates not yet written
back (the algorithm's intent; the reference code misses those when a group crosses a batch).
"""

from __future__ import annotations

import torch

from lowbit.grids import Grid, GridParams
from lowbit.grids.stats import ScaleStats, quantize_scales
from lowbit.hessians import robust_cholesky_inverse
from lowbit.rounding.outliers import select_outliers
from lowbit.rounding.quantized import QuantizedWeight, SparseOutliers
from lowbit.rounding.sequential import SequentialProblem, initial_params


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: Grid,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    name: str = "layer",
    dtype: torch.dtype = torch.float32,
    outlier_fraction: float = 0.0,
    stats_bits: int | None = None,
) -> QuantizedWeight:
    """Quantize ``w`` (out, in) given the Hessian ``h`` (in, in) of its inputs; ``outlier_fraction``
    of the weights (SpQR-style, :mod:`lowbit.rounding.outliers`) stay in float16; ``stats_bits``
    quantizes each group's scales as it is fitted (:mod:`lowbit.grids.stats`)."""
    rows, cols = w.shape
    with SequentialProblem.borrowed(w, h, damp, act_order) as prob:  # the caller's h, put back after
        upper = robust_cholesky_inverse(prob.h, damp, name)
    upper = upper.to(dtype)
    W = prob.w.to(dtype)

    gs = grid.group_size
    keep = select_outliers(W, torch.diag(upper), grid, outlier_fraction) if outlier_fraction else None
    kept = torch.zeros_like(W) if keep is not None else None  # outlier values as rounding reaches them
    scale, zero, codes, col_scale, col_zero = initial_params(W if keep is None else W.masked_fill(keep, 0), grid, dtype)
    stats = ScaleStats.empty(rows, scale.shape[1], stats_bits, W.device) if stats_bits else None

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        hinv1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if gs is not None and c % gs == 0:
                g_end = min(c + gs, cols)
                ahead = W[:, i2:g_end] - err1 @ upper[i1:i2, i2:g_end]  # lazy updates not yet applied
                current = torch.cat([W1[:, i : min(g_end - i1, i2 - i1)], ahead], dim=1)
                if keep is not None:  # outliers do not stretch the group's range
                    current = current.masked_fill(keep[:, c:g_end], 0)
                p = grid.fit(current)
                if stats is not None:  # round this group's weights with its quantized scales
                    one = quantize_scales(p.scale, stats_bits)
                    stats.assign(c // gs, one)
                    p = GridParams(one.decode(), p.zero)
                scale[:, c // gs : c // gs + 1], zero[:, c // gs : c // gs + 1] = p.scale, p.zero
                col_scale, col_zero = p.scale[:, 0].to(dtype), p.zero[:, 0].to(dtype)
            col = W1[:, i]
            q = grid.quantize(col, col_scale, col_zero)
            codes[:, c] = q.to(torch.uint8)
            deq = grid.dequantize(q, col_scale, col_zero).to(dtype)
            if keep is not None:  # an outlier keeps its current value (as float16): the rest is fed forward
                kept[:, c] = col.to(torch.float16).to(dtype)
                deq = torch.where(keep[:, c], kept[:, c], deq)
            err = (col - deq) / hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        W[:, i2:] -= err1 @ upper[i1:i2, i2:]

    qw = prob.result(codes, scale, zero, grid)
    qw.scale_stats = stats
    if keep is not None:
        inv = torch.argsort(prob.perm) if prob.perm is not None else slice(None)
        qw.sparse = SparseOutliers.from_mask(keep[:, inv], kept[:, inv])
    return qw
