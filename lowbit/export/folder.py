"""What may become a checkpoint folder, decided from its listing alone (no torch)."""

from __future__ import annotations

from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.models.resolve import CHECKPOINT_MARKER, partial_checkpoint

RUN_STATE = {".progress", ".eval-log.lock", ".eval-log.lock.holder"}  # lowbit's own, inside a checkpoint


def holds_checkpoint(out: Path) -> bool:
    return (out / CHECKPOINT_MARKER).is_file() or (out.is_dir() and partial_checkpoint(out))


def check_replaceable(out: Path) -> None:
    """A checkpoint replaces a folder whole: only a new or empty one, or one that holds lowbit's own files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise LowbitError(f"{out} exists and is not a directory")
    names = sorted(p.name for p in out.iterdir())
    if set(names) <= RUN_STATE or holds_checkpoint(out):
        return
    raise LowbitError(f"{out} holds files that are not a lowbit checkpoint ({names[0]}, …): "
                      "save into a new or empty folder")
