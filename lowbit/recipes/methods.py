"""What each rounding method supports, in one table: the recipe checks and the pipeline's choice of a Hessian
source both read it (``Recipe.validate``, ``Recipe.needs_hessians``), so adding a method is one row here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """``hessian``: rounds with the layer's Hessian (needs calibration); ``grid``: codes on a uniform grid (what
    tuning, incoherence, low-rank branches and quantized scales act on); ``outliers``: keeps SpQR's sparse
    outliers; ``scale_codes``: can quantize its group scales; ``bits``: the widths it takes."""

    hessian: bool
    grid: bool
    outliers: bool = False
    scale_codes: bool = False
    bits: tuple[int, int] = (2, 8)


METHOD_TABLE = {
    "none": Method(hessian=False, grid=False),  # weights stay in float (activation-only ablations)
    "rtn": Method(hessian=False, grid=True, scale_codes=True),
    "gptq": Method(hessian=True, grid=True, outliers=True, scale_codes=True),
    "ldlq": Method(hessian=True, grid=True),
    "billm": Method(hessian=True, grid=False, bits=(1, 1)),  # binary: its own storage, no grid
}
METHODS = tuple(METHOD_TABLE)
