"""Files and folders that are either whole or absent: written under a temporary name next to the
target, then renamed over it, so that a run killed mid-write (a checkpoint, resume state, logs,
results) never leaves a truncated file for the next run to trust, and the previous version stays
intact until the new one is complete."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lowbit import faults


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name to write ``path``'s new content to; it replaces ``path`` when the block ends."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` ``save_file``, with its I/O failures (a full disk) raised as the ``OSError`` they are:
    it reports them as its own error type, the errno only in the text."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def as_umask_allows(path: str | Path) -> None:
    """Give a file the mode ``open()`` would have (0644 under the usual umask): some writers, such
    as safetensors' ``save_file``, create theirs 0600, unlike every other file of a checkpoint."""
    os.chmod(path, 0o666 & ~_umask())


def recover(target: str | Path) -> None:
    """Undo what a kill inside :func:`atomic_dir` left: put the previous folder back if it had been set aside
    (the kill came between the two renames), and drop unfinished new ones. Call it holding ``target``'s lock."""
    target = Path(target)
    old = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if old and not target.exists():
        os.rename(old.pop(), target)
    for stale in [*old, *target.parent.glob(f".{target.name}.new-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Data on disk before the rename makes it visible: a power cut then leaves the old folder or the new one."""
    for path in [*sorted(root.rglob("*")), root]:
        _fsync(path)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """A new, empty folder to fill; when the block ends it takes ``target``'s place whole.

    On an error, or a kill, ``target`` is as it was (a kill leaves a ``.NAME.new-*`` sibling, which
    :func:`recover` removes next time). The caller holds ``target``'s lock, so leftovers are nobody else's.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the checkpoint private
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.rename(target, old)
            faults.reach("save:swap")  # between the two renames: the old folder is kept under its new name
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

