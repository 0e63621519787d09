"""Peak memory of this process, the one number every report (quantization, gradient pass, peers) gives."""

from __future__ import annotations

import resource

import torch


def peak_memory_mb() -> float:
    """Peak resident memory of this process (and of the GPU, if one was used)."""
    mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        mb = max(mb, torch.cuda.max_memory_allocated() / 2**20)
    return mb


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Ask glibc to serve every allocation above ``threshold`` bytes from its own memory map.

    Its default threshold rises with each large block freed (up to 32 MB), after which a block's
    weights come from the heap, and a heap freed out of order is not given back: onloading one
    block after another then grew by a block's size every few blocks (SmolLM2, float32: peak
    2.1 GB resident instead of 0.6 GB). Mapped allocations go back to the system when freed.
    Elsewhere than glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
