"""Quantization grids: how real weights map to integer codes and back, and how codes are packed."""

from lowbit.grids.packing import pack_codes, packed_nbytes, unpack_codes
from lowbit.grids.rms import RMSGrid
from lowbit.grids.uniform import GridParams, UniformGrid, natural_group_index

__all__ = ["GridParams", "RMSGrid", "UniformGrid", "pack_codes", "packed_nbytes", "natural_group_index", "unpack_codes"]
