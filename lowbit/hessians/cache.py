"""A directory of output-adaptive Hessians, shared by every recipe that asks for the same one.

OAC's Hessian depends on the model, the calibration tokens and the set of layers — not on how
the layers are rounded afterwards — and its gradient pass is the longest step of an OAC run (an
hour of one CPU core for 128 × 2048 tokens on SmolLM2-135M). The recipes that use it
(``oac-w2``, ``oac-w1``, ``gptq-w2g64-oac``, any ``hessian.source: output_adaptive``) find it
here under a key of those three things, so that the pass runs once for all of them. The file
under a key is the pass's own resume state (running sums + sequences done): an interrupted pass
is continued by whichever recipe asks next, and a finished one is simply read. A lock file makes
two processes that ask at once (``lowbit compare --jobs 2``) run the pass once.

The model enters the key by ``model_digest`` (its source and a strided sample of every tensor):
the pipeline keys the full-precision model as loaded, before any block is rounded.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from torch import nn

from lowbit.models.fingerprint import model_digest

log = logging.getLogger(__name__)

FORMAT = "oac-sums-v1"  # raw Σ GᵀG per layer (not divided), float32 (float64 for a float64 model)


class HessianCache:
    """Output-adaptive Hessians under ``root``, one resumable state file (per gradient pass) per key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key(self, model: nn.Module, layers: dict[str, nn.Linear], calib: torch.Tensor) -> str:
        h = hashlib.sha256(FORMAT.encode())
        h.update(model_digest(model, buffers=False).encode())  # the weights; buffers (rotary tables) hold no weights
        h.update(";".join(f"{n}:{m.in_features}x{m.out_features}" for n, m in sorted(layers.items())).encode())
        h.update(f"{tuple(calib.shape)}:{calib.dtype};".encode())
        h.update(calib.cpu().numpy().tobytes())
        return h.hexdigest()[:24]

    def state(self, key: str) -> Path:
        """The state file of a one-pass computation; a split one (``hessian.passes``) adds ``_<pass>``."""
        return self.root / f"oac-{key}.safetensors"

    @contextmanager
    def claim(self, key: str) -> Iterator[Path]:
        """Hold ``key`` while computing or reading it, so that a second process waits for the
        first's pass instead of running the same one beside it."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / f"oac-{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("another process is computing the output-adaptive Hessians %s in %s; waiting for it",
                     key, self.root)
            lock.acquire()
        try:
            yield self.state(key)
        finally:
            lock.release()
