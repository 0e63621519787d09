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
