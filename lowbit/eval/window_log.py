"""Per-window results on disk, so that an evaluation of hours resumes at its first unfinished window.

Under the full protocol one row is ~400 forwards of 2048 tokens (an hour of CPU): an interrupted
run keeps every finished window. The log is tied to the exact windows (a hash of their token ids)
and a label; it is the caller's job to use a fresh path for a different model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from lowbit.atomic import atomic_write_text


class WindowLog:
    def __init__(self, path: str | Path | None, windows: torch.Tensor, label: str):
        self.path = Path(path) if path is not None else None
        h = hashlib.sha256(label.encode())
        h.update(windows.cpu().numpy().tobytes())
        self.tag = h.hexdigest()[:20]
        self.values: list = []
        if self.path is not None and self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("tag") == self.tag:
                self.values = data["values"]

    def add(self, value) -> None:
        self.values.append(value)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"tag": self.tag, "values": self.values}))
