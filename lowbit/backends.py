"""Which CPU back-end a packed layer gets, decided from its shape and grid alone (no torch): the rule
``lowbit.runtime.kernels`` applies when it builds the kernels, and ``lowbit inspect`` prints."""

from __future__ import annotations

INT4_GROUPS = (256, 128, 64, 32)  # what PyTorch's int4 CPU kernel accepts, widest first (fewer scales)


def int4_group(in_features: int, out_features: int, group_size: int | None) -> int | None:
    """The int4 kernel's group that represents lowbit's grouping exactly, or ``None``."""
    if out_features % 16:
        return None
    for g in INT4_GROUPS:
        if in_features % g == 0 and (group_size is None or group_size % g == 0):
            return g
    return None


def cpu_backend(bits: int, in_features: int, out_features: int, group_size: int | None, groups: int,
                plain: bool) -> str:
    """``int4``, ``int8`` or ``reference``. ``plain``: codes with one scale and zero per row and group, nothing
    else (no outliers, quantized scales or binary parts), in groups that are contiguous once sorted."""
    if not plain:
        return "reference"
    if bits <= 4 and int4_group(in_features, out_features, group_size) is not None:
        return "int4"  # 2- and 3-bit codes are 4-bit codes that leave the top values unused: the same kernel, exact
    if bits == 8 and groups == 1:
        return "int8"
    return "reference"
