"""Files that are either whole or absent: written under a temporary name next to the target, then
renamed over it, so that a run killed mid-write (resume state, logs, results) never leaves a
truncated file for the next run to trust."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name to write ``path``'s new content to; it replaces ``path`` when the block ends."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def as_umask_allows(path: str | Path) -> None:
    """Give a file the mode ``open()`` would have (0644 under the usual umask): some writers, such
    as safetensors' ``save_file``, create theirs 0600, unlike every other file of a checkpoint."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
