"""Exports of a lowbit checkpoint to formats other tools load: ``lowbit export CKPT OUT --format F``.

Each format module declares ``NAME``, ``check(source)`` (a one-line :class:`LowbitError` for what it cannot
express) and ``write(source, folder)``, which runs the check before it writes anything. The folder is written
under a temporary name and renamed at the end, so a refused, failed or killed export leaves nothing behind.
Writing needs no consumer package (``gguf`` is a dependency of lowbit); loading a compressed-tensors export in
``transformers`` needs ``compressed-tensors`` (the ``export`` extra).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from lowbit.errors import LowbitError

FORMATS = {"compressed-tensors": "compressed_tensors", "gptq": "gptq", "gguf": "gguf", "dense": "dense"}


def format_module(fmt: str):
    if fmt not in FORMATS:
        raise LowbitError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    return importlib.import_module(f"lowbit.export.formats.{FORMATS[fmt]}")


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str) -> Path:
    """Write ``checkpoint`` (a lowbit checkpoint folder) as ``fmt`` into the new folder ``out``."""
    from lowbit.atomic import atomic_dir
    from lowbit.export.formats.source import open_checkpoint

    module = format_module(fmt)
    out = Path(out)
    if out.exists():
        raise LowbitError(f"{out} exists: export into a new folder")
    src = open_checkpoint(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        module.write(src, tmp)
    return out
