"""Per-window results on disk, so that an evaluation of hours resumes at its first unfinished window.

Under the full protocol one row is ~400 forwards of 2048 tokens (an hour of CPU): an interrupted
run keeps every finished window. Each entry is keyed by a hash of its window's token ids and a
label (the quantity and the model), so a log is reused exactly as far as the windows agree: a
rerun continues after the last finished window, and the protocol's first N windows — always a
prefix of all of them — are read from a longer run's log without a forward. A log of other
windows (another dataset, window length or model) is started afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from lowbit import faults
from lowbit.atomic import atomic_write_text

log = logging.getLogger(__name__)


def _digest(label: str, window: torch.Tensor) -> str:
    h = hashlib.sha256(label.encode())
    h.update(window.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _read(path: Path) -> dict:
    """A log is a cache of finished windows: a damaged one is set aside and the windows computed again."""
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("windows", []), list) \
                and isinstance(data.get("values", []), list):
            return data
    except (ValueError, UnicodeDecodeError):
        pass
    log.warning("per-window log %s is damaged: its windows are computed again", path)
    return {}


class WindowLog:
    def __init__(self, path: str | Path | None, windows: torch.Tensor, label: str):
        self.path = Path(path) if path is not None else None
        self.digests = [_digest(label, w) for w in windows]
        self._keys: list[str] = []  # what the file holds, cut where its windows stop being ours
        self._values: list = []
        if self.path is not None and self.path.exists():
            data = _read(self.path)
            keys, values = data.get("windows", []), data.get("values", [])  # older logs had no keys: unused
            k = 0
            while k < min(len(keys), len(self.digests)) and keys[k] == self.digests[k]:
                k += 1
            keep = len(keys) if k == len(self.digests) else k  # a longer run's later windows stay in its log
            self._keys, self._values = keys[:keep], values[:keep]

    @property
    def values(self) -> list:
        """The finished windows among ours, in order."""
        return self._values[: len(self.digests)]

    def add(self, value) -> None:
        self._keys.append(self.digests[len(self._values)])
        self._values.append(value)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"windows": self._keys, "values": self._values}))
        faults.reach(f"eval:window:{len(self._values)}")
