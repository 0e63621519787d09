"""Bit-packing of integer codes (1-8 bits) into a dense byte stream.

Codes are written LSB-first as one continuous bit stream, so any width packs with no padding
inside the stream (3-bit codes take exactly 3/8 byte each); only the last byte is padded.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError
from lowbit.grids.sizes import packed_nbytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat uint8 tensor: an LSB-first bit stream.

    Works on whole words, as :func:`unpack_codes` does: 8 codes of ``bits`` bits are one integer of
    ``8·bits ≤ 64`` bits, written as ``bits`` little-endian bytes; a million words at a time, so that
    packing a 7B model's largest layer (45M codes) takes tens of MB beside it, not gigabytes.
    """
    if not 1 <= bits <= 8:
        raise LowbitError(f"can only pack 1-8 bit codes, got {bits}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise LowbitError(f"codes out of range for {bits} bits")
    out = torch.empty(-(-n // 8) * bits, dtype=torch.uint8, device=flat.device)
    code_shifts = torch.arange(0, 8 * bits, bits, device=flat.device)
    byte_shifts = torch.arange(0, 8 * bits, 8, device=flat.device)
    chunk = 8 << 20  # codes per step
    for start in range(0, n, chunk):
        part = flat[start : start + chunk].to(torch.int64)
        if part.numel() % 8:
            part = torch.cat([part, part.new_zeros(8 - part.numel() % 8)])
        # disjoint bits: the sum is their OR (the 8-bit case sets the sign bit, and masking below undoes it)
        word = (part.view(-1, 8) << code_shifts).sum(1)
        packed = ((word.unsqueeze(1) >> byte_shifts) & 255).to(torch.uint8).reshape(-1)
        out[start // 8 * bits : start // 8 * bits + packed.numel()] = packed
    size = packed_nbytes(n, bits)
    return out if out.numel() == size else out[:size].clone()  # its own storage, not a view of a longer one


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as uint8.

    Runs on every forward of a packed layer, so it works on whole words, not bits: 8 codes of
    ``bits`` bits fill exactly ``bits`` bytes of the LSB-first stream, which read as one little-endian
    integer of ``8·bits ≤ 64`` bits give the 8 codes by shift and mask.
    """
    if 8 % bits == 0:  # whole codes per byte, same LSB-first layout
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        return ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel]
    words = -(-numel // 8)
    stream = packed.new_zeros(words * bits)
    stream[: packed.numel()] = packed  # the last word's missing bytes read as zero padding
    by = stream.view(words, bits).to(torch.int64)
    word = by[:, 0].clone()
    for j in range(1, bits):
        word |= by[:, j] << (8 * j)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device, dtype=torch.int64)
    return ((word.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel].to(torch.uint8)


def pack_rows_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Each row of ``codes`` (rows, n) as its own LSB-first bit stream in little-endian 32-bit words,
    ``(rows, ceil(n·bits/32))`` int32 — the layout of compressed-tensors' ``pack-quantized`` and of GPTQ's
    ``qweight`` (transposed). It is :func:`pack_codes`'s stream with every row starting a new word."""
    rows, n = codes.shape
    words = math.ceil(n * bits / 32)
    if (n * bits) % 32 == 0:  # rows end on word boundaries: one stream for the whole matrix
        return pack_codes(codes, bits).view(torch.int32).view(rows, words)
    out = torch.empty(rows, words * 4, dtype=torch.uint8)
    for r in range(rows):
        packed = pack_codes(codes[r], bits)
        out[r, : packed.numel()] = packed
        out[r, packed.numel():] = 0
    return out.view(torch.int32)


def unpack_rows_int32(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows_int32`: ``(rows, n)`` codes as int64."""
    rows = words.shape[0]
    as_bytes = words.contiguous().view(torch.uint8).view(rows, -1)
    used = packed_nbytes(n, bits)
    return torch.stack([unpack_codes(as_bytes[r, :used], bits, n) for r in range(rows)]).to(torch.int64)
