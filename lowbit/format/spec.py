"""One quantized layer as files hold it, declared once.

A :class:`LayerSpec` names a layer's kind and sizes; every tensor it stores follows from it
(:meth:`LayerSpec.tensors`: key, shape, dtype), and so do the bytes it costs. The checkpoint writer and
reader, the runtime modules' buffers, the resume files, ``lowbit inspect`` and the effective-bits count all
read that one declaration, and :mod:`lowbit.format.codec`'s ``encode`` / ``decode`` are the only code that
turns a rounding's result into those tensors and back. This module needs no torch: ``lowbit inspect`` reads
a checkpoint with it alone.

Kinds, as parts under the layer's name (keys nest as the runtime modules do: a low-rank branch wraps the
layer, a QuIP layer wraps its grid):

- grid: packed codes ``qweight``; float16 ``scales`` (or SpQR's second level: packed ``scale_codes`` with a
  float16 ``scale_lo``/``scale_step`` per 16 rows and group); packed ``qzeros`` (float16 ``zeros`` when a
  zero point is not an integer: QuIP's midrise grid); int32 ``g_idx`` only when act-order permuted the
  groups; SpQR outliers as int32 ``outlier_index`` + float16 ``outlier_value``;
- QuIP: float32 ``in_scale`` (the transforms themselves are seeds, in the attributes);
- low-rank branch: float16 ``a`` (out × r) and ``b`` (r × in);
- binary (BiLLM): packed ``signs``, ``residual`` (salient columns), ``split`` (the rest), ``salient``
  bitmap, float16 ``alphas`` (rows × blocks × 4).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from lowbit.grids.sizes import n_chunks, packed_nbytes

ITEMSIZE = {"U8": 1, "I32": 4, "F16": 2, "F32": 4}  # safetensors' dtype names
U8, I32, F16, F32 = ITEMSIZE


@dataclass(frozen=True)
class TensorDecl:
    key: str  # under the layer's name
    shape: tuple[int, ...]
    dtype: str  # as safetensors names it

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class LayerSpec:
    """Everything about a quantized layer but its numbers. ``groups``: scale groups per row (blocks per row
    for a binary layer); ``group_size`` ``None``: one group per row; ``blocksize`` set: a binary layer."""

    shape: tuple[int, int]  # (out, in)
    bits: int
    groups: int
    group_size: int | None = None
    act_order: bool = False
    float_zeros: bool = False
    outliers: int = 0
    stats_bits: int | None = None
    incoherence: Mapping | None = None  # QuIP's transforms: kind and seeds
    lowrank_rank: int = 0
    n_salient: int = 0
    blocksize: int | None = None

    @property
    def binary(self) -> bool:
        return self.blocksize is not None

    @property
    def plain(self) -> bool:
        """Codes with one scale and zero per row and group, nothing else: what the CPU kernels can take."""
        return not (self.binary or self.outliers or self.stats_bits)

    @property
    def quip_prefix(self) -> str:
        """Where QuIP's ``in_scale`` sits under the layer's name (inside a low-rank wrapper)."""
        return "inner." if self.lowrank_rank else ""

    @property
    def grid_prefix(self) -> str:
        """Where the grid's tensors sit under the layer's name (inside its QuIP and low-rank wrappers)."""
        return "inner." * ((self.incoherence is not None) + (self.lowrank_rank > 0))

    def grid(self) -> "LayerSpec":
        """The grid part alone (what a :class:`~lowbit.runtime.QuantLinear` holds)."""
        return dataclasses.replace(self, incoherence=None, lowrank_rank=0)

    # -- the declaration ---------------------------------------------------------------------
    def grid_tensors(self) -> tuple[TensorDecl, ...]:
        (rows, cols), g = self.shape, self.groups
        if self.binary:
            s = self.n_salient
            return (TensorDecl("signs", (packed_nbytes(rows * cols, 1),), U8),
                    TensorDecl("residual", (packed_nbytes(rows * s, 1),), U8),
                    TensorDecl("split", (packed_nbytes(rows * (cols - s), 1),), U8),
                    TensorDecl("salient", (packed_nbytes(cols, 1),), U8),
                    TensorDecl("alphas", (rows, g, 4), F16))
        out = [TensorDecl("qweight", (packed_nbytes(rows * cols, self.bits),), U8)]
        if self.stats_bits:
            out += [TensorDecl("scale_codes", (packed_nbytes(rows * g, self.stats_bits),), U8),
                    TensorDecl("scale_lo", (n_chunks(rows), g), F16),
                    TensorDecl("scale_step", (n_chunks(rows), g), F16)]
        else:
            out.append(TensorDecl("scales", (rows, g), F16))
        out.append(TensorDecl("zeros", (rows, g), F16) if self.float_zeros
                   else TensorDecl("qzeros", (packed_nbytes(rows * g, self.bits),), U8))
        if self.act_order:
            out.append(TensorDecl("g_idx", (cols,), I32))
        if self.outliers:
            out += [TensorDecl("outlier_index", (self.outliers,), I32),
                    TensorDecl("outlier_value", (self.outliers,), F16)]
        return tuple(out)

    def quip_tensors(self) -> tuple[TensorDecl, ...]:
        return (TensorDecl("in_scale", (self.shape[1],), F32),) if self.incoherence is not None else ()

    def lowrank_tensors(self) -> tuple[TensorDecl, ...]:
        (rows, cols), r = self.shape, self.lowrank_rank
        return (TensorDecl("a", (rows, r), F16), TensorDecl("b", (r, cols), F16)) if r else ()

    def tensors(self) -> tuple[TensorDecl, ...]:
        """Every tensor of the layer, keys under its name."""
        return (*self.lowrank_tensors(),
                *(dataclasses.replace(d, key=self.quip_prefix + d.key) for d in self.quip_tensors()),
                *(dataclasses.replace(d, key=self.grid_prefix + d.key) for d in self.grid_tensors()))

    def storage_bits(self) -> int:
        """The layer's stored bits: its tensors' bytes (a packed stream's last byte included)."""
        return 8 * sum(d.nbytes for d in self.tensors())

    @property
    def bias_key(self) -> str:
        """Where the layer's bias sits (on the module that holds the grid, or the QuIP layer around it)."""
        return self.quip_prefix + "bias"

    # -- attributes as JSON (``lowbit_config.json``'s layer table, resume files) ----------------
    def to_json(self) -> dict:
        if self.binary:
            return {"bits": 1, "binary": True, "shape": list(self.shape), "groups": self.groups,
                    "n_salient": self.n_salient, "blocksize": self.blocksize}
        info = {"bits": self.bits, "group_size": self.group_size, "groups": self.groups, "shape": list(self.shape),
                "act_order": self.act_order, "float_zeros": self.float_zeros}
        info.update({k: v for k, v in (("outliers", self.outliers), ("stats_bits", self.stats_bits),
                                       ("lowrank_rank", self.lowrank_rank)) if v})
        if self.incoherence is not None:
            info["incoherence"] = dict(self.incoherence)
        return info

    @classmethod
    def from_json(cls, info: Mapping, groups: int | None = None) -> "LayerSpec":
        """``groups``: for tables written before they recorded it (format 3 and older), from the file's tensors."""
        groups = info.get("groups", groups)
        if not isinstance(groups, int):
            raise KeyError("groups")
        shape = (int(info["shape"][0]), int(info["shape"][1]))
        if info.get("binary"):
            return cls(shape, 1, groups, n_salient=int(info["n_salient"]), blocksize=int(info["blocksize"]))
        return cls(shape, int(info["bits"]), groups, info.get("group_size"), bool(info.get("act_order")),
                   bool(info.get("float_zeros")), int(info.get("outliers", 0)), info.get("stats_bits"),
                   info.get("incoherence"), int(info.get("lowrank_rank", 0)))


def groups_key(name: str, info: Mapping) -> str:
    """The tensor whose second dimension gives a layer's ``groups``, for tables that did not record it."""
    if info.get("binary"):
        return f"{name}.alphas"
    depth = ("incoherence" in info) + bool(info.get("lowrank_rank"))
    return f"{name}." + "inner." * depth + ("scale_lo" if info.get("stats_bits") else "scales")
