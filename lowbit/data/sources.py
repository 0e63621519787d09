"""Raw text: local files (``$LOWBIT_DATA`` or a ``shared/data`` beside the checkout) or the hub.

Local layout (same as the hub files): ``wikitext-2-raw/wiki.test.raw`` and
``c4/c4-{train.00000-of-01024,validation.00000-of-00008}*.jsonl``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from lowbit.errors import LowbitError

DATASETS = ("wikitext2", "c4")
SAMPLING = ("documents", "concat")  # how calibration windows are cut (see ``protocol.calibration``)
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


def data_dir() -> Path | None:
    """The first directory that exists of ``$LOWBIT_DATA``, ``./shared/data``, ``../shared/data``."""
    candidates = []
    if os.environ.get("LOWBIT_DATA"):
        candidates.append(Path(os.environ["LOWBIT_DATA"]))
    repo = Path(__file__).resolve().parents[2]
    for base in (Path.cwd(), repo):
        candidates += [base / "shared" / "data", base.parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def check_data_available() -> None:
    """Fail fast (before a model is loaded) when neither local files nor the hub loader exist."""
    if data_dir() is None:
        _datasets_module()


def _datasets_module():
    try:
        import datasets
    except ImportError:
        raise LowbitError(
            "no local data found (set LOWBIT_DATA to a folder with wikitext-2-raw/ and c4/) "
            'and the hub fallback needs `pip install "lowbit[hub]"`'
        ) from None
    return datasets


@functools.lru_cache(maxsize=2)
def wikitext2_test_rows() -> tuple[str, ...]:
    """The rows of WikiText-2-raw-v1 ``test`` exactly as the ``datasets`` loader yields them."""
    root = data_dir()
    if root is not None and (root / "wikitext-2-raw" / "wiki.test.raw").exists():
        raw = (root / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
        return tuple(line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1])
    return tuple(_hub("wikitext", "wikitext-2-raw-v1", split="test")["text"])


@functools.lru_cache(maxsize=4)
def c4_documents(split: str) -> tuple[str, ...]:
    """C4 ``en`` documents of shard 0 of ``split`` (train or validation)."""
    if split not in C4_FILES:
        raise LowbitError(f"unknown C4 split '{split}' (train, validation)")
    root = data_dir()
    if root is not None:
        local = sorted((root / "c4").glob(f"c4-{split}.*.jsonl")) if (root / "c4").is_dir() else []
        if local:
            with open(local[0], encoding="utf-8") as f:
                return tuple(json.loads(line)["text"] for line in f if line.strip())
    ds = _hub("allenai/c4", data_files={split: C4_FILES[split]}, split=split)
    return tuple(ds["text"])


def _hub(*args, **kwargs):
    datasets = _datasets_module()
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # network, auth, missing files: say what to do instead
        raise LowbitError(f"could not load {args[0]} from the hub ({exc}); set LOWBIT_DATA") from None
