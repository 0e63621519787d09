"""A rounding's result to the tensors :class:`~lowbit.format.spec.LayerSpec` declares, and back — the only
code that does either (checkpoints, runtime modules and resume files all go through it)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lowbit.format.spec import LayerSpec, TensorDecl
from lowbit.grids import natural_group_index, pack_codes, unpack_codes
from lowbit.grids.stats import ScaleStats
from lowbit.rounding.binary import BinaryWeight
from lowbit.rounding.quantized import QuantizedWeight, SparseOutliers
from lowbit.transforms.incoherence import Incoherence
from lowbit.transforms.lowrank import LowRank

Weight = QuantizedWeight | BinaryWeight
DTYPES = {"U8": torch.uint8, "I32": torch.int32, "F16": torch.float16, "F32": torch.float32}
U8, I32, F16, F32 = DTYPES.values()


def empty(d: TensorDecl) -> torch.Tensor:
    """A zero tensor as ``d`` declares it (a runtime module's buffer before its tensors are loaded)."""
    return torch.zeros(d.shape, dtype=DTYPES[d.dtype])


def spec_of(qw: Weight) -> LayerSpec:
    """The declaration of a rounding's result."""
    if isinstance(qw, BinaryWeight):
        return LayerSpec(qw.shape, 1, qw.alphas.shape[1], n_salient=int(qw.salient.sum()), blocksize=qw.blocksize)
    rows, cols = qw.codes.shape
    groups = qw.scale.shape[1]
    gs = qw.group_size
    if gs is None and groups > 1:  # built without its grid's group size: a group's column count says it
        gs = int((qw.g_idx == 0).sum())
    natural = natural_group_index(cols, gs, qw.g_idx.device)
    return LayerSpec((rows, cols), qw.bits, groups, gs, not torch.equal(qw.g_idx.long(), natural),
                     not torch.equal(qw.zero, qw.zero.round()), qw.sparse.count if qw.sparse is not None else 0,
                     qw.scale_stats.bits if qw.scale_stats is not None else None,
                     qw.transform.metadata() if qw.transform is not None else None,
                     qw.lowrank.rank if qw.lowrank is not None else 0)


def encode(spec: LayerSpec, qw: Weight) -> dict[str, torch.Tensor]:
    """``qw``'s tensors, keyed as :meth:`LayerSpec.tensors` declares them (on ``qw``'s device)."""
    if spec.binary:
        sal = qw.salient
        grid = {"signs": pack_codes(qw.signs, 1), "residual": pack_codes(qw.residual[:, sal], 1),
                "split": pack_codes(qw.split[:, ~sal], 1), "salient": pack_codes(sal, 1),
                "alphas": qw.alphas.to(F16)}
        return {k: v.contiguous() for k, v in grid.items()}
    grid = {"qweight": pack_codes(qw.codes, spec.bits)}
    if spec.stats_bits:
        st = qw.scale_stats
        grid.update(scale_codes=pack_codes(st.codes, st.bits), scale_lo=st.lo.to(F16), scale_step=st.step.to(F16))
    else:
        grid["scales"] = qw.scale.to(F16)
    if spec.float_zeros:
        grid["zeros"] = qw.zero.to(F16)
    else:
        grid["qzeros"] = pack_codes(qw.zero.round().to(torch.int64), spec.bits)
    if spec.act_order:
        grid["g_idx"] = qw.g_idx.to(I32)
    if spec.outliers:
        grid.update(outlier_index=qw.sparse.index.to(I32), outlier_value=qw.sparse.values.to(F16))
    out = {spec.grid_prefix + k: v.contiguous() for k, v in grid.items()}
    if spec.incoherence is not None:
        out[spec.quip_prefix + "in_scale"] = qw.transform.in_scale.to(F32).contiguous()
    if spec.lowrank_rank:
        out.update(a=qw.lowrank.a.to(F16).contiguous(), b=qw.lowrank.b.to(F16).contiguous())
    return out


def zero_points(spec: LayerSpec, grid: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The ``(rows, groups)`` zero points as floats from a grid's tensors, without unpacking its codes."""
    rows, g = spec.shape[0], spec.groups
    if spec.float_zeros:
        return grid["zeros"].float()
    return unpack_codes(grid["qzeros"], spec.bits, rows * g).float().view(rows, g)


def decode(spec: LayerSpec, tensors: Mapping[str, torch.Tensor]) -> Weight:
    """The rounding's result back from :func:`encode`'s tensors (keys as declared; others ignored)."""
    (rows, cols), g = spec.shape, spec.groups
    t = {k.removeprefix(spec.grid_prefix): v for k, v in tensors.items() if k.startswith(spec.grid_prefix)}
    if spec.binary:
        return _decode_binary(spec, t)
    codes = unpack_codes(t["qweight"], spec.bits, rows * cols).view(rows, cols)
    stats = None
    if spec.stats_bits:
        stat_codes = unpack_codes(t["scale_codes"], spec.stats_bits, rows * g).view(rows, g)
        stats = ScaleStats(stat_codes, t["scale_lo"], t["scale_step"], spec.stats_bits)
    scale = stats.decode() if stats is not None else t["scales"].float()
    zero = zero_points(spec, t)
    g_idx = t["g_idx"] if spec.act_order else natural_group_index(cols, spec.group_size, codes.device)
    sparse = SparseOutliers(t["outlier_index"].long(), t["outlier_value"]) if spec.outliers else None
    qw = QuantizedWeight(codes, scale, zero, g_idx, spec.bits, sparse=sparse, scale_stats=stats,
                         group_size=spec.group_size)
    if spec.incoherence is not None:
        in_scale = tensors[spec.quip_prefix + "in_scale"]
        qw.transform = Incoherence.from_metadata(spec.incoherence, in_scale.cpu(), rows)
    if spec.lowrank_rank:
        qw.lowrank = LowRank(tensors["a"], tensors["b"])
    return qw


def _decode_binary(spec: LayerSpec, t: Mapping[str, torch.Tensor]) -> BinaryWeight:
    (rows, cols), s = spec.shape, spec.n_salient
    sal = unpack_codes(t["salient"], 1, cols).bool()
    residual = torch.ones(rows, cols, dtype=torch.bool, device=sal.device)
    residual[:, sal] = unpack_codes(t["residual"], 1, rows * s).bool().view(rows, s)
    split = torch.zeros(rows, cols, dtype=torch.bool, device=sal.device)
    split[:, ~sal] = unpack_codes(t["split"], 1, rows * (cols - s)).bool().view(rows, cols - s)
    signs = unpack_codes(t["signs"], 1, rows * cols).bool().view(rows, cols)
    return BinaryWeight(signs, residual, split, sal, t["alphas"], spec.blocksize)


def storage_bits(qw: Weight) -> int:
    """Bits the checkpoint spends on ``qw``: its declared tensors' bytes."""
    return spec_of(qw).storage_bits()


def effective_bits(weights: Mapping[str, Weight]) -> float:
    """Stored bits per quantized weight: codes, scales, zeros, ``g_idx``, transform vectors, low-rank branches,
    outliers — every byte the checkpoint holds for the quantized layers."""
    numel = sum(qw.numel for qw in weights.values())
    return sum(storage_bits(qw) for qw in weights.values()) / max(numel, 1)
