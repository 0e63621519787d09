"""Quantization grids: how real weights map to integer codes and back, and how codes are packed."""

from lowbit.lazy import lazy_attributes

__all__ = ["Grid", "GridParams", "RMSGrid", "UniformGrid", "pack_codes", "packed_nbytes", "natural_group_index",
           "unpack_codes"]

# imported on first use: ``grids.sizes`` (sizes without torch) is read by ``lowbit inspect``, which never loads torch
__getattr__, __dir__ = lazy_attributes(__name__, {
    "pack_codes": ("lowbit.grids.packing", "pack_codes"), "unpack_codes": ("lowbit.grids.packing", "unpack_codes"),
    "packed_nbytes": ("lowbit.grids.sizes", "packed_nbytes"), "RMSGrid": ("lowbit.grids.rms", "RMSGrid"),
    "Grid": ("lowbit.grids.grid", "Grid"), "GridParams": ("lowbit.grids.grid", "GridParams"),
    "UniformGrid": ("lowbit.grids.uniform", "UniformGrid"),
    "natural_group_index": ("lowbit.grids.uniform", "natural_group_index")})
