"""A cheap fingerprint of a model's weights, for results kept on disk and reused by a later run.

OAC's Hessian cache and the evaluation's per-window logs are reused only for the model they were
computed on. Hashing every weight of a 7B model takes a minute; this hashes the source name and
the names, shapes and dtypes of every tensor in the state dict (parameters and buffers: packed
codes, scales) with a strided sample of ≤ 4096 values each — a fraction of a second. Another
checkpoint, another bit width or another recipe changes it; an edit of a few weights that misses
every sampled position would not, so callers key only models as loaded or as quantized, never
hand-edited ones.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from lowbit.models.source import source_of

SAMPLES_PER_TENSOR = 4096


def model_digest(model: nn.Module, buffers: bool = True) -> str:
    """``buffers=False``: parameters only (a full-precision model's weights; what OAC's cache keys)."""
    h = hashlib.sha256((source_of(model) or type(model).__name__).encode())
    tensors = model.state_dict().items() if buffers else model.named_parameters()
    with torch.no_grad():
        for name, t in tensors:
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // SAMPLES_PER_TENSOR)]
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(sample.to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()
