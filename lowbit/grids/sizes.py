"""How many bytes packed codes and SpQR's second-level scales take: arithmetic only, no torch, so that the
quantized-layer format (``lowbit.format.spec``) and ``lowbit inspect`` can size a layer without loading torch."""

from __future__ import annotations

import math

STATS_ROWS = 16  # SpQR's second level: one float16 minimum and step per this many rows and group


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` codes of ``bits`` bits as one bit stream (``grids.packing``: only the last byte pads)."""
    return math.ceil(numel * bits / 8)


def n_chunks(rows: int) -> int:
    """Chunks of ``STATS_ROWS`` rows (the last may be shorter)."""
    return -(-rows // STATS_ROWS)
