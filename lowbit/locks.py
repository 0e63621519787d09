"""One writer per run folder (a checkpoint's ``--out``, an evaluation log, a comparison report).

Two processes writing the same folder each believe they succeeded while one's files are lost; with
this lock the second fails at once, naming the first. The lock is the kernel's (``filelock``, on
a hidden file beside the folder), so a killed holder never leaves a stale lock behind.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from lowbit.errors import LowbitError


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def _holder(path: Path, wait: float = 2.0) -> str:
    """Who holds the lock, from the note it writes just after taking it (waiting a moment for that note:
    a second run started at the same instant may look before the first has written it)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            info = json.loads(path.read_text())
            return f"pid {info['pid']} on {info['host']} since {info['since']}: {info['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return "another process"
            time.sleep(0.05)


@contextmanager
def run_lock(folder: str | Path, flag: str = "--out") -> Iterator[None]:
    """Hold ``folder`` for this process; a second holder gets a one-line error at once."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder)
    holder = path.with_name(path.name + ".holder")
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise LowbitError(f"{flag} {folder} is in use by {_holder(holder)}; "
                          "wait for it or choose another folder") from None
    try:
        holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%H:%M:%S"),
                                      "command": " ".join(["lowbit", *sys.argv[1:]])[:200]}))
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
