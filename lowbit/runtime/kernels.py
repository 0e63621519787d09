"""CPU kernel back-ends for packed layers: PyTorch's own int4 and int8 weight-only matmuls.

The reference path (:class:`~lowbit.runtime.QuantLinear`'s ``forward``) rebuilds the float weight
on every call. These back-ends multiply by the packed weight directly:

- ``int4``: ``aten._weight_int4pack_mm_for_cpu``, which computes ``w = (q − 8)·s + m`` per group
  of 32–256 inputs. lowbit's ``(q − z)·s`` is that with ``m = (8 − z)·s``; any lowbit group whose
  size is a multiple of the kernel's (and a smaller last group of such a size) maps exactly by
  repeating its scale, and a per-channel grid is one group per row, repeated too. 2- and 3-bit codes
  are 4-bit codes with the top values unused, so they take the same kernel, exactly (the kernel's copy
  then spends 4 bits per weight; the checkpoint keeps 2 or 3).
- ``int8`` (per channel): ``aten._weight_int8pack_mm`` takes symmetric codes ``w = c·s``; lowbit's
  asymmetric ``(q − z)·s`` is ``(q − 128)·s + (128 − z)·s``, the second term a per-row constant times
  the sum of the inputs.

The mappings are exact (tested in float32). PyTorch's CPU kernels are fast for bfloat16 inputs of
few rows (``bench/experiments/kernel_rows.py``, a 1536×576 SmolLM2 layer, one thread, 2-core x86 CPU): int4
takes 0.02× the reference path's time for 1 row, 0.95× for 256 and 1.4× for 512; int8 0.06× for
1 row, 0.79× for 64 and 1.09× for 128. For float32 inputs they are faster only for a single row
(0.4–0.6×) and 4–60× slower from 8 rows on. So a layer uses its kernel for bfloat16 inputs of at
most ``max_rows`` rows (decoding, short prompts) and the reference path otherwise (prefill of long
prompts, float32). Act-order layers are taken with their
columns sorted by group (the input is gathered in that order). A layer a kernel cannot take (other
bits, outliers, quantized scales, rows not a multiple of 16, widths no kernel group divides)
always keeps the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.backends import cpu_backend, int4_group
from lowbit.grids import natural_group_index
from lowbit.rounding import QuantizedWeight


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_weight_int8pack_mm")


@dataclass(frozen=True)
class Int4Kernel:
    packed: torch.Tensor  # uint8 (N, K/2), the kernel's own layout
    scales_zeros: torch.Tensor  # float32 (K/G, N, 2): s and m = (8 − z)·s per kernel group
    group: int
    order: torch.Tensor | None = None  # act-order: the input columns in the order the codes were sorted into
    name = "int4"
    max_rows = 256  # above it, dequantize + matmul is faster (measured: see the module's docstring)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sz = self.scales_zeros if x.dtype == torch.float32 else self.scales_zeros.to(x.dtype)
        if self.order is not None:
            x = x.index_select(-1, self.order)
        return torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.group, sz)


@dataclass(frozen=True)
class Int8Kernel:
    codes: torch.Tensor  # int8 (N, K): q − 128
    scales: torch.Tensor  # float32 (N,)
    row_offset: torch.Tensor  # float32 (N,): (128 − z)·s, times the sum of the inputs
    name = "int8"
    max_rows = 32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x, self.codes, self.scales.to(x.dtype))
        return y + x.sum(-1, keepdim=True) * self.row_offset.to(x.dtype)


Kernel = Int4Kernel | Int8Kernel
FAST_DTYPES = (torch.bfloat16,)  # the inputs these CPU kernels are fast for


def serves(kernel: Kernel | None, x: torch.Tensor) -> bool:
    """Whether ``kernel`` should compute ``x`` (rather than the reference path)."""
    return (kernel is not None and x.device.type == "cpu" and x.dtype in FAST_DTYPES
            and x.numel() // x.shape[-1] <= kernel.max_rows)


def _column_order(qw: QuantizedWeight, group_size: int | None) -> tuple[bool, torch.Tensor | None]:
    """Whether a kernel can take ``qw`` (codes, one scale and zero per row and group, nothing else), and the
    column order that makes its groups contiguous: ``None`` when they are, else act-order's — sorting the
    columns by group turns act-order's groups (``group_size`` consecutive columns in GPTQ's order) into
    natural ones, and ``x·Wᵀ = x[:, p]·W[:, p]ᵀ``."""
    if qw.sparse is not None or qw.scale_stats is not None or qw.transform is not None:
        return False, None
    natural = natural_group_index(qw.codes.shape[1], group_size, qw.g_idx.device)
    g_idx = qw.g_idx.long()
    if torch.equal(g_idx, natural):
        return True, None
    order = torch.argsort(g_idx, stable=True)
    return bool(torch.equal(g_idx[order], natural)), order


def kernel_for(qw: QuantizedWeight, group_size: int | None) -> Kernel | None:
    """The CPU back-end for ``qw``, or ``None`` where only the reference path computes it exactly."""
    if not available():
        return None
    ok, order = _column_order(qw, group_size)
    if not ok:
        return None
    n, k = qw.codes.shape
    scale, zero = qw.scale.float(), qw.zero.float()
    backend = cpu_backend(qw.bits, k, n, group_size, scale.shape[1], plain=True)
    if backend == "int4":
        g = int4_group(k, n, group_size)
        codes, g_idx = (qw.codes, qw.g_idx.long()) if order is None else (qw.codes[:, order], qw.g_idx.long()[order])
        cols = g_idx[::g]  # each kernel group lies inside one lowbit group
        # 2-/3-bit codes moved to the middle of the kernel's range, their zero with them ((q + c) − (z + c)):
        # left at 0…7, (q − 8)·s and m = (8 − z)·s would be large and cancel, which bfloat16 rounds badly
        shift = 8 - 2 ** (qw.bits - 1)
        s, z = scale[:, cols], zero[:, cols] + shift
        packed = torch._convert_weight_to_int4pack_for_cpu((codes.to(torch.int32) + shift).contiguous(), 2)
        return Int4Kernel(packed, torch.stack([s.t(), ((8 - z) * s).t()], -1).contiguous(), g, order)
    if backend == "int8":  # one group: act-order changes nothing
        codes = (qw.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        return Int8Kernel(codes, scale[:, 0].contiguous(), ((128 - zero[:, 0]) * scale[:, 0]).contiguous())
    return None

